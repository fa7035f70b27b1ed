"""Models: stage shapes, parameter counts by formula, stage composition, BatchNorm, dtypes."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.models import build_model
from alignmix_jax.models.preact_resnet import PreActBlock
from configs import default
from tests.conftest import init_key

NUM_CLASSES = 10
BATCH = 4
SMALL_WIDTH = 0.125


def model_config(**overrides):
    config = default.get_config().model
    config.width = SMALL_WIDTH
    config.update(overrides)
    return config


def images(seed=0, batch=BATCH, size=32):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3), jnp.float32)


def init_shapes(model, size=32):
    """Abstract variables (shapes and dtypes only): no RNG or convolution is compiled."""
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))


def stage_shapes(model, variables, size=32):
    """Shapes of A, e and logits from abstract evaluation of the three stages in turn."""
    x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    a = jax.eval_shape(functools.partial(model.apply, train=False, method='features'),
                       variables, x)
    e = jax.eval_shape(functools.partial(model.apply, train=False, method='embed'), variables, a)
    logits = jax.eval_shape(functools.partial(model.apply, method='classify'),
                            {'params': variables['params']}, e)
    return a.shape, e.shape, logits.shape


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope='module')
def resnet():
    """An eighth-width PreActResNet18 (8..64 channels) and its initialised variables."""
    model = build_model(model_config(), NUM_CLASSES)
    variables = jax.jit(functools.partial(model.init, train=False))(init_key(0), images())
    return model, variables


@pytest.mark.parametrize('name, last_stride, feature_pool, expected_hw', [
    ('preact_resnet18', 2, 1, 4),
    ('preact_resnet18', 1, 1, 8),
    ('preact_resnet18', 2, 2, 2),
    ('preact_resnet18', 1, 2, 4),
    ('wide_resnet16_8', 2, 1, 8),
    ('wide_resnet16_8', 1, 1, 16),
    ('wide_resnet16_8', 2, 2, 4),
])
@pytest.mark.parametrize('embedding_dim', [0, 24])
def test_stage_shapes(name, last_stride, feature_pool, expected_hw, embedding_dim):
    model = build_model(model_config(name=name, last_stride=last_stride,
                                     feature_pool=feature_pool, embedding_dim=embedding_dim),
                        NUM_CLASSES)
    # Both nets end with 512 * 0.125 = 64 channels (WRN16-8: 64 * 8 * 0.125).
    a_shape, e_shape, logits_shape = stage_shapes(model, init_shapes(model))
    assert a_shape == (BATCH, expected_hw, expected_hw, 64)
    assert e_shape == (BATCH, embedding_dim or 64)
    assert logits_shape == (BATCH, NUM_CLASSES)


def test_embed_and_classify_parameters_are_named_and_optional():
    plain = init_shapes(build_model(model_config(embedding_dim=0, head_norm=False), NUM_CLASSES))
    assert set(plain['params']) == {'encoder', 'classifier'}
    assert set(plain['batch_stats']) == {'encoder'}
    assert plain['params']['classifier']['kernel'].shape == (64, NUM_CLASSES)

    full = init_shapes(build_model(model_config(embedding_dim=24), NUM_CLASSES))
    assert set(full['params']) == {'encoder', 'head_norm', 'embedding', 'classifier'}
    assert set(full['batch_stats']) == {'encoder', 'head_norm'}
    assert full['params']['embedding']['kernel'].shape == (64, 24)
    assert full['params']['classifier']['kernel'].shape == (24, NUM_CLASSES)
    assert full['batch_stats']['head_norm']['mean'].shape == (64,)


def conv_params(kernel, in_channels, out_channels):
    return kernel * kernel * in_channels * out_channels  # no biases: BatchNorm follows


def bn_params(channels):
    return 2 * channels  # scale and bias; running statistics are not parameters


def preact_block_params(in_channels, out_channels, stride):
    total = (bn_params(in_channels) + conv_params(3, in_channels, out_channels)
             + bn_params(out_channels) + conv_params(3, out_channels, out_channels))
    if stride != 1 or in_channels != out_channels:
        total += conv_params(1, in_channels, out_channels)
    return total


def head_params(channels, num_classes, embedding_dim=0, head_norm=True):
    total = bn_params(channels) if head_norm else 0
    if embedding_dim:
        total += channels * embedding_dim + embedding_dim
        channels = embedding_dim
    return total + channels * num_classes + num_classes


def test_preact_resnet18_parameter_count():
    # (in, out, stride) of the eight blocks of the CIFAR PreActResNet18.
    blocks = [(64, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 1),
              (128, 256, 2), (256, 256, 1), (256, 512, 2), (512, 512, 1)]
    encoder = (conv_params(3, 3, 64) + bn_params(64)
               + sum(preact_block_params(*block) for block in blocks))
    expected = encoder + head_params(512, NUM_CLASSES)
    # The standard PreActResNet18 (no final BN) has 11,171,146; the public AlignMixup code's
    # BatchNorm after the stem adds 2 * 64, and our head BN 2 * 512.
    assert expected == 11_171_146 + 128 + 1024 == 11_172_298

    variables = init_shapes(build_model(model_config(width=1.0), NUM_CLASSES))
    assert count(variables['params']) == expected
    assert count(variables['params']['encoder']) == encoder
    # Each BatchNorm channel has a running mean and variance next to its scale and bias.
    bn_channels = 64 + 64 * 4 + 128 * 4 + 256 * 4 + 512 * 4 + 64
    assert count(variables['batch_stats']) == 2 * bn_channels

    with_embedding = init_shapes(build_model(model_config(width=1.0, embedding_dim=128),
                                             NUM_CLASSES))
    assert count(with_embedding['params']) == encoder + head_params(512, NUM_CLASSES, 128)


def test_wide_resnet16_8_parameter_count():
    blocks = [(16, 128, 1), (128, 128, 1), (128, 256, 2), (256, 256, 1),
              (256, 512, 2), (512, 512, 1)]
    encoder = conv_params(3, 3, 16) + sum(preact_block_params(*block) for block in blocks)
    expected = encoder + head_params(512, NUM_CLASSES)
    assert expected == 10_961_370  # ~11.0M, as Zagoruyko & Komodakis report for WRN-16-8

    variables = init_shapes(build_model(model_config(name='wide_resnet16_8', width=1.0),
                                        NUM_CLASSES))
    assert count(variables['params']) == expected
    assert count(variables['params']['encoder']) == encoder


def reference_conv(x, kernel, stride, padding):
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), padding,
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def reference_bn_relu(x, params, stats):
    """Eval-mode BatchNorm (epsilon 1e-5) then ReLU, written out."""
    normalised = (x - stats['mean']) / np.sqrt(stats['var'] + 1e-5)
    return np.maximum(normalised * params['scale'] + params['bias'], 0)


def randomise(tree, seed):
    """Fill every leaf (NumPy: fast): BatchNorm vectors in [0.5, 2], kernels N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda leaf: (rng.uniform(0.5, 2.0, leaf.shape) if len(leaf.shape) == 1
                      else rng.normal(0.0, 0.3, leaf.shape)).astype(np.float32), tree)


