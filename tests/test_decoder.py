"""AlignMixup/AE: the decoder, the 'clean' mode, what each mode may change, and the pictures."""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from alignmix_jax import data
from alignmix_jax.data import augmentation
from alignmix_jax.experiments import visualize
from alignmix_jax.method import mixup
from alignmix_jax.models import build_model
from alignmix_jax.models.decoder import decoder_layout
from alignmix_jax.runtime import sharding
from alignmix_jax.training import train, train_step
from tests.conftest import REPO_ROOT, make_tiny_config

# Slow (left out by -m "not slow"): trains AlignMixup/AE steps and runs the visualize command.
pytestmark = pytest.mark.slow


def ae_config(decoder='ae', **model_overrides):
    config = make_tiny_config()
    config.model.decoder = decoder
    config.model.update(model_overrides)
    return config


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(make_tiny_config().dataset)


def make_model(config, dataset):
    return build_model(config.model, dataset.num_classes, image_shape=dataset.image_shape,
                       normalization=(config.dataset.mean, config.dataset.std))


def groups_of_optimizer_state(opt_state, params, group):
    """Every entry of `group` in the parameter-shaped parts of the optimizer state."""
    names = set(params)
    parts = jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, dict) and set(n) == names)
    return [part[group] for part in parts if isinstance(part, dict)]


def assert_trees_equal(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('image_size, start, blocks', [(32, 4, 3), (64, 4, 4), (224, 7, 5)])
def test_decoder_is_sized_from_the_input_resolution(image_size, start, blocks):
    assert decoder_layout(image_size) == (start, blocks)
    config = ae_config()
    model = build_model(config.model, 10, image_shape=(image_size, image_size, 3),
                        normalization=(config.dataset.mean, config.dataset.std))
    variables = jax.eval_shape(functools.partial(model.init, train=False),
                               jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))
    e = jax.ShapeDtypeStruct((2, 64), jnp.float32)  # 512 x 0.125
    x_hat = jax.eval_shape(functools.partial(model.apply, train=False, method='decode'),
                           variables, e)
    assert x_hat.shape == (2, image_size, image_size, 3)
    assert set(variables['params']['decoder']) == {
        'project', 'out_norm', 'out_conv', *(f'block{k}' for k in range(1, blocks + 1))}
    # Channels mirror the encoder: 64 (512 x 0.125) on the starting map, halved per block.
    assert variables['params']['decoder']['project']['kernel'].shape == (64, start * start * 64)


def test_decoder_output_lies_in_the_normalised_image_range(demo_dataset):
    config = ae_config()
    model = make_model(config, demo_dataset)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    embeddings = 100.0 * jax.random.normal(jax.random.PRNGKey(1), (4, 64))
    x_hat = model.apply(variables, embeddings, train=False, method='decode')
    mean, std = np.array(config.dataset.mean), np.array(config.dataset.std)
    assert np.all(x_hat >= -mean / std - 1e-5) and np.all(x_hat <= (1 - mean) / std + 1e-5)
    # Saturated outputs reach both ends: the whole range of pixels is reachable.
    assert np.isclose(np.min(x_hat), np.min(-mean / std), atol=1e-3)


def test_clean_mode_trains_f_and_d_and_the_mixup_modes_leave_d_untouched(demo_dataset):
    config = ae_config()
    model = make_model(config, demo_dataset)
    images, labels = demo_dataset.train.images[:16], demo_dataset.train.labels[:16]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    state = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)

    # The gradient of the reconstruction loss wrt g is exactly zero, and D's is not. Jitted:
    # op by op, a cold cache compiles each of the network's operations (~3x longer here).
    gradients = jax.jit(functools.partial(train_step.device_gradients, model=model,
                                          config=config), static_argnames='mode')
    grads, _, _ = gradients(state, images, labels, 0, mode='clean')
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(grads['classifier']))
    assert any(np.any(leaf != 0) for leaf in jax.tree.leaves(grads['decoder']))
    grads, _, _ = gradients(state, images, labels, 0, mode='input')
    assert all(np.all(leaf == 0) for leaf in jax.tree.leaves(grads['decoder']))

    # A mixup step first, so g has momentum that weight decay and momentum would carry on.
    state, _ = step_fn(state, images, labels, mode='input')
    initial = jax.device_get(state)
    state, first_metrics = step_fn(state, images, labels, mode='clean')
    for _ in range(5):
        state, _ = step_fn(state, images, labels, mode='clean')
    after_clean = jax.device_get(state)
    assert_trees_equal(after_clean.params['classifier'], initial.params['classifier'])
    assert_trees_equal(groups_of_optimizer_state(after_clean.opt_state, initial.params,
                                                 'classifier'),
                       groups_of_optimizer_state(initial.opt_state, initial.params,
                                                 'classifier'))
    assert groups_of_optimizer_state(initial.opt_state, initial.params, 'classifier')
    for group, layer in (('encoder', 'stem'), ('decoder', 'project')):
        assert not np.array_equal(after_clean.params[group][layer]['kernel'],
                                  initial.params[group][layer]['kernel'])
    # The same draw as the first clean step, with the trained parameters: lower loss.
    replicated = sharding.replicated(mesh)
    _, later_metrics = step_fn(jax.device_put(after_clean.replace(step=initial.step + 1),
                                              replicated), images, labels, mode='clean')
    first = float(first_metrics['reconstruction_loss'])
    assert float(later_metrics['reconstruction_loss']) < 0.8 * first
    assert 'loss' not in first_metrics and 'accuracy' not in first_metrics

    state = jax.device_put(after_clean, replicated)
    for mode in mixup.MODES:
        state, _ = step_fn(state, images, labels, mode=mode)
    after_mixup = jax.device_get(state)
    assert_trees_equal(after_mixup.params['decoder'], after_clean.params['decoder'])
    assert_trees_equal(
        groups_of_optimizer_state(after_mixup.opt_state, initial.params, 'decoder'),
        groups_of_optimizer_state(after_clean.opt_state, initial.params, 'decoder'))
    # D's BatchNorm statistics only move in the clean mode too: the mixup modes never run D.
    assert_trees_equal(after_mixup.batch_stats['decoder'], after_clean.batch_stats['decoder'])
    assert not np.array_equal(after_mixup.params['classifier']['kernel'],
                              after_clean.params['classifier']['kernel'])
    # One compilation per mode, the clean one included.
    assert step_fn._cache_size() == len(mixup.MODES) + 1


