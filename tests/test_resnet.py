"""ResNet-50: shapes, torchvision's parameter count, parameter names, strides, BatchNorm."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.models import ENCODERS, ResNet50, build_model
from configs import default
from tests.conftest import init_key

SMALL_WIDTH = 0.125
SMALL_SIZE = 64
BATCH = 4
# sum(p.numel() for p in torchvision.models.resnet50().parameters()), 1000 classes.
TORCHVISION_RESNET50_PARAMETERS = 25_557_032


def model_config(**overrides):
    config = default.get_config().model
    config.name = 'resnet50'
    config.head_norm = False
    config.update(overrides)
    return config


def abstract_variables(model, size):
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))


def feature_shape(model, variables, size, batch=BATCH):
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(functools.partial(model.apply, train=False, method='features'),
                          variables, x).shape


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def images(seed=0, batch=BATCH, size=SMALL_SIZE):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3), jnp.float32)


@pytest.fixture(scope='module')
def small_resnet():
    """An eighth-width ResNet-50 (8..64 planes, 256 output channels) and its variables."""
    model = ResNet50(width=SMALL_WIDTH)
    variables = jax.jit(functools.partial(model.init, train=False))(init_key(0), images())
    return model, variables


def test_registered_for_configs():
    assert ENCODERS['resnet50'] is ResNet50


def test_parameter_count_equals_torchvision():
    # BatchNorm scale and bias are parameters in both; the running statistics are buffers in
    # PyTorch and 'batch_stats' here, counted by neither.
    model = build_model(model_config(), num_classes=1000)
    variables = abstract_variables(model, 224)
    assert count(variables['params']) == TORCHVISION_RESNET50_PARAMETERS
    assert 'head_norm' not in variables['params']
    # 53 BatchNorms (the stem, three per block of 16, four projection shortcuts), each with a
    # running mean and variance the size of its scale and bias.
    norms = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params'])
             if 'norm' in jax.tree_util.keystr(path)]
    assert len(norms) == 2 * 53
    assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * 53
    assert count(variables['batch_stats']) == count(norms)


@pytest.mark.parametrize('last_stride, expected_hw', [(2, 7), (1, 14)])
def test_full_size_feature_tensor(last_stride, expected_hw):
    model = build_model(model_config(last_stride=last_stride), num_classes=1000)
    variables = abstract_variables(model, 224)
    assert feature_shape(model, variables, 224, batch=2) == (2, expected_hw, expected_hw, 2048)


@pytest.mark.parametrize('last_stride, feature_pool, expected_hw', [
    (2, 1, 2), (1, 1, 4), (1, 2, 2), (1, 4, 1)])
def test_small_stage_shapes(last_stride, feature_pool, expected_hw):
    model = build_model(model_config(width=SMALL_WIDTH, last_stride=last_stride,
                                     feature_pool=feature_pool), num_classes=10)
    variables = abstract_variables(model, SMALL_SIZE)
    # 64 -> 32 (stem) -> 16 (max pool) -> 16, 8, 4, 2 (stages); 512 * 4 / 8 channels.
    assert feature_shape(model, variables, SMALL_SIZE) == (BATCH, expected_hw, expected_hw, 256)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables,
                            jax.ShapeDtypeStruct((BATCH, SMALL_SIZE, SMALL_SIZE, 3), jnp.float32))
    assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32


def test_parameter_names_follow_torchvision_layout():
    variables = abstract_variables(ResNet50(width=SMALL_WIDTH), SMALL_SIZE)
    params = variables['params']
    blocks = [name for name in params if name.startswith('stage')]
    assert sorted(params) == sorted(['stem_conv', 'stem_norm', *blocks])
    assert blocks == [f'stage{stage}_block{block}'
                      for stage, num_blocks in enumerate((3, 4, 6, 3), start=1)
                      for block in range(1, num_blocks + 1)]
    plain = {'conv1', 'norm1', 'conv2', 'norm2', 'conv3', 'norm3'}
    for name in blocks:
        expected = plain | {'shortcut_conv', 'shortcut_norm'} if name.endswith('block1') \
            else plain
        assert set(params[name]) == expected, name
    block = params['stage2_block1']
    # Eighth width: 16 planes, 64 output channels, from stage 1's 32 channels.
    assert block['conv1']['kernel'].shape == (1, 1, 32, 16)
    assert block['conv2']['kernel'].shape == (3, 3, 16, 16)
    assert block['conv3']['kernel'].shape == (1, 1, 16, 64)
    assert block['shortcut_conv']['kernel'].shape == (1, 1, 32, 64)
    assert params['stem_conv']['kernel'].shape == (7, 7, 3, 8)


def test_stride_is_on_the_3x3_convolution(small_resnet):
    # v1.5: a block's first 1x1 convolution keeps the resolution; its 3x3 halves it.
    model, variables = small_resnet
    _, state = model.apply(variables, images(), train=False,
                           capture_intermediates=True, mutable=['intermediates'])
    block = state['intermediates']['stage2_block1']
    assert block['conv1']['__call__'][0].shape[1:3] == (16, 16)
    assert block['conv2']['__call__'][0].shape[1:3] == (8, 8)
    assert block['shortcut_conv']['__call__'][0].shape[1:3] == (8, 8)


def test_stem_pads_symmetrically_like_pytorch():
    # With padding 3 on each side, stride-2 output row i sees input rows 2i-3 .. 2i+3, so an
    # impulse at row 4 reaches output rows 1..3; 'SAME' (2 before, 3 after) would reach 0..3.
    model = ResNet50(width=SMALL_WIDTH)
    variables = jax.jit(functools.partial(model.init, train=False))(init_key(1), images())
    params = {**variables['params'],
              'stem_conv': jax.tree.map(jnp.ones_like, variables['params']['stem_conv'])}
    impulse = jnp.zeros((1, 16, 16, 3)).at[0, 4, 4, 0].set(1.0)
    _, state = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, impulse,
                           train=False, capture_intermediates=True, mutable=['intermediates'])
    conv_out = np.asarray(state['intermediates']['stem_conv']['__call__'][0][0, :, :, 0])
    assert conv_out.shape == (8, 8)
    rows, cols = np.nonzero(conv_out)
    assert set(rows) == {1, 2, 3} and set(cols) == {1, 2, 3}


def test_output_is_rectified(small_resnet):
    model, variables = small_resnet
    a = model.apply(variables, images(1), train=False)
    assert float(jnp.min(a)) >= 0.0 and float(jnp.max(a)) > 0.0


def test_batch_norm_train_and_eval(small_resnet):
    model, variables = small_resnet
    x = images(2)
    # Eval uses the running statistics: an example's output does not depend on the batch.
    full = model.apply(variables, x, train=False)
    np.testing.assert_allclose(model.apply(variables, x[:1], train=False), full[:1],
                               rtol=1e-4, atol=1e-3)
    # Train normalises with the batch's statistics and updates the running averages
    # (momentum 0.9 as PyTorch's 0.1): the stem's running mean becomes 0.1 x the batch mean.
    train_out, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    assert not np.allclose(train_out, full, atol=1e-3)
    assert not np.allclose(model.apply(variables, x[:2], train=True, mutable=['batch_stats'])[0],
                           train_out[:2], atol=1e-4)
    conv_out = jax.lax.conv_general_dilated(
        x, variables['params']['stem_conv']['kernel'], (2, 2), ((3, 3), (3, 3)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    np.testing.assert_allclose(updates['batch_stats']['stem_norm']['mean'],
                               0.1 * jnp.mean(conv_out, axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    changed = jax.tree.map(lambda new, old: not np.allclose(new, old),
                           updates['batch_stats'], variables['batch_stats'])
    assert all(jax.tree.leaves(changed))


def test_zero_init_last_norm_makes_blocks_start_as_identity():
    model = ResNet50(width=SMALL_WIDTH, zero_init_last_norm=True)
    params = abstract_variables(model, SMALL_SIZE)['params']
    variables = jax.jit(functools.partial(model.init, train=False))(init_key(0), images())
    for name in params:
        if name.startswith('stage'):
            assert not np.any(variables['params'][name]['norm3']['scale']), name
            assert np.all(variables['params'][name]['norm1']['scale'] == 1), name
    # Off by default, as torchvision.
    default_variables = abstract_variables(ResNet50(width=SMALL_WIDTH), SMALL_SIZE)
    assert default_variables['params'].keys() == params.keys()
