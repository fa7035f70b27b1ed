"""config_choices holds the names config_checks reads without importing JAX; here they are
checked against the modules that use them."""

import jax.numpy as jnp

from alignmix_jax import models
from alignmix_jax.method import alignment, mixup
from alignmix_jax.settings import config_choices


def test_encoder_stage_table_matches_the_encoder_classes():
    assert list(config_choices.ENCODER_STAGES) == list(models.ENCODERS)
    assert {name: models.encoder_stages(name) for name in models.ENCODERS} == \
        config_choices.ENCODER_STAGES
    assert config_choices.ENCODER_STAGES == {
        'preact_resnet18': 4, 'wide_resnet16_8': 3, 'resnet50': 4, 'vgg16_gap': 1,
        'mobilenet_v2': 4, 'vit_small': 4, 'swin_tiny': 4}


def test_modules_use_the_same_names():
    assert models.DTYPES == {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
    assert models.DECODER_TYPES is config_choices.DECODER_TYPES
    assert alignment.COST_SCALES is config_choices.COST_SCALES
    assert mixup.validate_modes is config_choices.validate_modes
    assert mixup.ALL_MODES == ('input', 'embedding', 'feature', 'feature_prime',
                               'embedding_tensor', 'embedding_tensor_prime', 'none', 'cutmix',
                               'hidden1', 'hidden2', 'hidden3', 'clean')
