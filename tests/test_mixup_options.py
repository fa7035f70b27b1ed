"""timm's mixup options on arrays: label smoothing, per-example lambda, probability, off_epoch."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.method import alignment, mixup
from configs import default


class Tokens(NamedTuple):  # a transformer's (grid, class token), as models.vit.PatchTokens
    grid: jax.Array
    class_token: jax.Array


def test_label_smoothing_is_timms():
    # k = 4, s = 0.1: 1 - 0.1 + 0.025 = 0.925 on the class, 0.025 elsewhere.
    targets = mixup.smooth_one_hot(jnp.array([0, 2]), 4, 0.1)
    assert targets.dtype == jnp.float32
    np.testing.assert_allclose(targets, [[0.925, 0.025, 0.025, 0.025],
                                         [0.025, 0.025, 0.925, 0.025]], rtol=1e-6)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)


def test_no_smoothing_gives_exactly_the_one_hot_labels():
    labels = jnp.array([3, 0, 1])
    np.testing.assert_array_equal(mixup.smooth_one_hot(labels, 5),
                                  jax.nn.one_hot(labels, 5, dtype=jnp.float32))


def test_smoothed_labels_are_smoothed_before_they_are_mixed():
    # k = 3, s = 0.3: 0.8 on the class, 0.1 elsewhere. Pair (0, 1) at lambda 0.6:
    # 0.6 [0.8, 0.1, 0.1] + 0.4 [0.1, 0.8, 0.1] = [0.52, 0.38, 0.1].
    smoothed = mixup.smooth_one_hot(jnp.array([0, 1, 2]), 3, 0.3)
    permutation = jnp.array([1, 2, 0])
    targets = mixup.mixed_targets(smoothed, permutation, 0.6)
    np.testing.assert_allclose(targets, [[0.52, 0.38, 0.10],
                                         [0.10, 0.52, 0.38],
                                         [0.38, 0.10, 0.52]], rtol=1e-5)
    swapped = mixup.mixed_targets(smoothed, permutation, 0.6, swap=True)
    np.testing.assert_allclose(swapped[0], [0.38, 0.52, 0.10], rtol=1e-5)


@pytest.mark.parametrize('smoothing', [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_one_clear_error(smoothing):
    with pytest.raises(ValueError, match=r'config.mixup.label_smoothing must lie in \[0, 1\)'):
        mixup.smooth_one_hot(jnp.array([0]), 3, smoothing)


def test_per_example_lambda_is_one_draw_per_pair_with_the_same_permutation():
    key = jax.random.PRNGKey(7)
    permutation, lam = mixup.sample_pairing(key, 16, 2.0, lambda_per='example')
    batch_permutation, batch_lam = mixup.sample_pairing(key, 16, 2.0)
    assert lam.shape == (16,) and batch_lam.shape == ()
    np.testing.assert_array_equal(permutation, batch_permutation)
    assert len(np.unique(np.asarray(lam))) == 16
    assert np.all((np.asarray(lam) > 0) & (np.asarray(lam) < 1))
    # Beta(2, 2) per pair: mean 1/2, variance 1/20.
    many = mixup.sample_pairing(key, 50000, 2.0, lambda_per='example')[1]
    assert abs(float(jnp.mean(many)) - 0.5) < 0.01
    assert abs(float(jnp.var(many)) - 0.05) < 0.003


def test_unknown_lambda_per_is_one_clear_error():
    with pytest.raises(ValueError, match="config.mixup.lambda_per must be one of"):
        mixup.sample_pairing(jax.random.PRNGKey(0), 4, 2.0, lambda_per='pair')


def test_per_example_lambda_mixes_each_row_with_its_own_lambda():
    lam = jnp.array([0.0, 0.25, 1.0])
    u = jnp.arange(3 * 2 * 2 * 2, dtype=jnp.float32).reshape(3, 2, 2, 2)
    v = -u - 1
    mixed = np.asarray(mixup.mix(u, v, lam))
    np.testing.assert_array_equal(mixed[0], v[0])
    np.testing.assert_allclose(mixed[1], 0.25 * u[1] + 0.75 * v[1], rtol=1e-6)
    np.testing.assert_array_equal(mixed[2], u[2])
    # Embeddings (b, d): the same per row.
    embeddings = np.asarray(mixup.mix(u.reshape(3, 8), v.reshape(3, 8), lam))
    np.testing.assert_allclose(embeddings, mixed.reshape(3, 8), rtol=1e-6)


def test_per_example_soft_targets():
    one_hot = jax.nn.one_hot(jnp.array([0, 1, 2]), 3)
    permutation = jnp.array([1, 2, 0])
    targets = mixup.mixed_targets(one_hot, permutation, jnp.array([0.9, 0.5, 0.2]))
    np.testing.assert_allclose(targets, [[0.9, 0.1, 0.0],
                                         [0.0, 0.5, 0.5],
                                         [0.8, 0.0, 0.2]], rtol=1e-6)
    # With smoothing (k = 3, s = 0.3: 0.8 / 0.1), row 2 at lambda 0.2: 0.2 y_2 + 0.8 y_0.
    smoothed = mixup.mixed_targets(mixup.smooth_one_hot(jnp.array([0, 1, 2]), 3, 0.3),
                                   permutation, jnp.array([0.9, 0.5, 0.2]))
    np.testing.assert_allclose(smoothed[2], [0.66, 0.10, 0.24], rtol=1e-5)


def test_per_example_aligned_feature_mixing_is_eq_12_per_pair():
    features = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3)))
    permutation = jnp.array([1, 2, 3, 0])
    lam = jnp.array([0.1, 0.4, 0.6, 0.95])
    for swap in (False, True):
        mixed, plan = mixup.mix_features(features, permutation, lam, swap=swap, align=True,
                                         epsilon=0.1, num_iters=100)
        assert plan.shape == (4, 4, 4)
        for i in range(4):
            anchor, partner = features[i], features[permutation[i]]
            if swap:
                anchor, partner = partner, anchor
            expected = lam[i] * anchor + (1 - lam[i]) * alignment.align(anchor, partner)
            np.testing.assert_allclose(mixed[i], expected, rtol=1e-5, atol=1e-6)


def test_per_example_lambda_mixes_a_transformers_class_token_per_row():
    grid = jax.random.normal(jax.random.PRNGKey(1), (2, 2, 2, 3))
    class_token = jnp.array([[1.0, 2.0], [3.0, 5.0]])
    lam = jnp.array([0.25, 0.5])
    (_, mixed_token), _ = mixup.mix_features(Tokens(grid, class_token), jnp.array([1, 0]), lam,
                                             swap=False, align=True, epsilon=0.1,
                                             num_iters=100)
    np.testing.assert_allclose(mixed_token, [[2.5, 4.25], [2.0, 3.5]], rtol=1e-6)


def test_per_example_cutmix_gives_each_pair_its_own_box_and_lambda():
    batch, size = 6, 8
    # Image i is all i + 1, so every pixel tells which image it came from.
    images = jnp.broadcast_to(jnp.arange(1.0, batch + 1)[:, None, None, None],
                              (batch, size, size, 1))
    permutation = jnp.roll(jnp.arange(batch), 1)
    lam = jnp.array([1.0, 0.9, 0.75, 0.5, 0.3, 0.1])
    mixed, kept = mixup.cutmix(jax.random.PRNGKey(4), images, permutation, lam)
    assert kept.shape == (batch,)
    shown = np.asarray(mixed[..., 0] == images[..., 0]).mean(axis=(1, 2))
    np.testing.assert_allclose(kept, shown, rtol=1e-6)
    assert float(kept[0]) == 1.0  # lambda 1: no box
    boxes = np.asarray(mixed[..., 0] != images[..., 0])
    assert len({box.tobytes() for box in boxes}) == batch  # a box of its own per pair
    # Inside its box, pair i shows its partner x'; outside, itself.
    partners = np.asarray(images)[np.asarray(permutation)]
    np.testing.assert_array_equal(mixed, np.where(boxes[..., None], partners, images))
    # One lambda: one box for the whole batch.
    mixed, kept = mixup.cutmix(jax.random.PRNGKey(4), images, permutation, jnp.float32(0.5))
    assert kept.shape == ()
    boxes = np.asarray(mixed[..., 0] != images[..., 0])
    assert all(np.array_equal(box, boxes[0]) for box in boxes)
    np.testing.assert_allclose(float(kept), 1 - boxes[0].mean(), rtol=1e-6)


def test_lambda_values_do_not_recompile():
    features = jax.nn.relu(jax.random.normal(jax.random.PRNGKey(0), (4, 2, 2, 3)))
    one_hot = jax.nn.one_hot(jnp.array([0, 1, 2, 0]), 3)
    traces = []

    @jax.jit
    def mixed_batch(key, features):
        traces.append(None)  # runs once per trace, not per call
        permutation, lam = mixup.sample_pairing(key, 4, 2.0, lambda_per='example')
        mixed, _ = mixup.mix_features(features, permutation, lam, swap=False, align=True,
                                      epsilon=0.1, num_iters=10)
        return mixed, mixup.mixed_targets(one_hot, permutation, lam), lam

    lams = [mixed_batch(jax.random.PRNGKey(seed), features)[2] for seed in range(5)]
    assert len({np.asarray(lam).tobytes() for lam in lams}) == 5
    assert len(traces) == 1

    @jax.jit
    def mixed_with(lam):
        traces.append(None)
        return mixup.mix(features, features[::-1], lam)

    traces.clear()
    for lam in ([0.1] * 4, [0.2, 0.3, 0.9, 0.5], [0.7] * 4):
        lam = jnp.array(lam, jnp.float32)
        np.testing.assert_allclose(mixed_with(lam)[:, 0, 0, 0],
                                   lam * features[:, 0, 0, 0] + (1 - lam) * features[::-1, 0, 0, 0],
                                   rtol=1e-6)
    assert len(traces) == 1


@pytest.mark.parametrize('mode', ['input', 'feature', 'cutmix', 'hidden1'])
def test_defaults_leave_every_mode_as_drawn(mode):
    assert all(mixup.scheduled_mode(mode, seed=0, step=step, epoch=step // 10) == mode
               for step in range(1, 200))


def test_off_epoch_trains_clean_from_that_epoch_on():
    modes = [mixup.scheduled_mode('feature', seed=0, step=step, epoch=(step - 1) // 10,
                                  off_epoch=3) for step in range(1, 61)]
    assert modes[:30] == ['feature'] * 30  # epochs 0, 1, 2
    assert modes[30:] == ['none'] * 30  # epochs 3, 4, 5
    assert mixup.scheduled_mode('input', seed=0, step=1, epoch=0, off_epoch=0) == 'none'


def test_probability_mixes_that_share_of_batches_reproducibly_from_seed_and_step():
    def modes(seed, steps):
        return [mixup.scheduled_mode('input', seed=seed, step=step, epoch=0, probability=0.25)
                for step in steps]

    drawn = modes(0, range(1, 4001))
    assert set(drawn) == {'input', 'none'}
    assert abs(drawn.count('input') / 4000 - 0.25) < 0.03
    # A run resumed at step 2001 draws what the uninterrupted run drew, in any order.
    assert modes(0, range(2001, 4001)) == drawn[2000:]
    assert modes(0, range(4000, 0, -1)) == drawn[::-1]
    assert modes(1, range(1, 4001)) != drawn  # the seed matters
    assert modes(0, range(1, 4001)) == drawn  # and nothing else
    assert all(mode == 'none' for mode in [
        mixup.scheduled_mode('input', seed=0, step=step, epoch=0, probability=0.0)
        for step in range(1, 100)])


def test_schedule_keeps_the_modes_that_mix_nothing():
    for mode in ('clean', 'none'):
        assert mixup.scheduled_mode(mode, seed=0, step=5, epoch=9, probability=0.0,
                                    off_epoch=1) == mode


@pytest.mark.parametrize('settings, field', [
    (dict(probability=1.5), 'probability'), (dict(probability=-0.1), 'probability'),
    (dict(off_epoch=-1), 'off_epoch')])
def test_bad_schedule_settings_are_one_clear_error(settings, field):
    with pytest.raises(ValueError, match=f'config.mixup.{field} must'):
        mixup.scheduled_mode('input', seed=0, step=1, epoch=0, **settings)


def test_the_config_defaults_are_neutral_and_valid():
    options = default.get_config().mixup
    values = dict(label_smoothing=options.label_smoothing, probability=options.probability,
                  off_epoch=options.off_epoch, lambda_per=options.lambda_per)
    assert values == dict(label_smoothing=0.0, probability=1.0, off_epoch=None,
                          lambda_per='batch')
    mixup.check_options(**values)
    mixup.check_options(label_smoothing=0.1, probability=0.5, off_epoch=3, lambda_per='example')


@pytest.mark.parametrize('settings, field', [
    (dict(label_smoothing=1.0), 'label_smoothing'), (dict(probability=2), 'probability'),
    (dict(off_epoch=-2), 'off_epoch'), (dict(lambda_per='elem'), 'lambda_per')])
def test_check_options_names_the_field(settings, field):
    with pytest.raises(ValueError, match=f'^config.mixup.{field} must'):
        mixup.check_options(**settings)
