"""PreActResNet18 for 32x32 inputs: the stage-1 encoder F: x -> A of AlignMixup on CIFAR.

The network of He et al. (2016), "Identity Mappings in Deep Residual Networks", in the CIFAR
layout used by manifold mixup and the public AlignMixup code: a 3x3 stem at full resolution and
four stages of two pre-activation basic blocks. It returns the feature tensor A (NHWC) of the
last block as it is, before any normalisation: the head (f) owns the final BatchNorm + ReLU so
that mixing and alignment act on the raw residual stream.

The pre-activation block is shared with `wide_resnet.py`; the layers (BatchNorm settings,
convolutions, feature pooling, initialisation) are `layers.py`'s.
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

SHORTCUTS = ('identity', 'preactivated')


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut; output left unnormalised.

    Where the shape changes, the shortcut is a 1x1 convolution of the pre-activated input
    relu(bn1(x)) (He et al. 2016 and the public AlignMixup code alike). Where the shape is kept,
    `shortcut` says what is added:
    - 'identity': the block's input x, He et al.'s pre-activation block (an unnormalised
      residual stream from the stem to A);
    - 'preactivated': relu(bn1(x)), what the public AlignMixup PreActBlock adds (it always
      applies its `self.shortcut`, an empty nn.Sequential when the shape is kept, to the
      pre-activated input), so every block restarts the stream from a normalised tensor.
    """

    channels: int
    stride: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None
    shortcut: str = 'identity'

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        preactivated = nn.relu(batch_norm(train, self.dtype, 'norm1', self.batch_norm_axis)(x))
        if self.stride != 1 or x.shape[-1] != self.channels:
            shortcut = nn.Conv(self.channels, (1, 1), strides=(self.stride, self.stride),
                               padding='VALID', use_bias=False, kernel_init=conv_kernel_init,
                               dtype=self.dtype, name='shortcut')(preactivated)
        elif self.shortcut == 'preactivated':
            shortcut = preactivated
        elif self.shortcut == 'identity':
            shortcut = x
        else:
            raise ValueError(f'unknown PreActBlock shortcut {self.shortcut!r}; valid: '
                             f'{", ".join(SHORTCUTS)}')
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

    `shortcut` (config.model.preact_resnet18.shortcut): the identity shortcuts of the five
    blocks that keep their shape (stage 1's two, the second of stages 2-4), 'identity' (He et
    al.) or 'preactivated' (the public AlignMixup network); see `PreActBlock`. Both have the
    same parameters.
    """

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None
    shortcut: str = 'identity'

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
                                  shortcut=self.shortcut,
                                  name=f'stage{stage}_block{block}')(out, train)
        return pool_features(out, self.feature_pool) if stop == self.num_stages else out
