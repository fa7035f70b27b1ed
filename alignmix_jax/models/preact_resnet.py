"""PreActResNet18 for 32x32 inputs: the stage-1 encoder F: x -> A of AlignMixup on CIFAR.

The network of He et al. (2016), "Identity Mappings in Deep Residual Networks", in the CIFAR
layout used by manifold mixup and the public AlignMixup code: a 3x3 stem at full resolution and
four stages of two pre-activation basic blocks. It returns the feature tensor A (NHWC) of the
last block as it is, before any normalisation: the head (f) owns the final BatchNorm + ReLU so
that mixing and alignment act on the raw residual stream.

The building blocks here (BatchNorm settings, convolutions, the pre-activation block, feature
pooling) are shared with `wide_resnet.py`.

Initialisation: convolution kernels are drawn from He et al. (2015)'s normal distribution
scaled by fan_out (std = sqrt(2 / (k * k * out_channels))), as torchvision initialises its
ResNets; BatchNorm starts at scale 1, bias 0.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

# PyTorch's BatchNorm2d defaults (its momentum 0.1 weighs the new batch; Flax's weighs the old
# running value), so runs and converted checkpoints behave like the PyTorch reference code.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# kaiming_normal_(mode='fan_out', nonlinearity='relu'): untruncated normal, variance 2 / fan_out.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


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


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut; output left unnormalised.

    The shortcut is the identity when shape is preserved; otherwise a 1x1 convolution of the
    pre-activated input (as in He et al. 2016 and the reference PyTorch code), so that the
    projection sees normalised activations.
    """

    channels: int
    stride: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        preactivated = nn.relu(batch_norm(train, self.dtype, 'norm1', self.batch_norm_axis)(x))
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), strides=(self.stride, self.stride),
                               padding='VALID', use_bias=False, kernel_init=conv_kernel_init,
                               dtype=self.dtype, name='shortcut')(preactivated)
        else:
            shortcut = x
        out = conv3x3(self.channels, self.stride, self.dtype, 'conv1')(preactivated)
        out = nn.relu(batch_norm(train, self.dtype, 'norm2', self.batch_norm_axis)(out))
        out = conv3x3(self.channels, 1, self.dtype, 'conv2')(out)
        return out + shortcut


class PreActResNet18(nn.Module):
    """F: normalised NHWC images -> A of shape (b, 4, 4, 512 * width) on 32x32 inputs.

    `last_stride=1` keeps the last stage at 8x8; `feature_pool=p` then averages A over p x p
    cells (4x4 -> 2x2 for p = 2), the alignment resolutions of the paper's Table 8.
    Parameters: 'stem' (conv), 'stem_norm', 'stage{1..4}_block{1,2}' (each 'norm1', 'conv1',
    'norm2', 'conv2' and, where the shape changes, 'shortcut'). `start`/`stop` run a part of
    the stages (`stage_range`): representation 1 is the output of stage1 (64 x width channels,
    32x32), 2 of stage2 (16x16), 3 of stage3 (8x8).
    """

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    stage_channels = (64, 128, 256, 512)
    blocks_per_stage = 2
    num_stages = len(stage_channels)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
                 stop: int | None = None) -> jnp.ndarray:
        """Stages start+1..stop of F (see `stage_range`); all of F by default."""
        start, stop = stage_range(start, stop, self.num_stages)
        stage_strides = (1, 2, 2, self.last_stride)
        stages = list(zip(self.stage_channels, stage_strides, strict=True))
        out = x
        if start == 0 < stop:  # the stem belongs to stage 1
            out = conv3x3(scaled_channels(64, self.width), 1, self.dtype, 'stem')(out)
            # The public AlignMixup network normalises the stem's output before the first block
            # (which pre-activates it again); kept so trained accuracies are comparable.
            out = nn.relu(batch_norm(train, self.dtype, 'stem_norm', self.batch_norm_axis)(out))
        for stage in range(start + 1, stop + 1):
            channels, stride = stages[stage - 1]
            for block in range(1, self.blocks_per_stage + 1):
                out = PreActBlock(scaled_channels(channels, self.width),
                                  stride if block == 1 else 1, dtype=self.dtype,
                                  batch_norm_axis=self.batch_norm_axis,
                                  name=f'stage{stage}_block{block}')(out, train)
        return pool_features(out, self.feature_pool) if stop == self.num_stages else out
