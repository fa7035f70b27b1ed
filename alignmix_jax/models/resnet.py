"""ResNet-50 for 224x224 inputs: the stage-1 encoder F: x -> A of AlignMixup on ImageNet.

The network of He et al. (2016), "Deep Residual Learning for Image Recognition", in torchvision's
layout ("v1.5"): a 7x7 stride-2 stem convolution + BatchNorm + ReLU, a 3x3 stride-2 max pool,
then four stages of 3, 4, 6 and 3 post-activation bottleneck blocks with 64, 128, 256 and 512
planes (x4 output channels), the stride of each stage on its first block's 3x3 convolution
(v1 put it on the first 1x1, which throws away three quarters of the input it sees).

A is the last stage's output as torchvision's `layer4` returns it: (b, 7, 7, 2048 * width) at
224x224, after the block's final ReLU. Unlike the pre-activation CIFAR encoders, this network
ends normalised and rectified, so the head f must not add another BatchNorm + ReLU:
configs/imagenet.py sets `model.head_norm=False`, which makes f pooling (+ the optional Dense)
as in torchvision and in the public AlignMixup ImageNet code.

Parameter names are stable, for converters from torchvision state_dicts:
'stem_conv', 'stem_norm', 'stage{1..4}_block{i}' with 'conv1', 'norm1', 'conv2', 'norm2',
'conv3', 'norm3' and, on the first block of each stage, 'shortcut_conv', 'shortcut_norm'
(torchvision: conv1, bn1, layer{s}.{i-1}.{conv,bn}{1,2,3}, layer{s}.0.downsample.{0,1}).

Initialisation as torchvision's: He normal (fan_out) convolutions, BatchNorm scale 1 and bias 0;
`zero_init_last_norm=True` starts each block's last BatchNorm scale at 0, so every residual
block begins as the identity (Goyal et al., 2017), off by default as in torchvision.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import (
    batch_norm,
    conv3x3,
    conv_kernel_init,
    pool_features,
    scaled_channels,
    stage_range,
)

# Output channels of a bottleneck block per plane of its 3x3 convolution.
EXPANSION = 4


def conv1x1(channels: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    # No padding: a stride-2 1x1 convolution samples pixels 0, 2, 4, ... as PyTorch's does.
    return nn.Conv(channels, (1, 1), strides=(stride, stride), padding='VALID', use_bias=False,
                   kernel_init=conv_kernel_init, dtype=dtype, name=name)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU, conv3x3 (stride)-BN-ReLU, conv1x1-BN, plus shortcut, then ReLU.

    Output channels are `planes * EXPANSION`. The shortcut is the identity when the shape is
    kept, otherwise a strided 1x1 convolution + BatchNorm of the block's input.
    """

    planes: int
    stride: int = 1
    zero_init_last_norm: bool = False
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out_channels = self.planes * EXPANSION
        axis = self.batch_norm_axis
        out = conv1x1(self.planes, 1, self.dtype, 'conv1')(x)
        out = nn.relu(batch_norm(train, self.dtype, 'norm1', axis)(out))
        out = conv3x3(self.planes, self.stride, self.dtype, 'conv2')(out)
        out = nn.relu(batch_norm(train, self.dtype, 'norm2', axis)(out))
        out = conv1x1(out_channels, 1, self.dtype, 'conv3')(out)
        last_scale_init = nn.initializers.zeros if self.zero_init_last_norm \
            else nn.initializers.ones
        out = batch_norm(train, self.dtype, 'norm3', axis, scale_init=last_scale_init)(out)
        if self.stride != 1 or x.shape[-1] != out_channels:
            shortcut = conv1x1(out_channels, self.stride, self.dtype, 'shortcut_conv')(x)
            shortcut = batch_norm(train, self.dtype, 'shortcut_norm', axis)(shortcut)
        else:
            shortcut = x
        return nn.relu(out + shortcut)


class ResNet50(nn.Module):
    """F: normalised NHWC images -> A of shape (b, 7, 7, 2048 * width) on 224x224 inputs.

    `last_stride=1` keeps the last stage at 14x14 (the localisation setting of the paper's
    CUB experiments); `feature_pool=p` then averages A over p x p cells.
    """

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    zero_init_last_norm: bool = False
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    stage_planes = (64, 128, 256, 512)
    blocks_per_stage = (3, 4, 6, 3)

    num_stages = len(stage_planes)

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
                 stop: int | None = None) -> jnp.ndarray:
        """Stages start+1..stop of F (see `preact_resnet.stage_range`); all by default."""
        start, stop = stage_range(start, stop, self.num_stages)
        out = x
        if start == 0 < stop:  # the stem belongs to stage 1
            # Symmetric 3-pixel padding as PyTorch's padding=3 ('SAME' would pad 2 top-left,
            # 3 bottom-right at stride 2, sampling different pixels than torchvision's weights
            # expect).
            out = nn.Conv(scaled_channels(64, self.width), (7, 7), strides=(2, 2),
                          padding=((3, 3), (3, 3)), use_bias=False,
                          kernel_init=conv_kernel_init, dtype=self.dtype, name='stem_conv')(out)
            out = nn.relu(batch_norm(train, self.dtype, 'stem_norm', self.batch_norm_axis)(out))
            # Flax pads max pooling with -inf, as PyTorch's MaxPool2d(3, 2, padding=1).
            out = nn.max_pool(out, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        stage_strides = (1, 2, 2, self.last_stride)
        stages = list(zip(self.stage_planes, self.blocks_per_stage, stage_strides, strict=True))
        for stage in range(start + 1, stop + 1):
            planes, num_blocks, stride = stages[stage - 1]
            for block in range(1, num_blocks + 1):
                out = Bottleneck(scaled_channels(planes, self.width),
                                 stride if block == 1 else 1,
                                 zero_init_last_norm=self.zero_init_last_norm, dtype=self.dtype,
                                 batch_norm_axis=self.batch_norm_axis,
                                 name=f'stage{stage}_block{block}')(out, train)
        return pool_features(out, self.feature_pool) if stop == self.num_stages else out
