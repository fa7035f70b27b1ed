"""MobileNetV2: torchvision's parameter count, channel rounding, stage shapes and splits,
inverted residuals, equivalence with a plain-torch reference, and one step per mixup mode."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.method import mixup
from alignmix_jax.models import ENCODERS, build_model
from alignmix_jax.models.mobilenet_v2 import MobileNetV2, divisible_channels
from alignmix_jax.runtime import sharding
from alignmix_jax.training import train_step
from configs import default
from tests.conftest import fit_one_batch, make_tiny_config

SMALL_WIDTH = 0.25
BATCH = 2
# sum(p.numel() for p in torchvision.models.mobilenet_v2().parameters()), 1000 classes: conv
# weights (no biases), BatchNorm weights and biases, and the 1280 -> 1000 Linear with its bias.
TORCHVISION_MOBILENET_V2_PARAMETERS = 3_504_872
# Blocks (torchvision's features.{i}) whose stride is 1 and whose channels are kept.
RESIDUAL_BLOCKS = (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)
NUM_BLOCKS = 17


def model_config(**overrides):
    config = default.get_config().model
    config.name = 'mobilenet_v2'
    config.head_norm = False
    small_input = overrides.pop('small_input', False)
    config.update(overrides)
    config.mobilenet_v2.small_input = small_input
    return config


def abstract_variables(model, size):
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))


def count(tree):
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def images(seed=0, batch=BATCH, size=32):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, size, size, 3), jnp.float32)


def randomised_variables(model, x, seed):
    """Variables of the model's shapes drawn in NumPy, with no init program to compile (model.init
    is the costliest program of these tests to compile): He-normal kernels, and BatchNorm scales,
    biases and running statistics drawn at random (not 1, 0, 0, 1), so a swapped or ignored one
    shows in the output."""
    shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), x)
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        path = jax.tree_util.keystr(path)
        if path.endswith("['kernel']"):  # (kh, kw, in / groups, out): fan_in kh * kw * in
            return rng.normal(0.0, np.sqrt(2 / math.prod(leaf.shape[:-1])), leaf.shape)
        if path.endswith("['var']"):
            return rng.uniform(0.5, 2.0, leaf.shape)
        initial = 1.0 if path.endswith("['scale']") else 0.0
        return initial + 0.2 * rng.standard_normal(leaf.shape)

    return jax.tree.map(lambda leaf: leaf.astype(np.float32),
                        jax.tree_util.tree_map_with_path(draw, shapes))


@pytest.fixture(scope='module')
def small_network():
    """A quarter-width MobileNetV2 for 32x32 images and its variables."""
    model = MobileNetV2(width=SMALL_WIDTH, small_input=True)
    return model, randomised_variables(model, images(), seed=0)


def test_registered_with_its_config_section():
    assert ENCODERS['mobilenet_v2'] is MobileNetV2
    model = build_model(model_config(small_input=True), num_classes=10)
    assert model.encoder_options == (('small_input', True),)
    assert not model.use_head_norm


@pytest.mark.parametrize('channels, expected', [
    (32 * 1.0, 32), (16 * 0.25, 8), (24 * 0.5, 16), (96 * 0.75, 72),
    # Rounding down would lose more than 10% (11.2 -> 8): one multiple of 8 more.
    (32 * 0.35, 16),
    (320 * 1.4, 448), (1280 * 1.4, 1792), (24 * 1.3, 32)])
def test_channels_are_rounded_to_multiples_of_eight(channels, expected):
    assert divisible_channels(channels) == expected


def test_parameter_count_equals_torchvision():
    model = build_model(model_config(), num_classes=1000)
    variables = abstract_variables(model, 224)
    params = variables['params']
    assert count(params) == TORCHVISION_MOBILENET_V2_PARAMETERS
    assert set(params) == {'encoder', 'classifier'}
    assert params['classifier']['kernel'].shape == (1280, 1000)
    # 52 BatchNorms (stem, 2 in block 1 which does not expand, 3 in each of the 16 others,
    # last), each with running statistics the size of its scale and bias (not parameters).
    norms = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if 'norm' in jax.tree_util.keystr(path)]
    assert len(norms) == 2 * 52
    assert len(jax.tree.leaves(variables['batch_stats'])) == 2 * 52
    assert count(variables['batch_stats']) == count(norms)


def representation_shapes(model, size):
    variables = abstract_variables(model, size)
    x = jax.ShapeDtypeStruct((BATCH, size, size, 3), jnp.float32)
    return [jax.eval_shape(functools.partial(model.apply, train=False, method='features',
                                             stop=stage), variables, x).shape
            for stage in range(1, 5)]


@pytest.mark.parametrize('width, size, small_input, last_stride, feature_pool, expected', [
    (1.0, 224, False, 2, 1, [(56, 24), (28, 32), (14, 96), (7, 1280)]),
    (1.0, 224, False, 1, 1, [(56, 24), (28, 32), (14, 96), (14, 1280)]),
    (SMALL_WIDTH, 32, True, 2, 1, [(32, 8), (16, 8), (8, 24), (4, 1280)]),
    (SMALL_WIDTH, 32, True, 1, 1, [(32, 8), (16, 8), (8, 24), (8, 1280)]),
    (SMALL_WIDTH, 32, True, 2, 2, [(32, 8), (16, 8), (8, 24), (2, 1280)]),
    # Without small_input a 32x32 image ends 1x1, as at 224 / 32.
    (SMALL_WIDTH, 32, False, 2, 1, [(8, 8), (4, 8), (2, 24), (1, 1280)]),
    # The last convolution grows above width 1 (torchvision: 1280 * max(1, width)).
    (1.4, 224, False, 2, 1, [(56, 32), (28, 48), (14, 136), (7, 1792)]),
])
def test_stage_shapes(width, size, small_input, last_stride, feature_pool, expected):
    model = build_model(model_config(width=width, small_input=small_input,
                                     last_stride=last_stride, feature_pool=feature_pool),
                        num_classes=10)
    assert representation_shapes(model, size) == [(BATCH, hw, hw, channels)
                                                  for hw, channels in expected]


def test_bfloat16_computes_in_bfloat16_with_float32_parameters():
    model = build_model(model_config(width=SMALL_WIDTH, small_input=True, dtype='bfloat16'),
                        num_classes=10)
    variables = abstract_variables(model, 32)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
    x = jax.ShapeDtypeStruct((BATCH, 32, 32, 3), jnp.float32)
    features = jax.eval_shape(functools.partial(model.apply, train=False, method='features'),
                              variables, x)
    logits = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
    assert features.dtype == jnp.bfloat16 and logits.dtype == jnp.float32


def test_split_at_each_stage_is_the_whole_network(small_network):
    model, variables = small_network
    x = images(1)

    # One program for the whole network and every split: compiled once, it takes less time
    # than running the operations of all the splits one by one.
    @jax.jit
    def whole_and_split(variables, x):
        features = model.apply(variables, x, train=False)
        rests = [model.apply(variables, model.apply(variables, x, train=False, stop=stage),
                             train=False, start=stage) for stage in range(1, model.num_stages)]
        return features, rests, model.apply(variables, features, train=False, start=4)

    features, rests, again = whole_and_split(variables, x)
    for rest in rests:
        np.testing.assert_allclose(rest, features, rtol=1e-5, atol=1e-5)
    # From A to A runs no stage: the last convolution is stage 4's, not applied again.
    np.testing.assert_array_equal(again, features)
    with pytest.raises(ValueError, match='0 <= start <= stop <= 4'):
        model.apply(variables, x, train=False, stop=5)


def test_output_is_normalised_and_clipped_by_relu6(small_network):
    model, variables = small_network
    a = jax.jit(functools.partial(model.apply, train=False))(variables, images(2))
    assert a.shape == (BATCH, 4, 4, 1280)
    assert float(jnp.min(a)) >= 0.0 and float(jnp.max(a)) <= 6.0 and float(jnp.max(a)) > 0.0


@pytest.mark.parametrize('width, small_input, residual_blocks', [
    # Half width keeps the full-size network's pattern of channel changes.
    (0.5, False, RESIDUAL_BLOCKS),
    # Quarter width rounds 32, 16 and 24 channels all to 8: blocks 1 and 2 (stride 1 with
    # small_input) keep their channels too, so they add their input, as torchvision's would.
    (SMALL_WIDTH, True, (1, 2, *RESIDUAL_BLOCKS)),
])
def test_residual_exactly_where_stride_is_one_and_channels_are_kept(width, small_input,
                                                                    residual_blocks):
    model = MobileNetV2(width=width, small_input=small_input)
    x = images(3, batch=1)
    variables = randomised_variables(model, x, seed=2)
    # Jitted: one program compiles faster than the forward's operations run one by one.
    _, state = jax.jit(functools.partial(model.apply, train=False, capture_intermediates=True,
                                         mutable=['intermediates']))(variables, x)
    captured = state['intermediates']
    block_input = jax.nn.relu6(captured['stem_norm']['__call__'][0])
    for block in range(1, NUM_BLOCKS + 1):
        output = captured[f'block{block}']['__call__'][0]
        projection = captured[f'block{block}']['project_norm']['__call__'][0]
        expected = projection + block_input if block in residual_blocks else projection
        np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6, err_msg=str(block))
        block_input = output


def test_parameter_names_and_block_layout(small_network):
    _, variables = small_network
    params = variables['params']
    assert sorted(params) == sorted(['stem_conv', 'stem_norm', 'last_conv', 'last_norm',
                                     *[f'block{i}' for i in range(1, NUM_BLOCKS + 1)]])
    # Block 1 (t = 1) does not expand; the others expand 6-fold; a depthwise kernel has one
    # input channel per group.
    assert set(params['block1']) == {'depthwise_conv', 'depthwise_norm', 'project_conv',
                                     'project_norm'}
    assert params['block1']['depthwise_conv']['kernel'].shape == (3, 3, 1, 8)
    block = params['block7']  # the first 64-channel block: 8 -> 48 -> 16 at quarter width
    assert block['expand_conv']['kernel'].shape == (1, 1, 8, 48)
    assert block['depthwise_conv']['kernel'].shape == (3, 3, 1, 48)
    assert block['project_conv']['kernel'].shape == (1, 1, 48, 16)
    assert params['stem_conv']['kernel'].shape == (3, 3, 3, 8)
    assert params['last_conv']['kernel'].shape == (1, 1, 80, 1280)


def torch_reference_features(x, variables, small_input, last_stride):
    """torchvision's MobileNetV2.features written out in functional torch (NCHW), reading the
    Flax variables: kernels (kh, kw, in / groups, out) -> (out, in / groups, kh, kw)."""
    torch = pytest.importorskip('torch')
    functional = torch.nn.functional
    params, stats = variables['params'], variables['batch_stats']

    def tensor(array):
        return torch.from_numpy(np.array(array, dtype=np.float32))

    def conv_bn(x, params, stats, name, stride, groups=1, relu6=True):
        weight = tensor(params[f'{name}_conv']['kernel']).permute(3, 2, 0, 1)
        x = functional.conv2d(x, weight, stride=stride, padding=(weight.shape[-1] - 1) // 2,
                              groups=groups)
        norm, running = params[f'{name}_norm'], stats[f'{name}_norm']
        x = functional.batch_norm(x, tensor(running['mean']), tensor(running['var']),
                                  tensor(norm['scale']), tensor(norm['bias']), training=False,
                                  eps=1e-5)
        return functional.relu6(x) if relu6 else x

    table = [[1, 16, 1, 1], [6, 24, 2, 1 if small_input else 2], [6, 32, 3, 2], [6, 64, 4, 2],
             [6, 96, 3, 1], [6, 160, 3, last_stride], [6, 320, 1, 1]]
    out = tensor(x).permute(0, 3, 1, 2)
    with torch.no_grad():
        out = conv_bn(out, params, stats, 'stem', 1 if small_input else 2)
        index = 1
        for expansion, _, repeats, first_stride in table:
            for repeat in range(repeats):
                block_params, block_stats = params[f'block{index}'], stats[f'block{index}']
                stride = first_stride if repeat == 0 else 1
                inp = out.shape[1]
                hidden = inp * expansion
                branch = out
                if expansion != 1:
                    branch = conv_bn(branch, block_params, block_stats, 'expand', 1)
                branch = conv_bn(branch, block_params, block_stats, 'depthwise', stride,
                                 groups=hidden)
                branch = conv_bn(branch, block_params, block_stats, 'project', 1, relu6=False)
                out = out + branch if stride == 1 and inp == branch.shape[1] else branch
                index += 1
        out = conv_bn(out, params, stats, 'last', 1)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize('small_input, last_stride, size', [(True, 2, 32), (False, 1, 64)])
def test_equals_a_plain_torch_reference(small_input, last_stride, size):
    pytest.importorskip('torch', reason='the reference needs PyTorch: pip install '
                        'torch==2.13.0 (.ci/run installs it)')
    model = MobileNetV2(width=SMALL_WIDTH, small_input=small_input, last_stride=last_stride)
    x = images(4, size=size)
    variables = randomised_variables(model, x, seed=5)
    expected = torch_reference_features(np.asarray(x), variables, small_input, last_stride)
    features = jax.jit(functools.partial(model.apply, train=False))(variables, x)
    np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_each_mixup_mode_trains_through_the_step_and_compiles_once():
    config = make_tiny_config()
    config.model.name = 'mobilenet_v2'
    config.model.head_norm = False
    config.model.width = SMALL_WIDTH
    config.model.mobilenet_v2.small_input = True
    # MobileNetV2 is trained at lower rates than ResNets; at the demo's 0.1 on 16 images its
    # loss climbs within five steps.
    config.train.learning_rate = 0.02
    dataset = data.load_dataset(config.dataset)
    model = build_model(config.model, dataset.num_classes)
    # Eight images, cropped to 16x16 (A is 2x2, so the feature modes still align 4 positions
    # with 4), and four updates keep the runs short: compiling the step once per mode (~7 s
    # each for this 52-convolution network) is most of this test's time; at 32x32 a mode's
    # five steps took a quarter as long as its compilation.
    images, labels = dataset.train.images[:8, :16, :16], dataset.train.labels[:8]
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    modes = mixup.MODES + mixup.BASELINE_MODES
    for mode in modes:
        first_metrics, later_metrics, _, _ = fit_one_batch(step_fn, config, model, images,
                                                           labels, mesh, mode, updates=4)
        # Step 0's draw again: its loss falls to 0.20-0.35 of the first over seeds 0-2.
        assert float(later_metrics['loss']) < 0.7 * float(first_metrics['loss']), mode
        if mode in mixup.FEATURE_MODES:
            assert np.isfinite(float(first_metrics['marginal_error'])), mode
        else:
            assert 'marginal_error' not in first_metrics, mode
    assert step_fn._cache_size() == len(modes)
