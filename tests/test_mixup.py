"""Mixing semantics of Algorithm 1: the pairs, lambda, labels, the loss and the feature modes."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignmix_jax.method import alignment, losses, mixup

ALIGN = dict(align=True, epsilon=0.1, num_iters=100)


def random_features(seed=0, shape=(6, 4, 4, 8)):
    return jax.nn.relu(jax.random.normal(jax.random.PRNGKey(seed), shape))


def test_sample_pairing_is_a_permutation_and_a_beta_draw():
    permutation, lam = mixup.sample_pairing(jax.random.PRNGKey(3), 32, 2.0)
    assert sorted(np.asarray(permutation).tolist()) == list(range(32))
    assert 0.0 < float(lam) < 1.0
    again, lam_again = mixup.sample_pairing(jax.random.PRNGKey(3), 32, 2.0)
    np.testing.assert_array_equal(permutation, again)
    assert float(lam) == float(lam_again)
    # Beta(2, 2) has mean 1/2 and variance 1/20.
    lams = jax.vmap(lambda key: mixup.sample_pairing(key, 4, 2.0)[1])(
        jax.random.split(jax.random.PRNGKey(0), 20000))
    assert abs(float(jnp.mean(lams)) - 0.5) < 0.01
    assert abs(float(jnp.var(lams)) - 0.05) < 0.003


@pytest.mark.parametrize('lam, expected_side', [(1.0, 0), (0.0, 1)])
def test_mix_endpoints_give_back_each_side(lam, expected_side):
    u, v = jnp.arange(6.0), -jnp.arange(6.0) - 1
    np.testing.assert_array_equal(mixup.mix(u, v, lam), (u, v)[expected_side])


def test_mix_is_eq_2_and_keeps_the_dtype():
    u, v = jnp.ones(3, jnp.bfloat16), jnp.zeros(3, jnp.bfloat16)
    mixed = mixup.mix(u, v, jnp.float32(0.25))
    assert mixed.dtype == jnp.bfloat16
    np.testing.assert_allclose(mixup.mix(jnp.full(3, 2.0), jnp.full(3, 6.0), 0.25), 5.0)


def test_mixed_targets_follow_eq_1_and_sum_to_one():
    labels = jnp.array([0, 1, 2, 1])
    one_hot = jax.nn.one_hot(labels, 3)
    permutation = jnp.array([2, 0, 3, 1])
    targets = mixup.mixed_targets(one_hot, permutation, 0.7)
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[0], [0.7, 0.0, 0.3], rtol=1e-6)  # y=0 with y'=2
    np.testing.assert_allclose(targets[3], [0.0, 1.0, 0.0], rtol=1e-6)  # a same-class pair
    swapped = mixup.mixed_targets(one_hot, permutation, 0.7, swap=True)
    np.testing.assert_allclose(swapped[0], [0.3, 0.0, 0.7], rtol=1e-6)


def test_soft_cross_entropy_is_the_lambda_weighted_hard_loss():
    logits = jax.random.normal(jax.random.PRNGKey(1), (5, 7))
    labels = jnp.array([0, 3, 6, 2, 2])
    permutation = jnp.array([4, 3, 2, 1, 0])
    lam = 0.3
    targets = mixup.mixed_targets(jax.nn.one_hot(labels, 7), permutation, lam)
    hard = optax.softmax_cross_entropy_with_integer_labels
    expected = lam * hard(logits, labels) + (1 - lam) * hard(logits, labels[permutation])
    np.testing.assert_allclose(losses.soft_cross_entropy(logits, targets), expected, rtol=1e-5)


def test_unaligned_feature_mixing_mixes_each_pair():
    features = random_features()
    permutation = jnp.array([1, 2, 3, 4, 5, 0])
    mixed, plan = mixup.mix_features(features, permutation, 0.3, swap=False, align=False,
                                     epsilon=0.1, num_iters=100)
    assert plan is None
    np.testing.assert_allclose(mixed, 0.3 * features + 0.7 * features[permutation], rtol=1e-6)


def test_aligned_feature_mixing_is_eq_12():
    features = random_features()
    permutation = jnp.array([3, 0, 5, 1, 2, 4])
    mixed, plan = mixup.mix_features(features, permutation, 0.4, swap=False, **ALIGN)
    partner = features[permutation]
    expected_plan = alignment.transport_plan(features, partner)
    np.testing.assert_allclose(plan, expected_plan, rtol=1e-6, atol=1e-9)
    aligned = alignment.align(features, partner)
    np.testing.assert_allclose(mixed, 0.4 * features + 0.6 * aligned, rtol=1e-5, atol=1e-6)
    assert mixed.shape == features.shape and plan.shape == (6, 16, 16)


@pytest.mark.parametrize('lam', [0.0, 1.0])
def test_aligned_feature_mixing_endpoints(lam):
    features = random_features(seed=2)
    permutation = jnp.array([5, 4, 3, 2, 1, 0])
    mixed, _ = mixup.mix_features(features, permutation, lam, swap=False, **ALIGN)
    expected = features if lam == 1.0 else alignment.align(features, features[permutation])
    np.testing.assert_allclose(mixed, expected, rtol=1e-5, atol=1e-6)


def test_feature_prime_is_feature_on_the_swapped_pair():
    features = random_features(seed=4)
    permutation = jnp.array([2, 5, 0, 1, 3, 4])
    inverse = jnp.argsort(permutation)
    mixed_prime, plan_prime = mixup.mix_features(features, permutation, 0.35, swap=True, **ALIGN)
    # Swapping (x, x') and (y, y') turns the pairs (i, pi(i)) into (pi(i), i): the feature mode
    # on the permuted batch, paired back by the inverse permutation.
    mixed, plan = mixup.mix_features(features[permutation], inverse, 0.35, swap=False, **ALIGN)
    np.testing.assert_allclose(mixed_prime, mixed, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(plan_prime, plan, rtol=1e-6, atol=1e-9)
    one_hot = jax.nn.one_hot(jnp.array([0, 1, 2, 3, 4, 5]), 6)
    np.testing.assert_allclose(
        mixup.mixed_targets(one_hot, permutation, 0.35, swap=True),
        mixup.mixed_targets(one_hot[permutation], inverse, 0.35), rtol=1e-6)


def test_validate_modes_rejects_unknown_names():
    assert mixup.validate_modes(['input', 'input', 'feature']) == ('input', 'input', 'feature')
    with pytest.raises(ValueError, match='config.mixup.modes'):
        mixup.validate_modes(('input', 'puzzlemix'))
    with pytest.raises(ValueError, match='config.mixup.modes'):
        mixup.validate_modes(())


def test_average_pooling_forgets_the_alignment():
    # Why f starts with BatchNorm + ReLU (config.model.head_norm): the plan's column sums are
    # exact after its last (column) update, so the spatial mean of A aligned to A' is the mean
    # of A' itself, and behind a purely linear head (pooling + FC, as in the public code) the
    # aligned feature mode would reduce to mixing pooled features. (The column sums are exact
    # up to float32 rounding in the plan, hence rtol 1e-3.)
    features = random_features(seed=5, shape=(4, 4, 4, 16)) * 10.0
    permutation = jnp.array([1, 2, 3, 0])
    aligned = alignment.align(features, features[permutation])
    np.testing.assert_allclose(aligned.mean(axis=(1, 2)),
                               features[permutation].mean(axis=(1, 2)), rtol=1e-3)
    assert float(jnp.max(jnp.abs(aligned - features[permutation]))) > 1.0


class Tokens(NamedTuple):
    """A transformer's representation as mixup sees it: patch grid and class token."""
    grid: jax.Array
    class_token: jax.Array | None


