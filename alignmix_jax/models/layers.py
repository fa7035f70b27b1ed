"""The layers the encoders share: BatchNorm with PyTorch's settings, the 3x3 convolution and
its initialisation, the width multiplier, the stage ranges of F and the pooling of A (the
ResNets, WRN, VGG, MobileNetV2, the decoder); the float32 LayerNorm, self-attention, MLP and
patch embedding of the transformers (the ViT and Swin).

Initialisation: convolution kernels are drawn from He et al. (2015)'s normal distribution
scaled by fan_out (std = sqrt(2 / (k * k * out_channels))), as torchvision initialises its
ResNets; BatchNorm starts at scale 1, bias 0. Transformer weights as timm's (`transformer_init`).
`config.model.init='pytorch'` instead redraws the convolutional networks' Conv and Dense layers
as PyTorch's own defaults draw them (`pytorch_default_init`), what the public CIFAR and
Tiny-ImageNet code trains from.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults (its momentum 0.1 weighs the new batch; Flax's weighs the old
# running value), so runs and converted checkpoints behave like the PyTorch reference code.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): untruncated normal, variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# config.model.init's names and their check are in config_choices (INITS, check_init).
# The parameter groups 'pytorch' redraws: the public networks' parts (a decoder's transposed
# convolutions count fan_in differently in PyTorch and keep their own initialiser).
PYTORCH_INIT_GROUPS = ('encoder', 'tensor_embedding', 'embedding', 'classifier')


def pytorch_default_init(params, key: jax.Array):
    """`params` with every Conv and Dense layer of PYTORCH_INIT_GROUPS redrawn as PyTorch's
    nn.Conv2d / nn.Linear reset_parameters draw them; BatchNorm (scale 1, bias 0, as PyTorch's)
    is left as it is.

    PyTorch draws the weight from kaiming_uniform_(a=sqrt(5)): bound gain * sqrt(3 / fan_in)
    with gain sqrt(2 / (1 + a^2)) = sqrt(1/3), i.e. U(+-1/sqrt(fan_in)); the bias from
    U(+-1/sqrt(fan_in)) too. fan_in is the kernel's size over all but its output axis (h * w *
    in_channels / groups for a Conv, in_features for a Dense), the same count as PyTorch's.
    A layer is a dict holding a 2-d (Dense) or 4-d (Conv) 'kernel'; each gets its own key,
    folded from its place among the sorted layer paths.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    layers = {path[:-1] for path, value in flat.items()
              if path[-1] == 'kernel' and value.ndim in (2, 4)
              and path[0] in PYTORCH_INIT_GROUPS}
    redrawn = dict(flat)
    for index, layer in enumerate(sorted(layers)):
        kernel = flat[(*layer, 'kernel')]
        bound = 1.0 / float(kernel[..., 0].size) ** 0.5
        kernel_key, bias_key = jax.random.split(jax.random.fold_in(key, index))
        redrawn[(*layer, 'kernel')] = jax.random.uniform(
            kernel_key, kernel.shape, kernel.dtype, -bound, bound)
        if (*layer, 'bias') in flat:
            bias = flat[(*layer, 'bias')]
            redrawn[(*layer, 'bias')] = jax.random.uniform(
                bias_key, bias.shape, bias.dtype, -bound, bound)
    return flax.traverse_util.unflatten_dict(redrawn)


def scaled_channels(channels: int, width: float) -> int:
    """Channels of a layer under the width multiplier, rounded, never fewer than one."""
    return max(1, int(round(channels * width)))


def batch_norm(train: bool, dtype: Any, name: str, axis_name: str | None = None,
               scale_init=nn.initializers.ones) -> nn.BatchNorm:
    """PyTorch's BatchNorm; with `axis_name`, statistics over all devices of that mesh axis."""
    # Two-pass variance (as PyTorch computes it): E[x^2] - E[x]^2 loses precision when
    # activations are large, which they become in unnormalised residual streams late in training.
    return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                        use_fast_variance=False, scale_init=scale_init, dtype=dtype,
                        axis_name=axis_name, name=name)


