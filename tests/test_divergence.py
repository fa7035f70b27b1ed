"""The divergence check's parts on fixed inputs: finiteness, the loss explosion, the advice."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import checkpointing, config_checks, data, divergence, train, train_step
from configs import demo
from tests.conftest import make_tiny_config
from tests.test_train import restore_params

NAN, INF = float('nan'), float('inf')


def tree(**overrides):
    params = {'encoder': {'kernel': jnp.ones((3, 3)), 'bias': jnp.zeros(3)},
              'classifier': {'kernel': jnp.full((3, 2), 0.5, jnp.bfloat16)}}
    batch_stats = {'mean': jnp.zeros(3), 'var': jnp.ones(3)}
    metrics = {'loss': jnp.float32(2.3), 'marginal_error': jnp.float32(1e-7)}
    extra = {'step': jnp.int32(7), 'rng': jax.random.key(0)}  # skipped: not floating point
    parts = {'params': params, 'batch_stats': batch_stats, 'metrics': metrics}
    for path, value in overrides.items():
        group, name = path.split('/')
        parts[group] = {**parts[group], name: value}
    return parts['params'], parts['batch_stats'], parts['metrics'], extra


@pytest.mark.parametrize('overrides, expected', [
    ({}, True),
    ({'batch_stats/var': jnp.array([1.0, NAN, 1.0])}, False),
    ({'params/classifier': {'kernel': jnp.array([[INF]], jnp.bfloat16)}}, False),
    ({'metrics/marginal_error': jnp.float32(NAN)}, False),
    ({'metrics/loss': jnp.float32(-INF)}, False),
])
def test_all_finite_is_one_boolean_over_every_floating_leaf(overrides, expected):
    trees = tree(**overrides)
    eager = divergence.all_finite(*trees)
    jitted = jax.jit(divergence.all_finite)(*trees)
    assert eager.shape == jitted.shape == () and eager.dtype == jitted.dtype == jnp.bool_
    assert bool(eager) is bool(jitted) is expected
    assert bool(divergence.all_finite({'step': jnp.int32(3)})) is True  # no float leaf


@pytest.mark.parametrize('metrics, expected', [
    ({'loss': 2.3, 'accuracy': 0.1, 'marginal_error': 1e-6, 'state_finite': True}, None),
    # The plan comes first in the step: a NaN plan that made the loss NaN is the plan.
    ({'loss': NAN, 'accuracy': 0.0, 'marginal_error': NAN, 'state_finite': False},
     'marginal_error'),
    ({'loss': INF, 'accuracy': 0.1, 'lambda': 0.3, 'state_finite': False}, 'loss'),
    ({'reconstruction_loss': 0.2, 'kl_divergence': NAN}, 'kl_divergence'),
    ({'loss': 2.3, 'accuracy': 0.1, 'state_finite': False},
     'the parameters or BatchNorm statistics'),
])
def test_first_non_finite_follows_the_order_of_the_step(metrics, expected):
    assert divergence.first_non_finite(metrics) == expected


def test_the_reference_is_the_lowest_running_median_of_the_mode():
    detector = divergence.LossExplosionDetector(1000.0, window=3)
    # Medians of the last three: 4, 3, 3, 2 (of 2, 3, 1); the lowest so far is kept.
    for loss, reference in [(4.0, 4.0), (2.0, 3.0), (3.0, 3.0), (1.0, 2.0), (5.0, 2.0)]:
        assert detector.observe('input', loss) is False
        assert detector.reference('input') == reference
    assert detector.observe('input', 2000.0) is False  # 1000 x 2 exactly: not above it
    assert detector.observe('input', 2000.5) is True
    assert detector.reference('clean') is None  # each mode has its own scale
    assert detector.observe('clean', 2000.5) is False  # the first loss of a mode


def test_the_floor_keeps_a_near_zero_loss_from_tripping_on_normal_spikes():
    detector = divergence.LossExplosionDetector(1000.0)
    for _ in range(10):
        detector.observe('none', 1e-4)  # a fitted baseline
    assert detector.observe('none', 0.05) is False  # 500 x the median, below 1000 x 0.01
    assert detector.observe('none', 9.99) is False
    assert detector.observe('none', 10.01) is True


def test_a_slow_climb_cannot_drag_the_reference_up():
    detector = divergence.LossExplosionDetector(1000.0)
    tripped = next(k for k in range(1000) if detector.observe('input', 1.05 ** k))
    # The lowest median is the first loss, 1: the climb trips once it passes 1000.
    assert tripped == next(k for k in range(1000) if 1.05 ** k > 1000) == 142


def test_find_divergence_names_step_mode_and_value():
    modes = ['input', 'feature', 'feature', 'embedding']
    healthy = {'loss': 2.0, 'accuracy': 0.2, 'state_finite': True}
    metrics = [healthy, {**healthy, 'marginal_error': 1e-6},
               {'loss': NAN, 'accuracy': 0.0, 'marginal_error': NAN, 'state_finite': False},
               healthy]
    found = divergence.find_divergence(11, modes, metrics)
    assert found == divergence.Divergence(step=13, mode='feature', what='marginal_error',
                                          value=found.value)
    assert math.isnan(found.value)
    assert str(found) == "train/marginal_error became nan at step 13 (mode 'feature')"

    metrics[2] = {**healthy, 'state_finite': False}
    assert str(divergence.find_divergence(11, modes, metrics)) == (
        "the parameters or BatchNorm statistics became non-finite at step 13 (mode "
        "'feature'), with finite metrics")

    metrics[2] = {**healthy, 'loss': 3e4}
    detector = divergence.LossExplosionDetector(1000.0)
    for _ in range(5):
        detector.observe('feature', 2.0)
    found = divergence.find_divergence(11, modes, metrics, detector)
    assert (found.step, found.what, found.value, found.reference) == (13, 'loss', 3e4, 2.0)
    assert str(found) == ("the training loss exploded at step 13 (mode 'feature'): 3e+04, its "
                          "running median 2")
    assert divergence.find_divergence(11, modes[:2], metrics[:2], detector) is None


def test_advice_fits_the_run():
    config = demo.get_config()  # float32, learning rate 0.1, epsilon 0.1
    loss = divergence.Divergence(step=5, mode='input', what='loss', value=NAN)
    assert divergence.advice(config, loss) == (
        'lower the learning rate (--config.train.learning_rate=0.01, now 0.1); then restart with '
        '--config.train.allow_config_change=True')
    config.model.dtype = 'bfloat16'
    assert divergence.advice(config, loss) == (
        'lower the learning rate (--config.train.learning_rate=0.01, now 0.1); or train in '
        'float32 (--config.model.dtype=float32); then restart with '
        '--config.train.allow_config_change=True')
    config.model.dtype = 'float32'
    plan = divergence.Divergence(step=5, mode='feature', what='marginal_error', value=NAN)
    assert divergence.advice(config, plan) == (
        "the Sinkhorn plan was the first non-finite value: raise the alignment's entropic "
        'regularisation (--config.mixup.epsilon=0.2, now 0.1) or leave out the feature modes '
        '(config.mixup.modes); or lower the learning rate (--config.train.learning_rate=0.01, '
        'now 0.1); then restart with '
        '--config.train.allow_config_change=True')


# The check in the training loop, on the tiny config (4 steps an epoch, a fetch every 2).


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(make_tiny_config().dataset)


def checkpoint_listing(workdir):
    return sorted(path.name for path in (workdir / 'checkpoints').iterdir())


def train_one_good_epoch(config, workdir, demo_dataset):
    """Trains epoch 0 (checkpoints 2 and 4); returns the restored state of step 4."""
    config.train.num_epochs = 1
    config.train.keep_checkpoints = 2  # a third save would delete step 2
    train.train_and_evaluate(config, str(workdir))
    assert checkpoint_listing(workdir) == ['2', '4']
    state, _, step = restore_params(str(workdir), config, demo_dataset)
    assert step == 4
    return state


def assert_every_checkpoint_finite(workdir, config, demo_dataset):
    for step in checkpoint_listing(workdir):
        state = restore_params(str(workdir), config, demo_dataset, step=int(step))[0]
        assert bool(divergence.all_finite(state.params, state.batch_stats)), step


def test_a_diverging_run_stops_before_saving_and_names_its_finite_checkpoint(tmp_path,
                                                                             demo_dataset):
    config, workdir = make_tiny_config(), tmp_path / 'run'
    good_state = train_one_good_epoch(config, workdir, demo_dataset)
    config.train.num_epochs = 3
    config.train.learning_rate = 1e6
    config.train.allow_config_change = True
    with pytest.raises(FloatingPointError) as stop:
        train.train_and_evaluate(config, str(workdir))
    # Steps 5 and 6 stayed finite and within the factor, so step 6 was saved (and the rotation
    # deleted step 2); step 7's update overflowed, and step 8's save was refused.
    assert str(stop.value) == (
        "the parameters or BatchNorm statistics became non-finite at step 7 (mode 'input'), "
        "with finite metrics; stopped without saving: the newest checkpoint, all finite, is "
        f"step 6 ({workdir}/checkpoints/6). To go on: lower the learning rate "
        "(--config.train.learning_rate=100000, now 1e+06); then restart with "
        "--config.train.allow_config_change=True")
    # A save of step 8 would have rotated step 4 out: nothing was written, nothing deleted.
    assert checkpoint_listing(workdir) == ['4', '6']
    state, _, step = restore_params(str(workdir), config, demo_dataset)  # the one it names
    assert step == 6
    assert bool(divergence.all_finite(state.params, state.batch_stats))
    kept = restore_params(str(workdir), config, demo_dataset, step=4)[0]
    jax.tree.map(np.testing.assert_array_equal, kept.params, good_state.params)
    assert_every_checkpoint_finite(workdir, config, demo_dataset)


def test_a_nan_plan_stops_the_run_at_that_step(tmp_path, monkeypatch, demo_dataset):
    config, workdir = make_tiny_config(), tmp_path / 'run'
    config.mixup.modes = ('feature',)
    train_one_good_epoch(config, workdir, demo_dataset)
    config.train.num_epochs = 2
    config.mixup.epsilon = 0.0  # ott's Sinkhorn divides by it: a NaN plan
    config.train.allow_config_change = True
    with pytest.raises(ValueError, match=r'config.mixup.epsilon must be > 0'):
        train.train_and_evaluate(config, str(workdir))
    # Past the settings check (as a config made in code and trained without it would be).
    monkeypatch.setattr(config_checks, 'validate', lambda config, num_devices=None: None)
    with pytest.raises(FloatingPointError) as stop:
        train.train_and_evaluate(config, str(workdir))
    # Step 5 is the first step of the resumed run: it stops there, not at the end.
    assert str(stop.value).startswith(
        "train/marginal_error became nan at step 5 (mode 'feature'); stopped without saving: "
        f"the newest checkpoint, all finite, is step 4 ({workdir}/checkpoints/4). To go on: "
        "the Sinkhorn plan was the first non-finite value: raise the alignment's entropic "
        "regularisation (--config.mixup.epsilon=0.1, now 0)")
    assert checkpoint_listing(workdir) == ['2', '4']
    assert_every_checkpoint_finite(workdir, config, demo_dataset)


def test_a_non_finite_checkpoint_is_not_resumed(tmp_path, demo_dataset):
    config, workdir = make_tiny_config(), tmp_path / 'run'
    model = train_step.build_training_model(config, demo_dataset)
    state = train_step.create_train_state(config, model, demo_dataset.image_shape, 4)
    state = state.replace(params=jax.tree.map(lambda leaf: leaf * np.nan, state.params))
    manager = checkpointing.make_manager(str(workdir))
    checkpointing.save(manager, 0, state, {'best_test_accuracy': None, 'best_epoch': None})
    manager.wait_until_finished()
    with pytest.raises(checkpointing.CheckpointError, match=r'\(step 0\) holds non-finite '
                                                            r'parameters or statistics'):
        train.train_and_evaluate(config, str(workdir))
    assert checkpoint_listing(workdir) == ['0']