def test_decoder_can_have_its_own_learning_rate():
    config = make_tiny_config().train
    config.momentum, config.weight_decay = 0.0, 0.0
    config.learning_rate, config.decoder_learning_rate = 0.1, 0.02
    optimizer, schedule = train_step.make_optimizer(config, steps_per_epoch=5)
    params = {'encoder': {'kernel': jnp.ones(2)}, 'decoder': {'kernel': jnp.ones(3)},
              'classifier': {'kernel': jnp.ones(1)}}
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params),
                                  params)
    np.testing.assert_allclose(updates['encoder']['kernel'], -0.1)
    np.testing.assert_allclose(updates['classifier']['kernel'], -0.1)
    np.testing.assert_allclose(updates['decoder']['kernel'], -0.02)
    assert float(schedule(0)) == pytest.approx(0.1)


def test_clean_joins_the_modes_only_with_a_decoder():
    config = ae_config()
    assert train.training_modes(config) == mixup.MODES + ('clean',)
    config.mixup.modes = ('input', 'clean', 'clean')
    assert train.training_modes(config) == ('input', 'clean', 'clean')
    config = make_tiny_config()
    assert train.training_modes(config) == mixup.MODES
    config.mixup.modes = ('input', 'clean')
    with pytest.raises(ValueError, match='clean.*needs config.model.decoder'):
        train.training_modes(config)


def test_vae_and_the_embedding_tensor_rows_train(demo_dataset):
    images, labels = demo_dataset.train.images[:16], demo_dataset.train.labels[:16]
    mesh = sharding.make_mesh()

    config = ae_config('vae')
    model = make_model(config, demo_dataset)
    state = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)
    assert set(state.params['posterior']) == {'mean', 'log_sigma'}
    assert state.params['classifier']['kernel'].shape == (64, 10)  # g reads mu only
    step_fn = train_step.make_train_step(model, config, mesh)
    state, clean_metrics = step_fn(state, images, labels, mode='clean')
    state, mixup_metrics = step_fn(state, images, labels, mode='embedding')
    # log sigma starts at 0 and mu near 0: the KL term starts small and positive.
    assert 0.0 < float(clean_metrics['kl_divergence']) < 64.0
    assert np.isfinite(float(mixup_metrics['loss']))

    # Table 8's {x, E} with the AE: E = conv2x2/2(A) is 2x2x8, e = E flattened, D decodes it.
    config = ae_config(embedding_tensor_channels=8)
    config.mixup.modes = ('input', 'embedding_tensor', 'embedding_tensor_prime')
    model = make_model(config, demo_dataset)
    state = train_step.create_train_state(config, model, images.shape[1:], 4, mesh)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    tensor = jax.jit(lambda variables, x: model.apply(
        variables, model.apply(variables, x, train=False, method='features'), train=False,
        method='embed_to_tensor'))(variables, jnp.zeros((2, 32, 32, 3)))
    assert tensor.shape == (2, 2, 2, 8)
    assert state.params['decoder']['project']['kernel'].shape[0] == 32
    step_fn = train_step.make_train_step(model, config, mesh)
    for mode in train.training_modes(config):
        state, step_metrics = step_fn(state, images, labels, mode=mode)
        if mode == 'embedding_tensor':
            # r = 4 positions of E aligned by the same transport plan as A.
            assert np.isfinite(float(step_metrics['marginal_error']))


@pytest.fixture(scope='module')
def initialised_ae(demo_dataset):
    config = ae_config()
    model = make_model(config, demo_dataset)
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    images = augmentation.normalize(demo_dataset.test.images[:2], config.dataset.mean,
                                      config.dataset.std)
    return model, variables, images