@pytest.mark.parametrize('lam', [0.3, 0.8])
def test_token_alignment_recovers_the_order_and_mixes_the_class_token_linearly(lam):
    # Example 1's patch tokens are example 0's in another order; distinct one-hot tokens make
    # the eps = 0.1 plan a permutation (cost 2 between different tokens, 0 for the same one).
    order = jax.random.permutation(jax.random.PRNGKey(5), 16)
    grid = jnp.eye(16).reshape(4, 4, 16)
    shuffled = grid.reshape(16, 16)[order].reshape(4, 4, 16)
    class_tokens = jax.random.normal(jax.random.PRNGKey(6), (2, 16))
    tokens = Tokens(jnp.stack([grid, shuffled]), class_tokens)
    permutation = jnp.array([1, 0])
    mixed, plan = mixup.mix_features(tokens, permutation, lam, swap=False, **ALIGN)
    assert isinstance(mixed, Tokens)
    # Aligned to its partner, each anchor's grid gets its own tokens back in its own order, so
    # mixing changes nothing: the shuffled copy is put back in order and the other way round.
    np.testing.assert_allclose(mixed.grid, tokens.grid, atol=1e-6)
    # The plan couples position i of example 0 with where its token went in example 1.
    np.testing.assert_array_equal(np.argmax(plan[0], axis=1), np.argsort(order))
    np.testing.assert_array_equal(np.argmax(plan[1], axis=1), order)
    np.testing.assert_allclose(mixed.class_token[0],
                               lam * class_tokens[0] + (1 - lam) * class_tokens[1], rtol=1e-6)
    np.testing.assert_allclose(mixed.class_token[1],
                               lam * class_tokens[1] + (1 - lam) * class_tokens[0], rtol=1e-6)
    # Unaligned, the grids mix position by position; without a class token there is none.
    unaligned, no_plan = mixup.mix_features(Tokens(tokens.grid, None), permutation, lam,
                                            swap=False, align=False, epsilon=0.1, num_iters=100)
    assert no_plan is None and unaligned.class_token is None
    np.testing.assert_allclose(unaligned.grid[0], lam * grid + (1 - lam) * shuffled, rtol=1e-6)


