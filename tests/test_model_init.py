"""model.init: PyTorch's default initialisers against their formula, per layer kind, and the
wiring from the config through create_train_state."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import models
from alignmix_jax.models import build_model
from alignmix_jax.models.layers import pytorch_default_init
from alignmix_jax.runtime import sharding
from alignmix_jax.settings.config_choices import check_init
from alignmix_jax.training import train_step
from configs import cifar10, default, imagenet
from tests.conftest import make_tiny_config


def _layers(params):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {path[:-1]: {name: np.asarray(flat[(*path[:-1], name)])
                        for name in ('kernel', 'bias') if (*path[:-1], name) in flat}
            for path in flat if path[-1] == 'kernel'}


def _initial_params(name, width, image_size=32):
    config = default.get_config()
    config.model.name = name
    config.model.width = width
    config.model.head_norm = name != 'resnet50'
    model = build_model(config.model, num_classes=10)
    images = jnp.zeros((1, image_size, image_size, 3))
    return model.init(jax.random.PRNGKey(0), images, train=False)['params']


@pytest.mark.parametrize('name,width', [('preact_resnet18', 0.25), ('wide_resnet16_8', 0.25),
                                        ('resnet50', 0.125)])
def test_pytorch_init_bounds_and_std_per_layer_kind(name, width):
    params = _initial_params(name, width)
    redrawn = _layers(pytorch_default_init(params, jax.random.PRNGKey(1)))
    kinds = {'conv': 0, 'dense': 0}
    for path, layer in redrawn.items():
        kernel = layer['kernel']
        fan_in = int(np.prod(kernel.shape[:-1]))  # (h, w, in) of a Conv, in of a Dense
        bound = 1 / np.sqrt(fan_in)
        kinds['conv' if kernel.ndim == 4 else 'dense'] += 1
        assert np.abs(kernel).max() <= bound, path
        # U(-b, b): standard deviation b / sqrt(3); mean 0. Relative error of a sample std of
        # n values is about 1/sqrt(n); 6 sigma (at least 5%) cannot fail by chance.
        tolerance = max(0.05, 6 / np.sqrt(kernel.size))
        assert kernel.std() == pytest.approx(bound / np.sqrt(3), rel=tolerance), path
        assert np.abs(kernel).max() > 0.9 * bound, path  # uses the whole range
        if 'bias' in layer:  # the classifier's: U(+-1/sqrt(fan_in)) too, not zeros
            bias = layer['bias']
            assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0, path
    assert kinds['conv'] > 10 and kinds['dense'] == 1
    # The 3x3 stem of the CIFAR networks: fan_in 27, bound 0.19245.
    if name != 'resnet50':
        assert 1 / np.sqrt(27) == pytest.approx(0.19245, abs=1e-5)
        stem = redrawn[('encoder', 'stem')]['kernel']
        assert stem.shape[:3] == (3, 3, 3) and np.abs(stem).max() <= 0.19245


def test_torchvision_init_is_he_normal_fan_out_and_pytorch_leaves_batch_norm():
    params = _initial_params('preact_resnet18', 0.5)
    conv = _layers(params)[('encoder', 'stage4_block1', 'conv2')]['kernel']  # 3x3x256x256
    assert conv.std() == pytest.approx(np.sqrt(2 / (9 * 256)), rel=0.02)
    assert np.all(_layers(params)[('classifier',)]['bias'] == 0)
    redrawn = pytorch_default_init(params, jax.random.PRNGKey(1))
    # sqrt(1 / (3 * 9 * 256)) against sqrt(2 / (9 * 256)): about 2.45 times smaller.
    assert np.asarray(redrawn['encoder']['stage4_block1']['conv2']['kernel']).std() == \
        pytest.approx(np.sqrt(1 / (3 * 9 * 256)), rel=0.02)
    norm = redrawn['encoder']['stage4_block1']['norm1']
    assert np.all(np.asarray(norm['scale']) == 1) and np.all(np.asarray(norm['bias']) == 0)


def test_config_defaults_and_the_train_state_follow_model_init():
    assert cifar10.get_config().model.init == 'pytorch'
    assert imagenet.get_config().model.init == 'torchvision'
    assert cifar10.get_config('vit_small').model.init == 'torchvision'
    config = cifar10.get_config()
    config.model.width = 0.25
    model = build_model(config.model, num_classes=10)
    state = train_step.create_train_state(config, model, (32, 32, 3), 10,
                                          sharding.make_mesh())
    stem = np.asarray(state.params['encoder']['stem']['kernel'])
    assert np.abs(stem).max() <= 1 / np.sqrt(27)
    assert stem.std() == pytest.approx(1 / np.sqrt(27 * 3), rel=0.1)
    assert np.abs(np.asarray(state.params['classifier']['bias'])).max() > 0


def test_unknown_or_unsupported_init_is_one_line_error():
    with pytest.raises(ValueError, match='unknown model.init'):
        check_init('kaiming', 'preact_resnet18')
    with pytest.raises(ValueError, match="set model.init='torchvision' for vit_small"):
        check_init('pytorch', 'vit_small')


@pytest.mark.parametrize('init', ['torchvision', 'pytorch'])
def test_initial_variables_compiled_with_the_init_options_are_bit_identical(init):
    # create_train_state compiles the draw with models.init_compiler_options() (LLVM level 2
    # on the CPU, for compile time only): the variables must be those of XLA's defaults.
    config = make_tiny_config()
    config.model.init = init
    model = build_model(config.model, num_classes=10)
    init_key, _ = models.run_keys(config.seed)
    draw = functools.partial(models.initial_variables, config, model, (32, 32, 3), init_key)
    assert models.init_compiler_options() == {'xla_backend_optimization_level': 2}
    with_options = jax.jit(draw, compiler_options=models.init_compiler_options())()
    with_defaults = jax.jit(draw)()
    assert len(jax.tree.leaves(with_defaults)) > 20
    jax.tree.map(np.testing.assert_array_equal, with_options, with_defaults)