@pytest.mark.parametrize('shortcut', ['identity', 'preactivated'])
@pytest.mark.parametrize('in_channels, out_channels, stride', [(4, 8, 2), (8, 8, 1)])
def test_preact_block_matches_written_out_reference(in_channels, out_channels, stride, shortcut):
    block = PreActBlock(out_channels, stride, shortcut=shortcut)
    x = np.random.default_rng(9).normal(size=(2, 6, 6, in_channels)).astype(np.float32)
    variables = randomise(jax.eval_shape(functools.partial(block.init, train=False),
                                         jax.random.PRNGKey(0), x), 1)
    params, stats = variables['params'], variables['batch_stats']
    out = block.apply(variables, x, train=False)

    # Symmetric one-pixel padding (PyTorch's padding=1); 'SAME' would pad a stride-2
    # convolution of an even-sized input only at the bottom/right.
    pad = ((1, 1), (1, 1))
    preactivated = reference_bn_relu(x, params['norm1'], stats['norm1'])
    hidden = reference_conv(preactivated, params['conv1']['kernel'], stride, pad)
    hidden = reference_bn_relu(hidden, params['norm2'], stats['norm2'])
    expected = reference_conv(hidden, params['conv2']['kernel'], 1, pad)
    if 'shortcut' in params:
        # Projection of the pre-activated input, not of x.
        expected += reference_conv(preactivated, params['shortcut']['kernel'], stride, 'VALID')
    else:
        # He et al.'s block adds x; the public AlignMixup block its pre-activated input.
        expected += x if shortcut == 'identity' else preactivated
    assert ('shortcut' in params) == (stride != 1 or in_channels != out_channels)
    assert out.shape == (2, 6 // stride, 6 // stride, out_channels)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_feature_pool_averages_cells_of_the_feature_tensor(resnet):
    _, variables = resnet
    x = images(10)
    features = {}
    for pool in (1, 2):
        model = build_model(model_config(feature_pool=pool), NUM_CLASSES)
        features[pool] = jax.jit(functools.partial(model.apply, train=False,
                                                   method='features'))(variables, x)
    cells = features[1].reshape(BATCH, 2, 2, 2, 2, 64)  # (b, cell row, row, cell col, col, c)
    np.testing.assert_allclose(features[2], cells.mean(axis=(2, 4)), rtol=1e-5, atol=1e-6)


def test_embed_is_batch_norm_relu_pool_dense():
    model = build_model(model_config(embedding_dim=24), NUM_CLASSES)
    a = np.random.default_rng(11).normal(size=(BATCH, 4, 4, 64)).astype(np.float32)
    variables = randomise(init_shapes(model), 12)
    e = model.apply(variables, a, train=False, method='embed')
    params = variables['params']
    pooled = reference_bn_relu(a, params['head_norm'],
                               variables['batch_stats']['head_norm']).mean(axis=(1, 2))
    expected = pooled @ params['embedding']['kernel'] + params['embedding']['bias']
    np.testing.assert_allclose(e, expected, rtol=1e-4, atol=1e-5)
    logits = model.apply(variables, e, method='classify')
    np.testing.assert_allclose(logits, e @ params['classifier']['kernel']
                               + params['classifier']['bias'], rtol=1e-4, atol=1e-5)


def test_stage_composition_equals_call_in_eval_mode(resnet):
    model, variables = resnet
    x = images(1)
    # Eager, not jitted: each path runs the same primitive ops, so equality is exact.
    logits = model.apply(variables, x, train=False)
    a = model.apply(variables, x, train=False, method='features')
    e = model.apply(variables, a, train=False, method='embed')
    staged = model.apply({'params': variables['params']}, e, method='classify')
    np.testing.assert_array_equal(staged, logits)
    assert a.shape == (BATCH, 4, 4, 64) and e.shape == (BATCH, 64)
    assert np.all(np.isfinite(logits)) and np.std(logits) > 0


def test_stage_composition_equals_call_in_train_mode(resnet):
    model, variables = resnet
    x = images(2)
    logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])

    params = variables['params']
    a, after_features = model.apply(variables, x, train=True, method='features',
                                    mutable=['batch_stats'])
    e, after_embed = model.apply({'params': params, **after_features}, a, train=True,
                                 method='embed', mutable=['batch_stats'])
    staged = model.apply({'params': params}, e, method='classify')
    np.testing.assert_array_equal(staged, logits)
    jax.tree.map(np.testing.assert_array_equal, after_embed, updates)


