"""MobileNetV2 (Sandler et al., 2018) as a stage-1 encoder F: x -> A split into four stages.

The network of "MobileNetV2: Inverted Residuals and Linear Bottlenecks" in torchvision's layout
(torchvision.models.mobilenet_v2): a 3x3 stride-2 stem convolution to 32 channels, 17 inverted
residual blocks given by the rows (t, c, n, s) of the paper's Table 2, and a last 1x1
convolution to 1280 channels, each convolution followed by BatchNorm and, except for a block's
projection (the linear bottleneck), ReLU6.

An inverted residual block expands its input t-fold by a 1x1 convolution (absent when t = 1),
filters each channel by a 3x3 depthwise convolution carrying the block's stride, and projects
back to c channels by a 1x1 convolution with no activation; it adds its input when the stride
is 1 and the channel count is kept.

The width multiplier scales every channel count and rounds it to a multiple of 8
(`divisible_channels`, the paper's and torchvision's `_make_divisible`), except that the last
convolution keeps 1280 channels below width 1 and grows above it: torchvision builds it with
`_make_divisible(1280 * max(1.0, width_mult), 8)`.

Stages (`num_stages = 4`, `preact_resnet.stage_range`): 1 = stem + the 16- and 24-channel blocks,
2 = the 32-channel blocks, 3 = the 64- and 96-channel blocks, 4 = the 160- and 320-channel blocks
+ the last convolution. At 224x224 the representations are 56x56, 28x28, 14x14 and 7x7;
`small_input=True` (32x32 images) drops the stride of the stem and of the 24-channel blocks,
giving 32x32, 16x16, 8x8 and 4x4. `last_stride` is the stride of the 160-channel blocks (1 keeps
the last stage at the third's resolution, as ResNet's `last_stride`).

A is the last convolution's BatchNorm + ReLU6 output, as torchvision's `features` returns it:
the network ends normalised; `model.head_norm=False` makes f global average pooling [+ Dense], as
torchvision's classifier sees it (without its dropout), but behind that linear head alignment
changes nothing, so configs/backbones.py keeps f's BatchNorm + ReLU (head_norm True).

Parameter names, for converters from torchvision state_dicts (features.{i} there):
'stem_conv', 'stem_norm' (features.0.{0,1}); 'block{1..17}' (features.{1..17}) each with
'expand_conv', 'expand_norm' (t > 1 only), 'depthwise_conv', 'depthwise_norm', 'project_conv',
'project_norm'; 'last_conv', 'last_norm' (features.18.{0,1}).

Initialisation as torchvision's: He normal (fan_out) convolutions (a depthwise kernel's fan_out
is 9 x its channels in both frameworks), BatchNorm scale 1 and bias 0. Full size with a
1000-class Dense classifier: 3,504,872 parameters, torchvision's count.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import batch_norm, conv_kernel_init, pool_features, stage_range

# The paper's Table 2: (expansion t, output channels c, blocks n, stride s of the first block).
INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
# The rows of INVERTED_RESIDUAL_SETTING each stage of F runs.
STAGE_ROWS = ((0, 1), (2,), (3, 4), (5, 6))
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
CHANNEL_DIVISOR = 8


def divisible_channels(channels: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """`channels` rounded to the nearest multiple of `divisor` (halves up), at least `divisor`,
    and never more than 10% below `channels` (one `divisor` more if so)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * channels:
        rounded += divisor
    return rounded


def conv_norm(x: jnp.ndarray, channels: int, kernel_size: int, stride: int, train: bool,
              dtype: Any, batch_norm_axis: str | None, name: str, groups: int = 1,
              activate: bool = True) -> jnp.ndarray:
    """Convolution (no bias) + BatchNorm [+ ReLU6], as torchvision's Conv2dNormActivation."""
    # Symmetric padding as PyTorch's (kernel_size - 1) // 2: 'SAME' would pad a stride-2 3x3
    # convolution only on the bottom/right and sample different pixels than the reference.
    pad = (kernel_size - 1) // 2
    x = nn.Conv(channels, (kernel_size, kernel_size), strides=(stride, stride),
                padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
                kernel_init=conv_kernel_init, dtype=dtype, name=f'{name}_conv')(x)
    x = batch_norm(train, dtype, f'{name}_norm', batch_norm_axis)(x)
    return nn.relu6(x) if activate else x


class InvertedResidual(nn.Module):
    """[expand 1x1-BN-ReLU6], depthwise 3x3 (stride)-BN-ReLU6, project 1x1-BN, [+ input]."""

    channels: int
    stride: int = 1
    expansion: int = 6
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        in_channels = x.shape[-1]
        hidden = int(round(in_channels * self.expansion))
        axis = self.batch_norm_axis
        out = x
        if self.expansion != 1:
            out = conv_norm(out, hidden, 1, 1, train, self.dtype, axis, 'expand')
        out = conv_norm(out, hidden, 3, self.stride, train, self.dtype, axis, 'depthwise',
                        groups=hidden)
        # The linear bottleneck: ReLU6 here would destroy information in the narrow tensor.
        out = conv_norm(out, self.channels, 1, 1, train, self.dtype, axis, 'project',
                        activate=False)
        if self.stride == 1 and in_channels == self.channels:
            return x + out
        return out


class MobileNetV2(nn.Module):
    """F: normalised NHWC images -> A of shape (b, 7, 7, 1280 * max(1, width)) at 224x224,
    (b, 4, 4, ...) on 32x32 with `small_input`; see the module docstring for the stages."""

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None
    # 32x32 inputs: stride 1 in the stem and the 24-channel blocks (overall stride 8).
    small_input: bool = False

    num_stages = len(STAGE_ROWS)

    def row_strides(self) -> tuple[int, ...]:
        strides = [stride for _, _, _, stride in INVERTED_RESIDUAL_SETTING]
        if self.small_input:
            strides[1] = 1
        strides[5] = self.last_stride
        return tuple(strides)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
                 stop: int | None = None) -> jnp.ndarray:
        """Stages start+1..stop of F (see `preact_resnet.stage_range`); all by default."""
        start, stop = stage_range(start, stop, self.num_stages)
        axis = self.batch_norm_axis
        strides = self.row_strides()
        # Blocks are numbered through the whole network (torchvision's features.{i}).
        first_block = [1]
        for _, _, num_blocks, _ in INVERTED_RESIDUAL_SETTING:
            first_block.append(first_block[-1] + num_blocks)
        out = x
        if start == 0 < stop:  # the stem belongs to stage 1
            out = conv_norm(out, divisible_channels(STEM_CHANNELS * self.width), 3,
                            1 if self.small_input else 2, train, self.dtype, axis, 'stem')
        for stage in range(start + 1, stop + 1):
            for row in STAGE_ROWS[stage - 1]:
                expansion, channels, num_blocks, _ = INVERTED_RESIDUAL_SETTING[row]
                for index in range(num_blocks):
                    out = InvertedResidual(
                        divisible_channels(channels * self.width),
                        strides[row] if index == 0 else 1, expansion, dtype=self.dtype,
                        batch_norm_axis=axis,
                        name=f'block{first_block[row] + index}')(out, train)
        if start < stop == self.num_stages:  # the last convolution belongs to stage 4
            out = conv_norm(out, divisible_channels(LAST_CHANNELS * max(1.0, self.width)), 1, 1,
                            train, self.dtype, axis, 'last')
            out = pool_features(out, self.feature_pool)
        return out
