"""VGG-GAP (the WSOL backbone): shapes, VGG-16's parameter count, names, no BatchNorm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax.models import ENCODERS, VGG16GAP, build_model
from alignmix_jax.models.vgg import vgg16_layer_names
from configs import default
from tests.conftest import init_key

# sum(p.numel() for p in torchvision.models.vgg16().features.parameters())
TORCHVISION_VGG16_FEATURE_PARAMETERS = 14_714_688
# conv6 (Zhou et al., 2016): 3x3, 512 -> 1024, with bias.
CONV6_PARAMETERS = 3 * 3 * 512 * 1024 + 1024


def model_config(**overrides):
    config = default.get_config().model
    config.name = 'vgg16_gap'
    config.head_norm = False
    config.last_stride = 1
    config.update(overrides)
    return config


def abstract_variables(model, size):
    return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, size, size, 3)))


def test_registered_as_an_encoder():
    assert ENCODERS['vgg16_gap'] is VGG16GAP


def test_full_width_shapes_and_parameter_count():
    model = build_model(model_config(), num_classes=200)
    variables = abstract_variables(model, 224)
    assert set(variables) == {'params'}  # no BatchNorm statistics
    encoder = variables['params']['encoder']
    assert list(encoder) == vgg16_layer_names() + ['conv6']
    encoder_parameters = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(encoder))
    assert encoder_parameters == TORCHVISION_VGG16_FEATURE_PARAMETERS + CONV6_PARAMETERS
    assert variables['params']['classifier']['kernel'].shape == (1024, 200)
    x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    features = jax.eval_shape(functools.partial(model.apply, train=False, method='features'),
                              variables, x)
    assert features.shape == (2, 14, 14, 1024)
    # last_stride=2 keeps the fifth max pool: VGG-16's 7x7 grid.
    model7 = build_model(model_config(last_stride=2), num_classes=200)
    features7 = jax.eval_shape(functools.partial(model7.apply, train=False, method='features'),
                               abstract_variables(model7, 224), x)
    assert features7.shape == (2, 7, 7, 1024)


def test_small_model_runs_and_features_are_rectified():
    model = build_model(model_config(width=0.0625), num_classes=5)
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    variables = model.init(init_key(0), images, train=False)
    features = model.apply(variables, images, train=False, method='features')
    assert features.shape == (2, 2, 2, 64)
    assert float(jnp.min(features)) >= 0.0  # conv6 ends with a ReLU
    logits = model.apply(variables, images, train=True)
    np.testing.assert_allclose(logits, model.apply(variables, images, train=False), rtol=1e-6)
    assert logits.shape == (2, 5)


def test_bad_last_stride_is_an_error():
    model = build_model(model_config(last_stride=4), num_classes=2)
    with pytest.raises(ValueError, match='last_stride'):
        abstract_variables(model, 32)


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
def test_training_steps_run_without_batch_norm_statistics():
    """VGG-GAP has no BatchNorm: the train state holds empty statistics, and every mixup mode's
    sharded step trains it (the feature modes align its 2x2 maps on 32x32 inputs)."""
    from alignmix_jax import data
    from alignmix_jax.method import mixup
    from alignmix_jax.runtime import sharding
    from alignmix_jax.training import train_step
    from tests.conftest import make_tiny_config

    config = make_tiny_config()
    config.model.update(name='vgg16_gap', head_norm=False, last_stride=1, width=0.0625)
    dataset = data.load_dataset(config.dataset)
    model = build_model(config.model, dataset.num_classes)
    mesh = sharding.make_mesh()
    step_fn = train_step.make_train_step(model, config, mesh)
    images, labels = dataset.train.images[:16], dataset.train.labels[:16]
    for mode in mixup.MODES:
        state = train_step.create_train_state(config, model, dataset.image_shape, 4, mesh)
        assert state.batch_stats == {}
        initial_params = jax.device_get(state.params)
        state, step_metrics = step_fn(state, images, labels, mode=mode)
        assert np.isfinite(float(step_metrics['loss'])), mode
        moved = jax.tree.map(lambda new, old: float(np.max(np.abs(np.asarray(new) - old))),
                             state.params, initial_params)
        assert max(jax.tree.leaves(moved)) > 0, mode