def test_nt_xent_equals_the_hand_computed_value():
    # Two examples, two views, temperature 1: every embedding's positive has cosine 1 and its
    # two negatives cosine 0, so each term is -log(e / (e + 2)) = log(1 + 2 / e).
    axes = jnp.eye(2)
    assert float(losses.nt_xent(axes, axes, 1.0)) == pytest.approx(0.5514447139, rel=1e-6)
    # Temperature 0.5, second views [1, 1] / sqrt(2) and [0, 1] (c = cos 45 degrees = 0.7071):
    #   [1, 0]: positive c, negatives 0, 0:      -log(e^2c / (e^2c + 2))
    #   [0, 1] and its view [0, 1]: positive 1, negatives 0, c: -log(e^2 / (e^2 + 1 + e^2c))
    #   [1, 1] / sqrt(2): positive c, negatives c, c:   log 3
    # mean of the four: 0.6366709065.
    second = jnp.array([[1.0, 1.0], [0.0, 1.0]])
    assert float(losses.nt_xent(axes, second, 0.5)) == pytest.approx(0.6366709065, rel=1e-6)
    # Swapping the views or scaling an embedding changes nothing (cosine similarities).
    assert float(losses.nt_xent(second, 3 * axes, 0.5)) == pytest.approx(0.6366709065, rel=1e-6)


def test_alignment_effect_of_fixed_embeddings():
    unaligned = jnp.array([[3.0, 4.0], [0.0, 2.0]])
    aligned = jnp.array([[6.0, 8.0], [0.0, 3.0]])
    # ||(3, 4)|| / ||(3, 4)|| = 1 and ||(0, 1)|| / ||(0, 2)|| = 0.5.
    assert float(mixup.alignment_effect(aligned, unaligned)) == pytest.approx(0.75, rel=1e-6)
    assert float(mixup.alignment_effect(unaligned, unaligned)) == 0.0
    assert float(mixup.alignment_effect(jnp.zeros((2, 2)), jnp.zeros((2, 2)))) == 0.0


