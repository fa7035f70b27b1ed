"""`train/alignment_effect` on real models, and the start-up refusal of inert alignment."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.method import mixup
from alignmix_jax.models import build_model
from alignmix_jax.models.classifier import Classifier
from alignmix_jax.models.layers import BN_EPSILON
from alignmix_jax.training import alignment_effect, inert_alignment
from tests.conftest import make_tiny_config

PERMUTATION = jnp.array([3, 0, 1, 2])
LAM = 0.3


def _features(model):
    images = jax.random.normal(jax.random.PRNGKey(0), (4, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(1), images, train=False)
    features, _ = model.apply(variables, images, train=True, method='features',
                              mutable=['batch_stats'])
    return variables, features


def _measured(model, variables, features):
    mixed, plan = mixup.mix_features(features, PERMUTATION, LAM, swap=False, align=True,
                                     epsilon=0.1, num_iters=100)
    embedding, _ = model.apply(variables, mixed, train=True, method='embed',
                               mutable=['batch_stats'])
    effect = alignment_effect.measure('feature', model, variables['params'],
                                      variables['batch_stats'], features, PERMUTATION, LAM,
                                      mixed, embedding, swap=False)
    return float(effect), np.asarray(plan, np.float64)


def _reference_head(params, mixed, unaligned, *, head_norm, flatten):
    """f in float64 numpy: [BatchNorm with the aligned batch's statistics + ReLU], then pooling
    or flattening, then the Dense embedding if any; e for the aligned and the unaligned mix."""
    outputs = []
    mean, var = mixed.mean(axis=(0, 1, 2)), mixed.var(axis=(0, 1, 2))
    for tensor in (mixed, unaligned):
        if head_norm:
            norm = params['head_norm']
            tensor = (tensor - mean) / np.sqrt(var + BN_EPSILON) * np.asarray(norm['scale']) \
                + np.asarray(norm['bias'])
            tensor = np.maximum(tensor, 0.0)
        tensor = tensor.reshape(tensor.shape[0], -1) if flatten else tensor.mean(axis=(1, 2))
        if 'embedding' in params:
            tensor = tensor @ np.asarray(params['embedding']['kernel'], np.float64) \
                + np.asarray(params['embedding']['bias'])
        outputs.append(tensor)
    aligned, unaligned_e = outputs
    return float(np.mean(np.linalg.norm(aligned - unaligned_e, axis=-1)
                         / np.linalg.norm(unaligned_e, axis=-1)))


@pytest.mark.parametrize('head_norm, flatten, live', [
    (False, False, False),  # pooling then a linear layer: the public code's head
    (True, False, True),    # BatchNorm + ReLU before the pooling
    (False, True, True),    # the paper's f: a Dense layer on the whole A
])
def test_effect_of_a_classifier_matches_the_head_computed_here(head_norm, flatten, live):
    model = Classifier(num_classes=10, width=0.125, use_head_norm=head_norm,
                       flatten_features=flatten, embedding_dim=8)
    variables, features = _features(model)
    effect, plan = _measured(model, variables, features)
    anchor = np.asarray(features, np.float64)
    partner = anchor[np.asarray(PERMUTATION)]
    unaligned = LAM * anchor + (1 - LAM) * partner
    # Eq. (10): A~ = A' R^T with R = r P, in float64.
    size, height, width, channels = anchor.shape
    aligned_partner = np.einsum('bij,bjc->bic', height * width * plan,
                                partner.reshape(size, height * width, channels))
    mixed = LAM * anchor + (1 - LAM) * aligned_partner.reshape(anchor.shape)
    expected = _reference_head(variables['params'], mixed, unaligned, head_norm=head_norm,
                               flatten=flatten)
    if live:
        assert expected > 0.05
        assert effect == pytest.approx(expected, rel=1e-4)
    else:
        # Zero up to R's column sums (Sinkhorn's last update makes them 1 to float rounding).
        assert expected < 1e-5 and effect < 1e-5


def test_batch_statistics_make_evaluation_mode_equal_training_mode():
    model = Classifier(num_classes=10, width=0.125)
    variables, features = _features(model)
    statistics = alignment_effect.batch_statistics(model, variables, features)
    trained, _ = model.apply(variables, features, train=True, method='embed',
                             mutable=['batch_stats'])
    evaluated = model.apply({'params': variables['params'], 'batch_stats':
                             alignment_effect.with_batch_statistics(variables['batch_stats'],
                                                                    statistics)},
                            features, train=False, method='embed')
    np.testing.assert_array_equal(trained, evaluated)
    np.testing.assert_allclose(statistics['head_norm']['mean'],
                               np.asarray(features).mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)


def _tiny(config, image_size=32, width=0.0625):
    config.model.width = width
    config.dataset.image_size = image_size
    return config


@functools.cache
def _demo_images():
    return data.load_dataset(make_tiny_config().dataset).train.images[:8]


def _check(config, image_size=32):
    model = build_model(config.model, 10, image_shape=(image_size, image_size, 3),
                        normalization=(config.dataset.mean, config.dataset.std))
    # Real images (the demo's CIFAR-10 subset), resized: on noise images a network without
    # BatchNorm in F (VGG-GAP) matches each position with the same position of the partner
    # (the zero padding dominates), and the plan then changes nothing.
    images = jax.image.resize(jnp.asarray(_demo_images(), jnp.float32),
                              (8, image_size, image_size, 3), 'bilinear')
    images = jnp.clip(jnp.round(images), 0, 255).astype(jnp.uint8)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((2, image_size, image_size, 3)),
                           train=False)
    return inert_alignment.check_alignment_acts(config, model, variables, np.asarray(images))


def test_inert_configuration_is_refused_and_the_override_lets_it_through():
    config = make_tiny_config()
    config.model.head_norm = False
    with pytest.raises(ValueError, match=r'f averages A linearly .*model.head_norm=True'):
        _check(config)
    config.mixup.allow_inert_alignment = True
    assert _check(config) is None
    config.model.head_norm = True
    config.mixup.allow_inert_alignment = False
    assert _check(config) > 0.05


# (config module, variant, image size): every shipped config that trains feature modes.
SHIPPED = [
    ('imagenet', None, 64), ('cub_resnet50', None, 64), ('cub_vgg', None, 64),
    ('tiny_imagenet', None, 64), ('cifar100', None, 32), ('cifar100_ae', None, 32),
    ('demo', None, 32), ('demo', 'ae', 32), ('demo', 'ae_flat', 32),
    ('cifar10', None, 32), ('cifar10', 'alignmix_ae', 32), ('cifar10', 'alignmix_cutmix', 32),
    ('cifar10', 'vit_small', 32), ('cifar10', 'swin_tiny', 32), ('cifar10', 'mobilenet_v2', 32),
    ('mini_reproduction', 'alignmix', 32),
]


@pytest.mark.slow  # compiles or trains for many seconds (see docs/testing.md)
@pytest.mark.parametrize('name, variant, image_size', SHIPPED)
def test_every_shipped_config_passes_the_check(name, variant, image_size):
    module = importlib.import_module(f'configs.{name}')
    config = module.get_config(variant) if variant else module.get_config()
    assert inert_alignment.measured_mode(config) is not None
    # Fewer blocks before the transformers' heads (unchanged), so the test stays fast.
    config.model.vit.depth, config.model.swin.depths = 2, (1, 1, 1, 1)
    assert _check(_tiny(config, image_size), image_size) > alignment_effect.INERT_THRESHOLD
