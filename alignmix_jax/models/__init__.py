"""Models as stages F: x -> A, f: A -> e, g: e -> logits; `build_model` makes one from a config.

    model = build_model(config.model, num_classes=10)
    variables = model.init(key, images, train=False)
    a = model.apply(variables, images, train=False, method='features')
"""

import jax
import jax.numpy as jnp
import ml_collections

from alignmix_jax.models.classifier import (
    DECODER_TYPES,
    ENCODER_OPTIONS,
    ENCODERS,
    Classifier,
    encoder_class,
    encoder_stages,
    has_own_head,
)
from alignmix_jax.models.layers import pytorch_default_init, scaled_channels
from alignmix_jax.models.mobilenet_v2 import MobileNetV2
from alignmix_jax.models.preact_resnet import SHORTCUTS, PreActResNet18
from alignmix_jax.models.resnet import ResNet50
from alignmix_jax.models.swin import SwinTransformer
from alignmix_jax.models.vgg import VGG16GAP
from alignmix_jax.models.vit import PatchTokens, VisionTransformer
from alignmix_jax.models.wide_resnet import WideResNet
from alignmix_jax.settings import config_choices

__all__ = ['DECODER_TYPES', 'DTYPES', 'ENCODERS', 'Classifier', 'MobileNetV2', 'PatchTokens',
           'PreActResNet18', 'ResNet50',
           'SwinTransformer', 'VGG16GAP', 'VisionTransformer', 'WideResNet',
           'build_model', 'build_model_for_dataset', 'encoder_options', 'encoder_stages',
           'initial_variables',
           'has_own_head']

# config.model.dtype -> the dtype of the network's computations.
DTYPES = {name: getattr(jnp, name) for name in config_choices.DTYPES}

# Folded into the initialisation key for config.model.init='pytorch''s redraw of the layers,
# so the model's own initialisers keep the key itself.
_PYTORCH_INIT_STREAM = 1


def encoder_options(model_config: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
    """The (name, value) options of the encoder `model_config.name` from its own section of
    the config (ENCODER_OPTIONS; e.g. config.model.vit), lists made tuples; () for the others."""
    section = ENCODER_OPTIONS.get(model_config.name)
    if section is None:
        return ()
    if section not in model_config:
        raise ValueError(f'model {model_config.name!r} needs the config section '
                         f'config.model.{section} (see configs/default.py)')
    return tuple((name, tuple(value) if isinstance(value, list) else value)
                 for name, value in sorted(model_config[section].items()))


def build_model(model_config: ml_collections.ConfigDict, num_classes: int, *,
                batch_norm_axis: str | None = None, image_shape: tuple[int, ...] | None = None,
                normalization: tuple | None = None) -> Classifier:
    """The Classifier described by `config.model` (see configs/default.py for the fields).

    `batch_norm_axis`: the mesh axis over which training BatchNorm statistics are averaged when
    the model is applied under shard_map (`config.model.sync_batch_norm`); None: per device.
    `image_shape` (h, w, c) and `normalization` (config.dataset.mean, config.dataset.std): the
    images the decoder D produces, needed only with `config.model.decoder` 'ae' or 'vae'.
    """
    encoder_class(model_config.name)  # fail here, not at the first init, on an unknown name
    config_choices.check_init(model_config.init, model_config.name)
    options = dict(encoder_options(model_config))
    if 'shortcut' in options and options['shortcut'] not in SHORTCUTS:
        raise ValueError(f'unknown model.{model_config.name}.shortcut {options["shortcut"]!r}; '
                         f'valid: {", ".join(SHORTCUTS)}')
    if model_config.dtype not in DTYPES:
        raise ValueError(f'unknown model dtype {model_config.dtype!r}; valid dtypes: '
                         f'{", ".join(DTYPES)}')
    if model_config.decoder not in DECODER_TYPES:
        raise ValueError(f'unknown model.decoder {model_config.decoder!r}; valid: '
                         f'{", ".join(DECODER_TYPES)}')
    decoder_fields = {}
    if model_config.decoder != 'none':
        if image_shape is None or normalization is None:
            raise ValueError('a model with a decoder needs the image shape and normalisation')
        height, width = image_shape[:2]
        if height != width:
            raise ValueError(f'the decoder makes square images; got {height}x{width}')
        mean, std = normalization
        decoder_fields = dict(
            image_size=height, image_mean=tuple(float(v) for v in mean),
            image_std=tuple(float(v) for v in std),
            decoder_channels=scaled_channels(model_config.decoder_channels, model_config.width))
    return Classifier(
        decoder_type=model_config.decoder,
        embedding_tensor_channels=model_config.embedding_tensor_channels,
        **decoder_fields,
        num_classes=num_classes,
        encoder_name=model_config.name,
        width=model_config.width,
        last_stride=model_config.last_stride,
        feature_pool=model_config.feature_pool,
        embedding_dim=model_config.embedding_dim,
        flatten_features=model_config.flatten_features,
        use_head_norm=model_config.head_norm,
        encoder_options=tuple(options.items()),
        dtype=DTYPES[model_config.dtype],
        batch_norm_axis=batch_norm_axis,
    )


def build_model_for_dataset(config: ml_collections.ConfigDict, dataset, *,
                            batch_norm_axis: str | None = None) -> Classifier:
    """`build_model` for a run's config and its loaded dataset (classes, image shape, and the
    normalisation a decoder's images are produced in). Training, evaluation, the pictures and
    the benchmark all build their model here, so their parameter trees match."""
    return build_model(config.model, dataset.num_classes, batch_norm_axis=batch_norm_axis,
                       image_shape=tuple(dataset.image_shape),
                       normalization=(config.dataset.mean, config.dataset.std))


def init_compiler_options() -> dict:
    """XLA options (jax.jit's compiler_options) of the programs that draw the initial
    variables, which run once per run. On the CPU, XLA's default LLVM level 3 spends most of
    their compilation optimising the threefry rounds of every parameter tensor's draw: on this
    project's 2-core CPU, 6.7 s for the tests' eighth-width PreActResNet18 and 5.5 s for the
    demo's, against 2.0 and 2.4 s at level 2, which gave the same variables bit for bit (both
    networks, and the demo's with `model.init='pytorch'`). Other backends keep their defaults
    (not measured). The training step keeps level 3: level 2 saves it only ~5%."""
    return {'xla_backend_optimization_level': 2} if jax.default_backend() == 'cpu' else {}


def initial_variables(config: ml_collections.ConfigDict, model: Classifier, image_shape,
                      key: jax.Array) -> dict:
    """A run's initial {'params', 'batch_stats'} (the latter empty without BatchNorm) from
    `key`: the model's own initialisers, with `config.model.init='pytorch'` redrawing the
    convolutional networks' layers as PyTorch does (`layers.pytorch_default_init`). The train
    state starts from these; `evaluation.<kind> --initial` evaluates them."""
    variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
    if config.model.init == 'pytorch':
        variables = {**variables, 'params': pytorch_default_init(
            variables['params'], jax.random.fold_in(key, _PYTORCH_INIT_STREAM))}
    return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(the key of `initial_variables`, the key of the run's per-step draws) of `seed`."""
    init_key, run_key = jax.random.split(jax.random.PRNGKey(seed))
    return init_key, run_key