def _alignment_effect_of_head(head, lam=0.3):
    """(effect from mixup.alignment_effect, the same figure in float64 numpy, from the plans)."""
    features = random_features(seed=4)
    permutation = jnp.array([3, 0, 5, 1, 2, 4])
    aligned_mix, plan = mixup.mix_features(features, permutation, lam, swap=False, **ALIGN)
    unaligned_mix, _ = mixup.mix_features(features, permutation, lam, swap=False, align=False,
                                          epsilon=0.1, num_iters=100)
    effect = mixup.alignment_effect(head(aligned_mix), head(unaligned_mix))
    a = np.asarray(features, np.float64).reshape(6, 16, 8)
    partner = a[np.asarray(permutation)]
    assignment = 16 * np.asarray(plan, np.float64)
    aligned_np = lam * a + (1 - lam) * np.einsum('bij,bjc->bic', assignment, partner)
    unaligned_np = lam * a + (1 - lam) * partner
    shape = features.shape
    e_aligned = np.asarray(head(aligned_np.reshape(shape)), np.float64)
    e_unaligned = np.asarray(head(unaligned_np.reshape(shape)), np.float64)
    expected = np.mean(np.linalg.norm(e_aligned - e_unaligned, axis=-1)
                       / np.linalg.norm(e_unaligned, axis=-1))
    return float(effect), expected


HEAD_WEIGHTS = np.random.default_rng(5).normal(size=(4 * 4 * 8, 10))
HEAD_SHIFT = np.random.default_rng(6).normal(size=8)


def test_alignment_effect_is_zero_behind_pooling_then_linear():
    # R's columns sum to one, so the spatial mean of A' R^T is that of A'.
    effect, expected = _alignment_effect_of_head(
        lambda a: jnp.mean(jnp.asarray(a), axis=(1, 2)) @ HEAD_WEIGHTS[:8])
    assert abs(effect) < 1e-5 and abs(expected) < 1e-5


@pytest.mark.parametrize('head_name', ['affine_relu_then_pooling', 'flattened_linear'])
def test_alignment_effect_is_nonzero_behind_a_nonlinearity_or_a_flattened_f(head_name):
    heads = {
        # BatchNorm (a fixed affine map here) + ReLU before the pooling: the default head.
        'affine_relu_then_pooling': lambda a: jnp.mean(
            jnp.maximum(jnp.asarray(a) - HEAD_SHIFT, 0.0), axis=(1, 2)),
        # The paper's f: a linear layer on the whole A, positions kept.
        'flattened_linear': lambda a: jnp.asarray(a).reshape(6, -1) @ HEAD_WEIGHTS,
    }
    effect, expected = _alignment_effect_of_head(heads[head_name])
    assert expected > 0.01
    assert effect == pytest.approx(expected, rel=1e-4)


def test_align_and_mix_public_loop_and_reused_plan_match_their_formulas():
    features = jax.random.normal(jax.random.PRNGKey(3), (4, 2, 2, 5))
    permutation = jnp.array([2, 3, 0, 1])
    lam = 0.3
    options = dict(align=True, epsilon=0.1, num_iters=100, sinkhorn='public')
    plan, iterations = alignment.public_transport_plan(features, features[permutation])
    mixed, got_plan, got_iterations = mixup.align_and_mix(
        features, permutation, lam, swap=False, prime_plan='reuse', **options)
    np.testing.assert_allclose(got_plan, plan, rtol=1e-4, atol=1e-6)
    assert int(got_iterations) == int(iterations)
    np.testing.assert_allclose(mixed, lam * features + (1 - lam) * alignment.apply_plan(
        plan, features[permutation]), atol=1e-5)
    # feat' reusing the plan of A to A': lam A R + (1 - lam) A', targets not swapped.
    mixed_prime, _, _ = mixup.align_and_mix(features, permutation, lam, swap=True,
                                            prime_plan='reuse', **options)
    positions = features.reshape(4, 4, 5)
    a_r = jnp.einsum('bij,bic->bjc', 4 * plan, positions).reshape(features.shape)
    np.testing.assert_allclose(mixed_prime, lam * a_r + (1 - lam) * features[permutation],
                               atol=1e-5)
    assert not mixup.targets_swapped('feature_prime', 'reuse')
    assert mixup.targets_swapped('feature_prime', 'fresh')
    with pytest.raises(ValueError, match="config.mixup.sinkhorn must be one of"):
        mixup.align_and_mix(features, permutation, lam, swap=False, align=True, epsilon=0.1,
                            num_iters=10, sinkhorn='ott')
