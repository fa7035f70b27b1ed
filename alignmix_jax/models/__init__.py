"""Models as stages F: x -> A, f: A -> e, g: e -> logits; `build_model` makes one from a config.

    model = build_model(config.model, num_classes=10)
    variables = model.init(key, images, train=False)
    a = model.apply(variables, images, train=False, method='features')
"""

import jax.numpy as jnp
import ml_collections

from alignmix_jax.models.classifier import ENCODERS, Classifier, encoder_class
from alignmix_jax.models.preact_resnet import PreActResNet18
from alignmix_jax.models.resnet import ResNet50
from alignmix_jax.models.vgg import VGG16GAP
from alignmix_jax.models.wide_resnet import WideResNet

__all__ = ['ENCODERS', 'Classifier', 'PreActResNet18', 'ResNet50', 'VGG16GAP', 'WideResNet',
           'build_model']

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, *,
                batch_norm_axis: str | None = None) -> Classifier:
    """The Classifier described by `config.model` (see configs/default.py for the fields).

    `batch_norm_axis`: the mesh axis over which training BatchNorm statistics are averaged when
    the model is applied under shard_map (`config.model.sync_batch_norm`); None: per device.
    """
    encoder_class(model_config.name)  # fail here, not at the first init, on an unknown name
    if model_config.dtype not in _DTYPES:
        raise ValueError(f'unknown model dtype {model_config.dtype!r}; valid dtypes: '
                         f'{", ".join(_DTYPES)}')
    return Classifier(
        num_classes=num_classes,
        encoder_name=model_config.name,
        width=model_config.width,
        last_stride=model_config.last_stride,
        feature_pool=model_config.feature_pool,
        embedding_dim=model_config.embedding_dim,
        use_head_norm=model_config.head_norm,
        dtype=_DTYPES[model_config.dtype],
        batch_norm_axis=batch_norm_axis,
    )
