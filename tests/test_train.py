"""The train step, the training loop, resuming, and the errors a user can run into."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.data import augmentation
from alignmix_jax.evaluation import classification
from alignmix_jax.evaluation import common as evaluation_common
from alignmix_jax.method import losses, mixup
from alignmix_jax.models import build_model
from alignmix_jax.runtime import checkpointing, sharding
from alignmix_jax.training import train, train_step
from tests.conftest import REPO_ROOT, fit_one_batch, make_tiny_config

# Slow (left out by -m "not slow"): each test trains or resumes a run of the tiny demo.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(make_tiny_config().dataset)


def restore_params(workdir, config, dataset, step=None):
    model = build_model(config.model, dataset.num_classes, image_shape=dataset.image_shape,
                        normalization=(config.dataset.mean, config.dataset.std))
    steps_per_epoch = data.steps_per_epoch(len(dataset.train.labels),
                                                     config.train.batch_size)
    abstract = train_step.create_train_state(config, model, dataset.train.images.shape[1:],
                                        steps_per_epoch)
    manager = checkpointing.make_manager(workdir, read_only=True)
    state, progress, step = checkpointing.restore_latest(manager, abstract, step=step,
                                                         required=True)
    return state, progress, step


def test_each_mode_lowers_the_loss_on_a_fixed_batch_and_compiles_once(demo_dataset):
    config = make_tiny_config()
    model = build_model(config.model, demo_dataset.num_classes)
    images = demo_dataset.train.images[:16]
    labels = demo_dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)  # the training loop's own step
    for mode in mixup.MODES:
        first_metrics, later_metrics, _, _ = fit_one_batch(step_fn, config, model, images,
                                                           labels, mesh, mode, updates=8)
        assert float(later_metrics['loss']) < 0.8 * float(first_metrics['loss']), mode
        if mode in mixup.FEATURE_MODES:
            assert np.isfinite(float(first_metrics['marginal_error']))
        else:
            assert 'marginal_error' not in first_metrics
    assert step_fn._cache_size() == len(mixup.MODES)


def test_modes_are_drawn_uniformly_and_reproducibly():
    modes = ('input', 'embedding', 'feature', 'feature_prime')
    draws = [train.choose_mode(modes, 0, step) for step in range(4000)]
    assert draws == [train.choose_mode(modes, 0, step) for step in range(4000)]
    counts = np.array([draws.count(mode) for mode in modes])
    assert np.all(np.abs(counts - 1000) < 100), counts
    assert draws != [train.choose_mode(modes, 1, step) for step in range(4000)]
    # With the AlignMix + CutMix option off, the draws are exactly the ones above.
    assert draws == [train.choose_mode(modes, 0, step, 0.0) for step in range(4000)]


@pytest.mark.parametrize('probability', [0.5, 0.2, 1.0])
def test_alignmix_cutmix_draws_cutmix_with_probability_p(probability):
    modes = ('input', 'embedding', 'feature', 'feature_prime')
    steps = 10000
    draws = [train.choose_mode(modes, 3, step, probability) for step in range(steps)]
    share = draws.count('cutmix') / steps
    # Within 4 standard errors of a binomial share (0 when p = 1: every batch is CutMix).
    assert abs(share - probability) <= 4 * np.sqrt(probability * (1 - probability) / steps)
    others = np.array([draws.count(mode) for mode in modes])
    expected = (1 - probability) * steps / len(modes)
    assert np.all(np.abs(others - expected) <= 4 * np.sqrt(expected) + 1e-9), others


def test_cutmix_probability_outside_0_1_is_an_error(tmp_path):
    config = make_tiny_config()
    config.mixup.cutmix_probability = 1.5
    with pytest.raises(ValueError, match=r'cutmix_probability must be a probability in '
                                         r'\[0, 1\]; got 1.5'):
        train.train_and_evaluate(config, str(tmp_path / 'run'))


def test_contrastive_term_adds_its_weighted_nt_xent_to_the_step_loss(demo_dataset):
    config = make_tiny_config()
    model = build_model(config.model, demo_dataset.num_classes)
    images, labels = demo_dataset.train.images[:16], demo_dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    losses, contrastive = {}, None
    for weight in (0.0, 0.5):
        config.train.contrastive_weight = weight
        step_fn = train_step.make_train_step(model, config, mesh)
        state = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)
        _, step_metrics = step_fn(state, images, labels, mode='feature')
        losses[weight] = float(step_metrics['loss'])
        if weight == 0:
            assert 'contrastive_loss' not in step_metrics
        else:
            contrastive = float(step_metrics['contrastive_loss'])
    # The mixup forward is the same in both steps: the difference is the weighted term alone.
    # Two different views of 16 images: NT-Xent lies between 0 and log(2N - 1) + 2 / T.
    assert 0 < contrastive < np.log(31) + 2 / config.train.contrastive_temperature
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * contrastive, rel=1e-5)


def test_optimizer_is_torch_sgd_with_the_step_schedule():
    config = make_tiny_config().train
    config.learning_rate, config.momentum, config.weight_decay = 0.1, 0.9, 0.01
    config.lr_decay_epochs, config.lr_decay_factor = (2, 3), 0.1
    optimizer, schedule = train_step.make_optimizer(config, steps_per_epoch=5)
    assert [float(schedule(step)) for step in (0, 9, 10, 14, 15)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001])
    # torch.optim.SGD: g += wd * p; buf = momentum * buf + g; p -= lr * buf.
    params = jnp.array([1.0, -2.0])
    gradients = [jnp.array([0.5, 0.25]), jnp.array([-1.0, 2.0])]
    opt_state = optimizer.init(params)
    expected, buffer = np.array([1.0, -2.0]), np.zeros(2)
    for gradient in gradients:
        updates, opt_state = optimizer.update(gradient, opt_state, params)
        params = params + updates
        buffer = 0.9 * buffer + (np.asarray(gradient) + 0.01 * expected)
        expected = expected - 0.1 * buffer
    np.testing.assert_allclose(params, expected, rtol=1e-6)


def test_classifier_can_have_its_own_learning_rate():
    config = make_tiny_config().train
    config.momentum, config.weight_decay = 0.0, 0.0
    config.learning_rate, config.classifier_learning_rate = 0.01, 0.1
    optimizer, schedule = train_step.make_optimizer(config, steps_per_epoch=5)
    params = {'encoder': {'kernel': jnp.ones(2)}, 'classifier': {'kernel': jnp.ones(3)}}
    gradients = jax.tree.map(jnp.ones_like, params)
    updates, _ = optimizer.update(gradients, optimizer.init(params), params)
    np.testing.assert_allclose(updates['encoder']['kernel'], -0.01)
    np.testing.assert_allclose(updates['classifier']['kernel'], -0.1)
    assert float(schedule(0)) == pytest.approx(0.01)


def test_nesterov_momentum_is_torch_sgd_nesterov():
    config = make_tiny_config().train
    config.learning_rate, config.momentum, config.weight_decay = 0.1, 0.9, 0.0
    config.nesterov = True
    optimizer, _ = train_step.make_optimizer(config, steps_per_epoch=5)
    params = jnp.array([1.0])
    opt_state = optimizer.init(params)
    expected, buffer = 1.0, 0.0
    for gradient in (0.5, -1.0, 2.0):
        updates, opt_state = optimizer.update(jnp.array([gradient]), opt_state, params)
        params = params + updates
        # torch.optim.SGD(nesterov=True): buf = m * buf + g; p -= lr * (g + m * buf).
        buffer = 0.9 * buffer + gradient
        expected -= 0.1 * (gradient + 0.9 * buffer)
    np.testing.assert_allclose(params, [expected], rtol=1e-6)


def test_evaluation_counts_every_test_image_once(demo_dataset):
    config = make_tiny_config()
    model = build_model(config.model, demo_dataset.num_classes)
    state = train_step.create_train_state(config, model, (32, 32, 3), steps_per_epoch=4)
    context = evaluation_common.EvalContext(config=config, model=model, dataset=demo_dataset,
                                            mesh=sharding.make_mesh())
    test = demo_dataset.test
    # 1000 = 3 * 300 + 100: the last batch is padded. The evaluator is the training loop's.
    results = classification.Evaluator(context, batch_size=300).run(
        {'params': state.params, 'batch_stats': state.batch_stats})
    assert results['num_examples'] == len(test.labels) == 1000
    # The same accuracy computed image by image on the host.
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                         augmentation.normalize(test.images, config.dataset.mean,
                                                  config.dataset.std), train=False)
    expected = float(np.mean(np.argmax(np.asarray(logits), -1) == test.labels))
    assert results['accuracy'] == pytest.approx(expected, abs=1e-6)


# timm's four options on: their draws too must be those of the uninterrupted run.
TIMM_OPTIONS = {'label_smoothing': 0.1, 'probability': 0.5, 'off_epoch': 2,
                'lambda_per': 'example'}


@pytest.mark.parametrize('decoder, options', [('none', {}), ('ae', {}), ('none', TIMM_OPTIONS)])
def test_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch, demo_dataset, decoder,
                                                 options):
    config = make_tiny_config()  # 4 steps an epoch
    config.model.decoder = decoder  # 'ae': the clean mode too, and D in the checkpoint
    config.mixup.update(options)
    config.train.num_epochs = 3
    config.train.checkpoint_every_steps = 3
    uninterrupted = train.train_and_evaluate(config, str(tmp_path / 'uninterrupted'))

    # Kill the second run at step 8, in the middle of epoch 2: its last checkpoint is step 6.
    draw_mode = train.choose_mode

    def interrupted_draw(modes, seed, step, *args):
        if step == 8:
            raise KeyboardInterrupt
        return draw_mode(modes, seed, step, *args)

    monkeypatch.setattr(train, 'choose_mode', interrupted_draw)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    _, killed_progress, killed_step = restore_params(str(tmp_path / 'resumed'), config,
                                                     demo_dataset)
    assert killed_step == 6
    monkeypatch.setattr(train, 'choose_mode', draw_mode)
    resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
    # The training time goes on from the checkpoint's: the run's, not the last call's.
    assert killed_progress['train_seconds'] > 0
    assert resumed['train_seconds_before_resume'] == killed_progress['train_seconds']
    assert resumed['train_seconds'] > killed_progress['train_seconds']
    assert uninterrupted['train_seconds_before_resume'] == 0

    state_a, progress_a, step_a = restore_params(str(tmp_path / 'uninterrupted'), config,
                                                 demo_dataset)
    state_b, progress_b, step_b = restore_params(str(tmp_path / 'resumed'), config,
                                                 demo_dataset)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
    jax.tree.map(np.testing.assert_array_equal, state_a.batch_stats, state_b.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, state_a.opt_state, state_b.opt_state)
    assert resumed['final_test_accuracy'] == uninterrupted['final_test_accuracy']
    assert progress_a.pop('train_seconds') > 0 and progress_b.pop('train_seconds') > 0
    assert progress_a == progress_b
    if options:
        # The resumed steps 7-12 of seed 0: mixed, then clean by probability (step 8), then
        # clean from off_epoch 2 on (steps 9-12).
        scheduled = [mixup.scheduled_mode(
            train.choose_mode(train.training_modes(config), config.seed, step),
            seed=config.seed, step=step, epoch=(step - 1) // 4, probability=0.5, off_epoch=2)
            for step in range(7, 13)]
        assert scheduled == ['input'] + ['none'] * 5
    if decoder == 'ae':
        assert 'decoder' in state_b.params and 'decoder' in state_b.batch_stats
        modes = [train.choose_mode(train.training_modes(config), config.seed, step)
                 for step in range(1, 13)]
        assert 'clean' in modes  # the 12 steps of seed 0 include the clean mode
        assert resumed['final_test_reconstruction_error'] == \
            uninterrupted['final_test_reconstruction_error']


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                    demo_dataset):
    config = make_tiny_config()
    config.train.num_epochs = 1
    workdir = str(tmp_path / 'run')
    train.train_and_evaluate(config, workdir)
    good_state, _, good_step = restore_params(workdir, config, demo_dataset)

    config.train.num_epochs = 2
    monkeypatch.setattr(losses, 'soft_cross_entropy',
                        lambda logits, targets: jnp.full(logits.shape[:1], jnp.nan))
    with pytest.raises(FloatingPointError, match=r"train/loss became nan at step 5 \(mode '.*"
                                                 r'the newest checkpoint, all finite, is step 4'):
        train.train_and_evaluate(config, workdir)
    state, _, step = restore_params(workdir, config, demo_dataset)
    assert step == good_step == 4
    jax.tree.map(np.testing.assert_array_equal, state.params, good_state.params)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    config = make_tiny_config()
    config.train.num_epochs = 1
    workdir = tmp_path / 'run'
    train.train_and_evaluate(config, str(workdir))
    listing = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
    step_dir = workdir / 'checkpoints' / '4'
    damaged = [path for path in step_dir.rglob('*') if path.is_file()]
    for path in damaged:
        path.write_bytes(b'not a checkpoint')
    with pytest.raises(checkpointing.CheckpointError, match='step 4 .* is unreadable'):
        train.train_and_evaluate(config, str(workdir))
    # Left exactly as it was: nothing deleted, nothing written over it.
    assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == listing
    assert all(path.read_bytes() == b'not a checkpoint' for path in damaged)


def test_checkpoint_directory_without_checkpoints(tmp_path):
    manager = checkpointing.make_manager(str(tmp_path / 'empty'))
    abstract = {'w': jnp.zeros(2)}
    assert checkpointing.restore_latest(manager, abstract) is None  # training starts fresh
    with pytest.raises(checkpointing.CheckpointError, match='no checkpoint in .*train first'):
        checkpointing.restore_latest(manager, abstract, required=True)
    (tmp_path / 'empty' / 'checkpoints' / 'notes.txt').write_text('stray file')
    with pytest.raises(checkpointing.CheckpointError, match='no complete checkpoint'):
        checkpointing.restore_latest(manager, abstract)


def run_main(*args, cwd=REPO_ROOT):
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    return subprocess.run([sys.executable, '-m', 'alignmix_jax.main', *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=environment)


def test_unknown_config_key_is_a_clear_error(tmp_path):
    result = run_main('--config=configs/demo.py', f'--workdir={tmp_path}',
                      '--config.train.num_epoch=3')
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "error: no config field 'num_epoch' Did you mean \"num_epochs\" instead of \"num_epoch\"?; "
        "the fields are listed in configs/default.py"]
    assert not (tmp_path / 'checkpoints').exists()


def test_missing_dataset_is_a_clear_one_line_error(tmp_path):
    result = run_main('--config=configs/demo.py', f'--workdir={tmp_path}',
                      '--config.dataset.name=image_folder',
                      f'--config.dataset.data_dir={tmp_path / "nowhere"}')
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith('error: ') and 'nowhere' in last_line, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


def test_bfloat16_model_trains_with_a_float32_alignment(demo_dataset):
    config = make_tiny_config()
    config.model.dtype = 'bfloat16'
    model = build_model(config.model, demo_dataset.num_classes)
    state = train_step.create_train_state(config, model, (32, 32, 3), steps_per_epoch=4)
    step_fn = train_step.make_train_step(model, config, sharding.make_mesh())
    state, step_metrics = step_fn(state, demo_dataset.train.images[:16],
                                  demo_dataset.train.labels[:16], mode='feature')
    assert np.isfinite(float(step_metrics['loss']))
    assert np.isfinite(float(step_metrics['marginal_error']))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


def test_pretrained_weights_replace_the_initialisation(tmp_path, demo_dataset):
    """config.model.pretrained: the converter's output directory is loaded into the new state
    (the converter itself is tested against torch in test_convert_torchvision.py)."""
    from alignmix_jax.models import pretrained

    config = make_tiny_config()
    model = build_model(config.model, demo_dataset.num_classes)
    other_seed = make_tiny_config()
    other_seed.seed = 7
    source = train_step.create_train_state(other_seed, model, demo_dataset.image_shape, 4)
    weights_dir = str(tmp_path / 'weights')
    pretrained.save_converted(
        {'params': jax.device_get(source.params),
         'batch_stats': jax.device_get(source.batch_stats)}, weights_dir, {'arch': 'test'})

    fresh = train_step.create_train_state(config, model, demo_dataset.image_shape, 4)
    config.model.pretrained = weights_dir
    loaded = train_step.create_train_state(config, model, demo_dataset.image_shape, 4)
    jax.tree.map(np.testing.assert_array_equal, loaded.params, source.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.batch_stats, source.batch_stats)
    assert not np.array_equal(loaded.params['classifier']['kernel'],
                              fresh.params['classifier']['kernel'])
    assert int(loaded.step) == 0


def test_evaluators_run_during_training(tmp_path):
    """config.train.evals runs the evaluation commands' evaluators at each evaluation; the
    classification evaluator's top-1 error is then 1 - the loop's own test accuracy."""
    config = make_tiny_config()
    config.train.num_epochs = 1
    config.train.evals = ('classification',)
    result = train.train_and_evaluate(config, str(tmp_path / 'run'))
    figures = result['evals']['classification']
    assert figures['top1_error'] == pytest.approx(1 - result['final_test_accuracy'], abs=1e-6)
    assert figures['num_examples'] == 1000