def conv3x3(channels: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    # Symmetric padding of one pixel, as PyTorch's padding=1: 'SAME' would pad a stride-2
    # convolution only on the bottom/right and sample different pixels than the reference.
    return nn.Conv(channels, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                   use_bias=False, kernel_init=conv_kernel_init, dtype=dtype, name=name)


def pool_features(features: jnp.ndarray, window: int) -> jnp.ndarray:
    """Average A over non-overlapping window x window cells (the alignment resolution)."""
    if window == 1:
        return features
    height, width = features.shape[1:3]
    if height % window or width % window:
        raise ValueError(f'feature_pool={window} does not divide the {height}x{width} feature '
                         f'tensor')
    return nn.avg_pool(features, (window, window), strides=(window, window))


def stage_range(start: int, stop: int | None, num_stages: int) -> tuple[int, int]:
    """Checks a split of F into the stages start+1..stop; stop None means the last stage.

    Representation k of an encoder is its input for k = 0 and the output of its stage k
    otherwise (the stem belongs to stage 1); A is representation `num_stages` (pooled by
    `feature_pool`). Running start..k and then k..stop gives start..stop: manifold mixup
    (Verma et al., 2019) mixes representation k in between.
    """
    stop = num_stages if stop is None else stop
    if not 0 <= start <= stop <= num_stages:
        raise ValueError(f'encoder stages must satisfy 0 <= start <= stop <= {num_stages}; '
                         f'got start={start}, stop={stop}')
    return start, stop


# --- transformers ---

# timm's trunc_normal_(std=.02) truncates at +-2 in absolute value, 100 standard deviations
# out: in effect the plain normal distribution of standard deviation 0.02 drawn here.
transformer_init = nn.initializers.normal(stddev=0.02)


def normalize(norm: nn.LayerNorm, x: jnp.ndarray) -> jnp.ndarray:
    """A float32 LayerNorm applied to `x`, returned in the dtype of `x`."""
    return norm(x.astype(jnp.float32)).astype(x.dtype)


def float32_layer_norm(epsilon: float, name: str | None = None) -> nn.LayerNorm:
    # float32 statistics and normalisation whatever the computation dtype (apply: `normalize`).
    return nn.LayerNorm(epsilon=epsilon, dtype=jnp.float32, name=name)


def attention_layer(num_heads: int, dtype: Any, name: str, **kwargs):
    """flax's multi-head self-attention with timm's initialisation and a float32 softmax."""
    return nn.MultiHeadDotProductAttention(
        num_heads=num_heads, dtype=dtype, kernel_init=transformer_init,
        bias_init=nn.initializers.zeros, force_fp32_for_softmax=True, name=name, **kwargs)


def patch_embedding(dim: int, patch_size: int, dtype: Any) -> nn.Conv:
    """The ViT's and Swin's patch embedding: a convolution with kernel = stride = patch_size,
    no padding, timm's initialisation (apply it with `embed_patches`)."""
    return nn.Conv(dim, (patch_size, patch_size), strides=(patch_size, patch_size),
                   padding='VALID', kernel_init=transformer_init,
                   bias_init=nn.initializers.zeros, dtype=dtype)


def embed_patches(embedding: nn.Conv, images: jnp.ndarray, option: str) -> jnp.ndarray:
    """`embedding` (a `patch_embedding`) applied to images (b, h, w, c) -> (b, h/p, w/p, d);
    a one-line error naming the config field `option` if p does not divide h and w."""
    patch_size = embedding.kernel_size[0]
    height, width = images.shape[1:3]
    if height % patch_size or width % patch_size:
        raise ValueError(f'{option}={patch_size} does not divide the {height}x{width} images')
    return embedding(images)


class Mlp(nn.Module):
    """Dense to `hidden_dim`, exact GELU (PyTorch's nn.GELU; flax's default is tanh), Dense."""

    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dense = dict(kernel_init=transformer_init, bias_init=nn.initializers.zeros,
                     dtype=self.dtype)
        hidden = nn.gelu(nn.Dense(self.hidden_dim, name='dense1', **dense)(x), approximate=False)
        return nn.Dense(x.shape[-1], name='dense2', **dense)(hidden)
