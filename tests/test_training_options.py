"""timm's mixup options in the training step and loop: the soft targets each step
trains on, one compile per mode with one lambda per pair, and the schedule of mixed batches."""

import jax
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.method import losses, mixup
from alignmix_jax.models import build_model
from alignmix_jax.runtime import sharding
from alignmix_jax.training import train, train_step
from tests.conftest import make_tiny_config

# Slow (left out by -m "not slow"): trains the step and the loop with timm's mixup options.
pytestmark = pytest.mark.slow

SMOOTHING = 0.1


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(make_tiny_config().dataset)


def expected_targets(mode, labels, num_classes, permutation, lam):
    """Eq. (1) on timm's smoothed labels, written out in numpy: lam_i y_i + (1 - lam_i) y_pi(i)
    (y_pi(i) first for the swapped modes), y = 1 - s + s/k on the class and s/k elsewhere."""
    smoothed = np.full((len(labels), num_classes), SMOOTHING / num_classes)
    smoothed[np.arange(len(labels)), labels] += 1 - SMOOTHING
    if mode == 'none':
        return smoothed
    first, second = smoothed, smoothed[permutation]
    if mode in mixup.SWAPPED_MODES:
        first, second = second, first
    lam = np.asarray(lam, np.float64)[:, None]
    return lam * first + (1 - lam) * second


def cross_entropy(logits, targets):
    logits = np.asarray(logits, np.float64)
    log_softmax = logits - logits.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    return float(np.mean(-(targets * log_softmax).sum(-1)))


@pytest.mark.parametrize('mode', ['none', 'input', 'embedding', 'feature', 'feature_prime',
                                  'hidden1', 'embedding_tensor', 'embedding_tensor_prime',
                                  'cutmix'])
def test_the_step_trains_on_smoothed_per_example_targets_and_compiles_once(
        mode, demo_dataset, monkeypatch):
    config = make_tiny_config()
    config.mixup.label_smoothing = SMOOTHING
    config.mixup.lambda_per = 'example'
    config.mixup.modes = (mode,)
    if mode in mixup.TENSOR_EMBEDDING_MODES:
        config.model.embedding_tensor_channels = 8
    # The logits the step's loss sees, fetched from inside the compiled step.
    seen_logits = []
    soft_cross_entropy = losses.soft_cross_entropy

    def recording_cross_entropy(logits, targets):
        jax.debug.callback(lambda value: seen_logits.append(np.asarray(value)), logits)
        return soft_cross_entropy(logits, targets)

    monkeypatch.setattr(losses, 'soft_cross_entropy', recording_cross_entropy)
    model = build_model(config.model, demo_dataset.num_classes)
    images, labels = demo_dataset.train.images[:16], demo_dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    state = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)
    run_key = jax.device_get(state.rng)
    state, first_metrics = step_fn(state, images, labels, mode=mode)
    first_metrics = jax.device_get(first_metrics)

    # Step 0's draws, from the run key as the step folds it (step 0, device 0).
    device_key = jax.random.fold_in(jax.random.fold_in(run_key, 0), 0)
    _, pairing_key = jax.random.split(device_key)
    permutation, lam = mixup.sample_pairing(pairing_key, 16, config.mixup.alpha,
                                            lambda_per='example')
    assert lam.shape == (16,)
    if mode == mixup.CUTMIX_MODE:  # each pair's lambda is the share of its own box left
        box_key = jax.random.fold_in(device_key, train_step.CUTMIX_BOX_STREAM)
        lam = mixup.cutmix(box_key, images, permutation, lam)[1]
    permutation, lam = np.asarray(permutation), np.asarray(lam)
    targets = expected_targets(mode, labels, demo_dataset.num_classes, permutation, lam)
    expected_loss = cross_entropy(seen_logits[0], targets)
    assert float(first_metrics['loss']) == pytest.approx(expected_loss, rel=2e-5)
    if mode == 'none':
        assert 'lambda' not in first_metrics
    else:
        assert float(first_metrics['lambda']) == pytest.approx(float(lam.mean()), rel=1e-5)
        # The options matter: hard labels, or one lambda (the mean) for the batch, give
        # losses this test would tell apart.
        hard = expected_targets(mode, labels, demo_dataset.num_classes, permutation, lam)
        hard = (hard - SMOOTHING / demo_dataset.num_classes) / (1 - SMOOTHING)
        one_lambda = expected_targets(mode, labels, demo_dataset.num_classes, permutation,
                                      np.full(16, lam.mean()))
        for other in (hard, one_lambda):
            assert abs(cross_entropy(seen_logits[0], other) - expected_loss) > 1e-3
    assert bool(first_metrics['state_finite'])

    # Step 1 draws other lambdas (traced values): the same program, no recompile.
    _, second_metrics = step_fn(state, images, labels, mode=mode)
    if mode != 'none':
        assert float(second_metrics['lambda']) != float(first_metrics['lambda'])
    assert step_fn._cache_size() == 1


def test_probability_and_off_epoch_turn_batches_into_none_and_log_its_share(monkeypatch,
                                                                           tmp_path):
    config = make_tiny_config()  # 4 steps an epoch, metrics fetched every 2 steps
    config.mixup.probability = 0.5
    config.mixup.off_epoch = 1  # the second epoch (steps 5-8) trains clean
    modes_trained, summaries = [], []
    make_step = train.make_train_step

    def recording_make_step(*args, **kwargs):
        step_fn = make_step(*args, **kwargs)

        def recording_step(state, images, labels, mode):
            modes_trained.append(mode)
            return step_fn(state, images, labels, mode=mode)
        return recording_step

    flush = train._MetricBuffer.flush

    def recording_flush(self, *args, **kwargs):
        summary, found = flush(self, *args, **kwargs)
        summaries.append(summary)
        return summary, found

    monkeypatch.setattr(train, 'make_train_step', recording_make_step)
    monkeypatch.setattr(train._MetricBuffer, 'flush', recording_flush)
    train.train_and_evaluate(config, str(tmp_path / 'run'))

    drawn = [train.choose_mode(train.training_modes(config), config.seed, step)
             for step in range(1, 9)]
    assert modes_trained[4:] == ['none'] * 4
    # Before off_epoch each batch is the drawn mode or, with probability 1/2, clean.
    assert all(trained in (mode, 'none') for trained, mode in zip(modes_trained, drawn,
                                                                  strict=True))
    assert modes_trained[:4].count('none') not in (0, 4)  # seed 0 has both in epoch 0
    fractions = [summary['train/mode_fraction/none'] for summary in summaries]
    assert fractions == [modes_trained[i:i + 2].count('none') / 2 for i in range(0, 8, 2)]