def test_morph_grid_ends_are_the_decoded_images(initialised_ae):
    model, variables, images = initialised_ae
    lambdas = np.array([0.0, 0.5, 1.0])
    grid = visualize.morph_grid(model, variables, images[0], images[1], lambdas)
    assert grid.shape == (3, 3, 32, 32, 3)
    decoded = np.asarray(visualize.decode(model, variables,
                                          visualize.encode(model, variables, images)))
    # lambda = 1: x itself in the unaligned row and in Eq. (12)'s; lambda = 0: x' in the
    # unaligned row and in Eq. (13)'s (drawn as mix_{1-lambda}). Up to float32 rounding: the
    # convolutions of a batch of 9 and of 2 images sum in different orders (1e-4 of a range
    # of 5).
    np.testing.assert_allclose(grid[0, 2], decoded[0], atol=1e-3)
    np.testing.assert_allclose(grid[1, 2], decoded[0], atol=1e-3)
    np.testing.assert_allclose(grid[0, 0], decoded[1], atol=1e-3)
    np.testing.assert_allclose(grid[2, 0], decoded[1], atol=1e-3)
    # Aligned and unaligned mixing give different images.
    assert np.max(np.abs(grid[0, 1] - grid[1, 1])) > 1e-2
    assert np.max(np.abs(grid[0, 1] - grid[2, 1])) > 1e-2
    assert np.max(np.abs(grid[1, 0] - decoded[0])) > 1e-2  # A~ is not A


def test_row_differences_on_fixed_pixels():
    grid = np.zeros((3, 2, 2, 2, 3))
    grid[1, 0] = 0.5  # Eq. (12)'s row differs by 0.5 everywhere at the first lambda
    grid[2, 1, 0] = 0.3  # Eq. (13)'s by 0.3 in half of the pixels at the second
    np.testing.assert_allclose(visualize.row_differences(grid), [[0.5, 0.0], [0.0, 0.15]])


def test_toy_plan_recovers_a_shuffle():
    rng = np.random.default_rng(4)
    points = rng.uniform(0.0, 4.0, (16, 2)).astype(np.float32)
    shuffle = rng.permutation(16)
    partner = points[shuffle] + rng.normal(0.0, 0.02, (16, 2)).astype(np.float32)
    plan, aligned = visualize.toy_alignment(points, partner)
    # Point i of A is partner point j with shuffle[j] == i.
    np.testing.assert_array_equal(np.argmax(plan, axis=1), np.argsort(shuffle))
    np.testing.assert_allclose(aligned, points, atol=0.2)
    np.testing.assert_allclose(plan.sum(axis=0), 1 / 16, rtol=1e-4)


def test_visualize_command_writes_the_pictures_of_a_demo_checkpoint(tmp_path):
    config = ae_config()
    config.train.num_epochs = 1
    workdir = str(tmp_path / 'ae')
    result = train.train_and_evaluate(config, workdir)
    assert 0.0 < result['final_test_reconstruction_error'] < 10.0

    # The command reads the model's variables only, so the demo's AE variant with the tiny
    # model's width restores them (its decoder learning rate plays no part).
    overrides = ['--config.model.width=0.125']
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    completed = subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.experiments.visualize', '--config=configs/demo.py:ae',
         *overrides, f'--workdir={workdir}', '--num_pairs=1', '--num_lambdas=5',
         '--difference_pairs=3'],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = os.path.join(workdir, 'figures')
    expected = {'morph_0.png': visualize.morph_figure_size(5),
                'correspondence_0.png': visualize.CORRESPONDENCE_SIZE,
                'toy_alignment.png': visualize.TOY_SIZE}
    assert sorted(os.listdir(figures)) == sorted([*expected, 'morph_difference.json'])
    assert completed.stdout.split() == [os.path.join(figures, name) for name in
                                        ('morph_0.png', 'correspondence_0.png',
                                         'toy_alignment.png', 'morph_difference.json')]
    with open(os.path.join(figures, 'morph_difference.json')) as differences_file:
        differences = json.load(differences_file)
    assert differences['pairs'] == 3 and differences['lambdas'] == [0.0, 0.25, 0.5, 0.75, 1.0]
    # Eq. (12)'s row is x itself at lambda = 1, Eq. (13)'s is x' at lambda = 0: there the rows
    # equal the unaligned one (up to the decoder's rounding across batch positions); between,
    # the aligned mixes differ.
    assert differences['eq12'][-1] < 1e-4 and differences['eq13'][0] < 1e-4
    assert min(differences['eq12'][1:-1] + differences['eq13'][1:-1]) > 1e-3
    for name, size in expected.items():
        path = os.path.join(figures, name)
        assert os.path.getsize(path) > 5000
        with Image.open(path) as picture:
            assert picture.size == size
            # Not a blank page: the pixels vary.
            assert np.asarray(picture.convert('L')).std() > 10

    # The evaluations restore a checkpoint with a decoder too (its parameters are in the tree).
    from alignmix_jax.evaluation import command as evaluation_command
    record, _ = evaluation_command.evaluate_workdir('classification', config, workdir)
    assert record['results']['top1_error'] == pytest.approx(
        1 - result['final_test_accuracy'], abs=1e-6)
