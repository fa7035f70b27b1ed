"""Wide residual network (Zagoruyko & Komodakis, 2016) for 32x32 inputs, WRN16-8 by default.

The stage-1 encoder F: x -> A. A 3x3 stem with 16 channels, then three groups of (depth-4)/6
pre-activation wide basic blocks with 16k, 32k and 64k channels (k = widen_factor) and strides
1, 2, `last_stride`; no dropout. The blocks are those of the reference implementation:
BN-ReLU-conv3x3 (carrying the stride)-BN-ReLU-conv3x3, convolutions without bias, and a 1x1
projection of the pre-activated input where the shape changes (the same block as
PreActResNet18's, shared from `preact_resnet.py`). A is returned unnormalised; the head (f)
applies the final BatchNorm + ReLU.

Initialisation as in `preact_resnet.py`: He normal (fan_out) convolutions, BatchNorm scale 1,
bias 0.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import conv3x3, pool_features, scaled_channels, stage_range
from alignmix_jax.models.preact_resnet import PreActBlock


class WideResNet(nn.Module):
    """F: normalised NHWC images -> A; (b, 8, 8, 64 * widen_factor * width) on 32x32 inputs.

    `last_stride=1` keeps the last group at 16x16; `feature_pool=p` averages A over p x p cells.
    Parameters: 'stem' (conv), 'stage{1,2,3}_block{i}' (each 'norm1', 'conv1', 'norm2',
    'conv2' and, where the shape changes, 'shortcut'). `start`/`stop` run a part of the
    groups: representation 1 is group 1's output (32x32), 2 is group 2's (16x16).
    """

    depth: int = 16
    widen_factor: int = 8
    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    num_stages = 3

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
                 stop: int | None = None) -> jnp.ndarray:
        """Groups start+1..stop of F (see `preact_resnet.stage_range`); all by default."""
        if (self.depth - 4) % 6:
            raise ValueError(f'WideResNet depth must be 6n + 4 (16, 22, 28, ...); got {self.depth}')
        start, stop = stage_range(start, stop, self.num_stages)
        blocks_per_group = (self.depth - 4) // 6
        group_channels = [16 * self.widen_factor * 2**group for group in range(3)]
        group_strides = (1, 2, self.last_stride)
        groups = list(zip(group_channels, group_strides, strict=True))
        out = x
        if start == 0 < stop:  # the stem belongs to stage 1
            out = conv3x3(scaled_channels(16, self.width), 1, self.dtype, 'stem')(out)
        for group in range(start + 1, stop + 1):
            channels, stride = groups[group - 1]
            for block in range(1, blocks_per_group + 1):
                out = PreActBlock(scaled_channels(channels, self.width),
                                  stride if block == 1 else 1, dtype=self.dtype,
                                  batch_norm_axis=self.batch_norm_axis,
                                  name=f'stage{group}_block{block}')(out, train)
        return pool_features(out, self.feature_pool) if stop == self.num_stages else out
