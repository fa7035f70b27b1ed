"""The decoder D: e -> x_hat of AlignMixup/AE (paper Section 3.3), a residual generator.

The family of the WGAN-GP ResNet generator (Gulrajani et al., 2017): a linear layer maps the
embedding to a small spatial map, upsampling residual blocks double its resolution, and a final
BatchNorm + ReLU + 3x3 convolution + tanh gives an image. The blocks are the pre-activation
blocks of the encoder run upwards: BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3, with a nearest
upsampling + 1x1 convolution shortcut, so D belongs to the "same architecture family as the
encoder".

Sizes follow the input resolution: the starting map is the image side halved until it is odd
or at most 7 (32 -> 4x4 and 3 blocks, 64 -> 4x4 and 4 blocks, 224 -> 7x7 and 5 blocks). Channels
mirror PreActResNet18's stages in reverse: `base_channels` (512 x width) on the starting map,
halved by every block down to a floor of base / 8 (256, 128, 64 at 8, 16 and 32 pixels).

Output range: the reconstruction target is the *normalised* image x = (pixel - mean) / std that
F sees, so tanh gives pixel values in [0, 1] through (tanh + 1) / 2, which are then normalised
with the same per-channel mean and std: every output lies in the range of a normalised image.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import batch_norm, conv3x3, conv_kernel_init


def decoder_layout(image_size: int) -> tuple[int, int]:
    """(side of the starting map, number of upsampling blocks) for square images of this side."""
    if image_size < 1:
        raise ValueError(f'decoder image size must be positive; got {image_size}')
    side, num_blocks = image_size, 0
    while side % 2 == 0 and side > 7:
        side, num_blocks = side // 2, num_blocks + 1
    return side, num_blocks


def upsample(x: jnp.ndarray) -> jnp.ndarray:
    """Nearest-neighbour upsampling by 2 on (b, h, w, c)."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UpsamplingBlock(nn.Module):
    """BN-ReLU-upsample-conv3x3-BN-ReLU-conv3x3 plus an upsampled 1x1-convolution shortcut."""

    channels: int
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        out = nn.relu(batch_norm(train, self.dtype, 'norm1', self.batch_norm_axis)(x))
        out = conv3x3(self.channels, 1, self.dtype, 'conv1')(upsample(out))
        out = nn.relu(batch_norm(train, self.dtype, 'norm2', self.batch_norm_axis)(out))
        out = conv3x3(self.channels, 1, self.dtype, 'conv2')(out)
        shortcut = nn.Conv(self.channels, (1, 1), use_bias=False, kernel_init=conv_kernel_init,
                           dtype=self.dtype, name='shortcut')(upsample(x))
        return out + shortcut


class ResidualDecoder(nn.Module):
    """D: (b, d) embeddings -> (b, image_size, image_size, 3) normalised images, float32.

    Parameters: 'project' (Dense to the starting map), 'block{1..n}', 'out_norm', 'out_conv'.
    """

    image_size: int
    base_channels: int = 512
    mean: Sequence[float] = (0.0, 0.0, 0.0)
    std: Sequence[float] = (1.0, 1.0, 1.0)
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None

    @nn.compact
    def __call__(self, e: jnp.ndarray, train: bool) -> jnp.ndarray:
        side, num_blocks = decoder_layout(self.image_size)
        floor = max(1, self.base_channels // 8)
        out = nn.Dense(side * side * self.base_channels, dtype=self.dtype, name='project')(e)
        out = out.reshape(e.shape[0], side, side, self.base_channels)
        for block in range(1, num_blocks + 1):
            out = UpsamplingBlock(max(floor, self.base_channels // 2**block), dtype=self.dtype,
                                  batch_norm_axis=self.batch_norm_axis,
                                  name=f'block{block}')(out, train)
        out = nn.relu(batch_norm(train, self.dtype, 'out_norm', self.batch_norm_axis)(out))
        # Flax's default fan-in initialisation here, not He's fan-out one: with 3 output
        # channels the latter puts the pre-tanh values at a standard deviation of ~2, where tanh
        # saturates and the reconstruction gradient vanishes from the first step.
        out = nn.Conv(len(self.mean), (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                      name='out_conv')(out)
        pixels = (jnp.tanh(out.astype(jnp.float32)) + 1.0) / 2.0  # in [0, 1]
        return (pixels - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std,
                                                                             jnp.float32)
