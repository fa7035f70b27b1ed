"""The divergence check's parts on fixed inputs: finiteness, the loss explosion, the advice."""

import math
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.runtime import checkpointing
from alignmix_jax.settings import config_checks
from alignmix_jax.training import divergence, train, train_step
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


@pytest.fixture(scope='module')
def good_epoch(tmp_path_factory, demo_dataset):
    """Epoch 0 of the tiny run, trained once: its workdir (checkpoints 2 and 4) and the
    parameters of step 4. Each test below resumes its own copy for epochs 1 and 2."""
    workdir = tmp_path_factory.mktemp('good_epoch') / 'run'
    state = train_one_good_epoch(make_tiny_config(), workdir, demo_dataset)
    return workdir, jax.device_get(state.params)


def resume_until_it_stops(good_epoch, tmp_path, demo_dataset, learning_rate=0.1):
    """Resumes a copy of the good epoch for two more epochs, which must stop on a divergence
    at step 7. Checks what the stop promises whichever detector fired: nothing saved or
    rotated, the newest checkpoint finite and named; returns the message and the workdir.

    Of the modes drawn for steps 5-8 (seed 0, asserted below), step 7 is the second 'input'
    step of the resumed run, so the loss explosion detector has a reference for it (step 6's
    loss).
    """
    good_workdir, good_params = good_epoch
    workdir = tmp_path / 'run'
    shutil.copytree(good_workdir, workdir)
    config = make_tiny_config()
    config.train.num_epochs = 3
    config.train.keep_checkpoints = 2
    config.train.learning_rate = learning_rate
    config.train.allow_config_change = True  # the learning rate may change on resume
    assert [train.choose_mode(train.training_modes(config), config.seed, step)
            for step in range(5, 9)] == ['feature_prime', 'input', 'input', 'input']
    with pytest.raises(FloatingPointError) as stop:
        train.train_and_evaluate(config, str(workdir))
    message = str(stop.value)
    # Steps 5 and 6 were checked and step 6 saved (the rotation deleted step 2); step 7
    # diverged, so step 8's save, which would have rotated step 4 out, was refused.
    assert message.endswith(
        f'; stopped without saving: the newest checkpoint, all finite, is step 6 '
        f'({workdir}/checkpoints/6). To go on: lower the learning rate '
        f'(--config.train.learning_rate={learning_rate / 10:g}, now {learning_rate:g}); '
        'then restart with --config.train.allow_config_change=True'), message
    assert checkpoint_listing(workdir) == ['4', '6']
    state, _, step = restore_params(str(workdir), config, demo_dataset)  # the one it names
    assert step == 6
    kept = restore_params(str(workdir), config, demo_dataset, step=4)[0]
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(kept.params), good_params)
    assert_every_checkpoint_finite(workdir, config, demo_dataset)
    return message, workdir


@pytest.mark.slow  # trains runs until they diverge (see docs/testing.md)
def test_an_update_that_overflows_stops_the_run_on_the_state_check(good_epoch, tmp_path,
                                                                    monkeypatch, demo_dataset):
    # Step 7's gradients become infinite inside the jitted step, after its loss and metrics
    # (finite): the new parameters are non-finite on every CPU, and only the step's own
    # all_finite of its new state can see it.
    apply_gradients = train_step.apply_gradients

    def apply_overflowing_gradients(state, grads, batch_stats, frozen):
        grads = jax.tree.map(lambda grad: jnp.where(state.step + 1 == 7, jnp.inf, grad), grads)
        return apply_gradients(state, grads, batch_stats, frozen)

    monkeypatch.setattr(train_step, 'apply_gradients', apply_overflowing_gradients)
    message, workdir = resume_until_it_stops(good_epoch, tmp_path, demo_dataset)
    assert message == (
        "the parameters or BatchNorm statistics became non-finite at step 7 (mode 'input'), "
        "with finite metrics; stopped without saving: the newest checkpoint, all finite, is "
        f"step 6 ({workdir}/checkpoints/6). To go on: lower the learning rate "
        "(--config.train.learning_rate=0.01, now 0.1); then restart with "
        "--config.train.allow_config_change=True")


@pytest.mark.slow  # trains runs until they diverge (see docs/testing.md)
def test_an_exploding_loss_stops_the_run_on_the_explosion_detector(good_epoch, tmp_path,
                                                                   monkeypatch, demo_dataset):
    # Step 7 reports a loss of 1e9, finite and far above 1000 times step 6's (about 2.3, an
    # untrained classifier's): only the detector can see it, the state stays finite.
    make_train_step, losses = train.make_train_step, {}

    def make_step_with_exploding_loss(*args, **kwargs):
        compiled = make_train_step(*args, **kwargs)

        def step(state, images, labels, mode):
            number = int(state.step) + 1  # before the step donates the state
            state, step_metrics = compiled(state, images, labels, mode=mode)
            if number == 7:
                step_metrics = {**step_metrics, 'loss': jnp.float32(1e9)}
            losses[number] = float(step_metrics['loss'])
            return state, step_metrics

        return step

    monkeypatch.setattr(train, 'make_train_step', make_step_with_exploding_loss)
    message, workdir = resume_until_it_stops(good_epoch, tmp_path, demo_dataset)
    # The loop checks at step 8's fetch, which covers steps 7 and 8.
    assert sorted(losses) == [5, 6, 7, 8] and 1.0 < losses[6] < 5.0, losses
    # The reference is the running median of the resumed run's 'input' losses: step 6's.
    assert message == (
        f"the training loss exploded at step 7 (mode 'input'): 1e+09, its running median "
        f"{losses[6]:.4g}; stopped without saving: the newest checkpoint, all finite, is "
        f"step 6 ({workdir}/checkpoints/6). To go on: lower the learning rate "
        "(--config.train.learning_rate=0.01, now 0.1); then restart with "
        "--config.train.allow_config_change=True")


@pytest.mark.slow  # trains runs until they diverge (see docs/testing.md)
def test_a_learning_rate_that_diverges_stops_at_its_first_diverged_step(good_epoch, tmp_path,
                                                                        demo_dataset):
    # A real divergence: at 1e6 the loss of step 6 is ~1e8 and step 7 diverges. Which of the
    # checks sees it first depends on the CPU's float32 rounding (on an AVX2 CPU step 7's
    # loss was 8e15 with finite parameters; on an AVX-512 one its update overflowed to
    # infinity with a finite loss), so only the step and what follows are asserted; each
    # check is tested exactly by the two tests above.
    message, _ = resume_until_it_stops(good_epoch, tmp_path, demo_dataset, learning_rate=1e6)
    assert re.match(r"(the parameters or BatchNorm statistics became non-finite|the training "
                    r"loss exploded|train/\w+ became (nan|inf|-inf)) at step 7 \(mode 'input'\)"
                    r"[,:;]", message), message


@pytest.mark.slow  # trains runs until they diverge (see docs/testing.md)
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


@pytest.mark.slow  # trains runs until they diverge (see docs/testing.md)
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