def test_train_mode_updates_batch_stats_with_pytorch_momentum(resnet):
    model, variables = resnet
    x = images(3)
    _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    new_stats = updates['batch_stats']
    # Every BatchNorm moved away from its initial statistics (mean 0, variance 1).
    changed = jax.tree.map(lambda old, new: not np.allclose(old, new),
                           variables['batch_stats'], new_stats)
    assert all(jax.tree.leaves(changed))

    # The first BatchNorm sees the stem's output: running = 0.9 * old + 0.1 * batch statistic
    # (biased batch variance, as Flax computes it).
    stem_kernel = variables['params']['encoder']['stem']['kernel']
    stem_out = jax.lax.conv_general_dilated(x, stem_kernel, (1, 1), ((1, 1), (1, 1)),
                                            dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    first = new_stats['encoder']['stem_norm']
    np.testing.assert_allclose(first['mean'], 0.1 * stem_out.mean(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(first['var'], 0.9 + 0.1 * stem_out.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)

    # The head BatchNorm sees A.
    a = model.apply(variables, x, train=True, method='features', mutable=['batch_stats'])[0]
    head = new_stats['head_norm']
    np.testing.assert_allclose(head['mean'], 0.1 * a.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head['var'], 0.9 + 0.1 * a.var(axis=(0, 1, 2)),
                               rtol=1e-4, atol=1e-6)


def test_eval_mode_leaves_batch_stats_and_is_per_example(resnet):
    model, variables = resnet
    # Non-trivial running statistics, so eval mode normalises with something other than 0/1.
    _, updates = model.apply(variables, images(4), train=True, mutable=['batch_stats'])
    variables = {'params': variables['params'], **updates}
    apply_eval = jax.jit(functools.partial(model.apply, train=False, mutable=['batch_stats']))
    apply_train = jax.jit(functools.partial(model.apply, train=True, mutable=['batch_stats']))

    x = images(5)
    other = x.at[2:].set(images(6)[2:])  # same first two examples, different rest of batch
    logits, unchanged = apply_eval(variables, x)
    jax.tree.map(np.testing.assert_array_equal, unchanged['batch_stats'],
                 variables['batch_stats'])
    np.testing.assert_array_equal(apply_eval(variables, x)[0], logits)  # deterministic
    np.testing.assert_allclose(apply_eval(variables, other)[0][:2], logits[:2], rtol=1e-5,
                               atol=1e-6)
    # Batch statistics make train-mode outputs depend on the other examples: the check above
    # would see that dependence if eval mode had it.
    train_logits = apply_train(variables, x)[0][:2]
    assert not np.allclose(apply_train(variables, other)[0][:2], train_logits, atol=1e-3)


def test_initialisation(resnet):
    _, variables = resnet
    params = variables['params']
    # He normal, fan_out: a 3x3 conv from 32 to 64 channels has std sqrt(2 / (9 * 64)) = 0.0589
    # (fan_in would give 0.0833).
    kernel = params['encoder']['stage4_block1']['conv1']['kernel']
    assert kernel.shape == (3, 3, 32, 64)
    assert abs(np.std(kernel) / math.sqrt(2 / (9 * 64)) - 1) < 0.03
    assert abs(np.mean(kernel)) < 0.002
    # PyTorch's nn.Linear kernel range U(+-1/sqrt(64)); zero bias.
    classifier = params['classifier']
    assert np.max(np.abs(classifier['kernel'])) <= 1 / 8
    assert np.std(classifier['kernel']) > 0.8 * (1 / 8) / math.sqrt(3)
    np.testing.assert_array_equal(classifier['bias'], 0)
    np.testing.assert_array_equal(params['head_norm']['scale'], 1)


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_logits(resnet):
    model, variables = resnet
    bf16_model = build_model(model_config(dtype='bfloat16'), NUM_CLASSES)
    abstract = init_shapes(bf16_model)
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}

    x = images(7)
    # The float32 model's variables fit the bfloat16 model unchanged.
    @jax.jit
    def eval_stages(variables, x):
        a = bf16_model.apply(variables, x, train=False, method='features')
        e = bf16_model.apply(variables, a, train=False, method='embed')
        return a, e, bf16_model.apply(variables, e, method='classify')

    a, e, eval_logits = eval_stages(variables, x)
    logits, updates = jax.jit(functools.partial(bf16_model.apply, train=True,
                                                mutable=['batch_stats']))(variables, x)
    assert a.dtype == jnp.bfloat16 and e.dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32 and eval_logits.dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}

    reference = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    assert np.all(np.isfinite(eval_logits))
    np.testing.assert_allclose(eval_logits, reference, atol=0.05 * np.max(np.abs(reference)))


def test_wide_resnet_forward():
    model = build_model(model_config(name='wide_resnet16_8', embedding_dim=16), NUM_CLASSES)
    x = images(8)
    variables = randomise(init_shapes(model), 13)  # values need no RNG compilation
    logits, updates = jax.jit(functools.partial(model.apply, train=True,
                                                mutable=['batch_stats']))(variables, x)
    a = jax.jit(functools.partial(model.apply, train=False, method='features'))(variables, x)
    assert a.shape == (BATCH, 8, 8, 64) and logits.shape == (BATCH, NUM_CLASSES)
    assert np.all(np.isfinite(logits)) and np.std(logits) > 0
    assert set(updates['batch_stats']) == {'encoder', 'head_norm'}


def test_unknown_model_name_raises_one_line_error():
    with pytest.raises(ValueError) as error:
        build_model(model_config(name='resnet101'), NUM_CLASSES)
    message = str(error.value)
    assert message == ("unknown model name 'resnet101'; valid names: preact_resnet18, "
                       "wide_resnet16_8, resnet50, vgg16_gap, mobilenet_v2, vit_small, swin_tiny")


def test_the_preact_shortcut_is_configured_and_checked():
    config = model_config()
    assert build_model(config, NUM_CLASSES).encoder_options == (('shortcut', 'identity'),)
    config.preact_resnet18.shortcut = 'preactivated'
    assert build_model(config, NUM_CLASSES).encoder_options == (('shortcut', 'preactivated'),)
    config.preact_resnet18.shortcut = 'x'
    with pytest.raises(ValueError) as error:
        build_model(config, NUM_CLASSES)
    assert str(error.value) == ("unknown model.preact_resnet18.shortcut 'x'; valid: identity, "
                                'preactivated')


def test_unknown_dtype_and_indivisible_pool_raise():
    with pytest.raises(ValueError, match="unknown model dtype 'float16'"):
        build_model(model_config(dtype='float16'), NUM_CLASSES)
    with pytest.raises(ValueError, match='feature_pool=3 does not divide the 4x4'):
        init_shapes(build_model(model_config(feature_pool=3), NUM_CLASSES))


def test_flattened_f_sees_where_features_are_and_pooled_f_does_not():
    """model.flatten_features: f is a Dense layer on the whole A, so moving A's features to
    other positions changes e; global average pooling (with the head's per-channel BatchNorm
    and ReLU) gives the same e for any arrangement of the same features."""
    images = jax.random.normal(jax.random.PRNGKey(0), (BATCH, 32, 32, 3))
    shuffled_positions = np.random.default_rng(0).permutation(16)

    def embeddings(**overrides):
        model = build_model(model_config(**overrides), NUM_CLASSES)
        variables = model.init(init_key(0), images, train=False)
        a = model.apply(variables, images, train=False, method='features')
        assert a.shape[1:3] == (4, 4)
        rearranged = a.reshape(BATCH, 16, -1)[:, shuffled_positions].reshape(a.shape)
        return [np.asarray(model.apply(variables, tensor, train=False, method='embed'))
                for tensor in (a, rearranged)]

    flat, flat_rearranged = embeddings(flatten_features=True, embedding_dim=24)
    assert flat.shape == (BATCH, 24)
    assert np.max(np.abs(flat - flat_rearranged)) > 1e-2
    pooled, pooled_rearranged = embeddings(embedding_dim=24)
    np.testing.assert_allclose(pooled, pooled_rearranged, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError, match='flatten_features'):
        build_model(model_config(flatten_features=True), NUM_CLASSES).init(
            init_key(0), images, train=False)
