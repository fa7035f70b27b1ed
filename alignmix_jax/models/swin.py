"""A Swin Transformer (Swin-T by default) split into AlignMixup's stages F, f.

The network of Liu et al. (2021): the image cut into p x p patches, each linearly embedded (a
convolution with kernel = stride = p) to C = 96 x width channels and layer-normalised, then
four stages of (2, 2, 6, 2) pre-norm blocks with (3, 6, 12, 24) heads. Each block attends
within non-overlapping windows of window_size x window_size tokens, with a learned relative
position bias; every second block shifts the windows by half a window (a cyclic shift of the
map, with a mask so that no token attends to one that the shift brought over from the opposite
border). Between stages, patch merging concatenates each 2x2 cell's tokens (4C), normalises
them and maps them linearly to 2C. MLP ratio 4 with exact GELU, LayerNorm epsilon 1e-5. No
dropout, no stochastic depth (Swin-T trains with drop path 0.2): F and f stay deterministic
functions of their inputs.

A stage whose token grid fits in one window attends over the whole grid (window = the grid's
side) and does not shift, as in the reference code. Window sizes must divide the grids.

The stages:

    F: x -> A   the four stages; representation k is stage k's output (b, h, w, c), the patch
                merging belonging to the start of the next stage. A is stage 4's output,
                (b, h, w, 8C) before the final LayerNorm, averaged over p x p cells with
                `feature_pool` = p; it is aligned and mixed as a ResNet's feature tensor.
    f: A -> e   `head`: the final LayerNorm at every position, then the mean over positions
                (b, 8C); the Classifier adds its optional Dense layer and g. As with a ResNet's
                BatchNorm + ReLU + pooling head, only the per-position nonlinearity (here the
                LayerNorm) lets e depend on how A was aligned.

`last_stride`: 2, the patch merging before stage 4 halves the resolution (7x7 at 224x224);
1, it keeps it. Concatenating 2x2 cells cannot keep the resolution, so that merging is then a
LayerNorm of each token (C) and a linear map to 2C (a stride-1 merging; its parameters differ
from the reference's).

Grids: at 224x224 with the defaults (patch 4, window 7) 56, 28, 14, 7. On 32x32 CIFAR images
use patch_size=2, window_size=4, last_stride=1: grids 16, 8, 4, 4, so A is 4x4 as a
PreActResNet18's.

Parameters: 'patch_embedding' (conv), 'patch_norm', 'stage{k}_merging' (k = 2..4: 'norm',
'reduction'), 'stage{k}_block{i}' (each 'norm1', 'relative_position_bias_table'
((2 window - 1)^2, heads), 'attention' with 'query', 'key', 'value', 'out', 'norm2', 'mlp'),
'final_norm'. At 224x224 with a 1000-class Dense on e, Swin-T has 28,288,354 parameters, as
timm's swin_tiny_patch4_window7_224 (the relative position index is a constant, not a
parameter).

Initialisation, `dtype` handling, LayerNorm in float32 and the float32 attention softmax as in
`vit.py` (Dense kernels, patch embedding and relative position bias tables drawn with standard
deviation 0.02, biases zero). The relative position bias and the shift mask are applied by
flax's attention through `attention_fn` and `mask`.
"""

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from alignmix_jax.models.layers import (
    Mlp,
    attention_layer,
    embed_patches,
    float32_layer_norm,
    normalize,
    patch_embedding,
    pool_features,
    scaled_channels,
    stage_range,
    transformer_init,
)

SWIN_LAYER_NORM_EPSILON = 1e-5


def window_and_shift(height: int, width: int, window_size: int, shifted: bool) -> tuple[int, int]:
    """The window side used on a height x width grid, and the cyclic shift (0: none)."""
    if min(height, width) <= window_size:  # one window covers the grid: nothing to shift
        return min(height, width), 0
    return window_size, window_size // 2 if shifted else 0


def partition_windows(x: jnp.ndarray, window: int) -> jnp.ndarray:
    """(b, h, w, c) -> (b, windows, window^2, c): windows row-major, tokens row-major in each."""
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height // window, window, width // window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, -1, window * window, channels)


def merge_windows(windows: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """The inverse of `partition_windows`."""
    batch, _, area, channels = windows.shape
    window = int(round(area ** 0.5))
    x = windows.reshape(batch, height // window, width // window, window, window, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height, width, channels)


def relative_position_index(window: int) -> np.ndarray:
    """(window^2, window^2): for tokens i, j of a window, the row of the bias table that holds
    the bias of their offset (dy, dx), each in [-(window - 1), window - 1]."""
    rows, columns = np.divmod(np.arange(window * window), window)
    offset_rows = rows[:, None] - rows[None, :] + window - 1
    offset_columns = columns[:, None] - columns[None, :] + window - 1
    return offset_rows * (2 * window - 1) + offset_columns


def shifted_window_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """(windows, window^2, window^2) booleans: may token i of a window attend to token j?

    After the cyclic shift by `shift`, the last `shift` rows and columns of the map come from
    the opposite border; the windows that straddle them hold up to four regions that were not
    neighbours. Tokens attend only within their own region.
    """
    wrapped_rows = np.arange(height) >= height - shift
    wrapped_columns = np.arange(width) >= width - shift
    region = 2 * wrapped_rows[:, None] + wrapped_columns[None, :]
    regions = partition_windows(region[None, :, :, None], window)[0, :, :, 0]
    return regions[:, :, None] == regions[:, None, :]


class SwinBlock(nn.Module):
    """A pre-norm block of (shifted) window attention and an MLP on a map (b, h, w, c)."""

    num_heads: int
    window_size: int = 7
    shifted: bool = False
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        _, height, width, channels = x.shape
        window, shift = window_and_shift(height, width, self.window_size, self.shifted)
        if height % window or width % window:
            raise ValueError(f'{self.name}: window_size={self.window_size} does not divide the '
                             f'{height}x{width} token grid; change model.swin.window_size (or '
                             'patch_size)')
        table = self.param('relative_position_bias_table', transformer_init,
                           ((2 * window - 1) ** 2, self.num_heads))
        # (heads, window^2, window^2), added to the attention logits of every window.
        bias = table[relative_position_index(window)].transpose(2, 0, 1)
        mask = None
        if shift:
            # (windows, 1, q, k): broadcast over the batch and the heads.
            mask = jnp.asarray(shifted_window_mask(height, width, window, shift)[:, None])
        attention = attention_layer(
            self.num_heads, self.dtype, 'attention',
            attention_fn=functools.partial(nn.dot_product_attention, bias=bias))
        attended = normalize(float32_layer_norm(SWIN_LAYER_NORM_EPSILON, 'norm1'), x)
        if shift:
            attended = jnp.roll(attended, (-shift, -shift), axis=(1, 2))
        attended = merge_windows(attention(partition_windows(attended, window), mask=mask),
                                 height, width)
        if shift:
            attended = jnp.roll(attended, (shift, shift), axis=(1, 2))
        x = x + attended
        hidden = normalize(float32_layer_norm(SWIN_LAYER_NORM_EPSILON, 'norm2'), x)
        return x + Mlp(int(channels * self.mlp_ratio), self.dtype, name='mlp')(hidden)


class PatchMerging(nn.Module):
    """(b, h, w, c) -> (b, h / stride, w / stride, 2c): each 2x2 cell's tokens concatenated
    (stride 2) or each token alone (stride 1), LayerNorm, a linear map without bias."""

    stride: int = 2
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, height, width, channels = x.shape
        if self.stride == 2:
            if height % 2 or width % 2:
                raise ValueError(f'{self.name}: patch merging halves the {height}x{width} token '
                                 'grid, which needs even sides; change model.swin.patch_size')
            # Concatenated in the reference's order: (0, 0), (1, 0), (0, 1), (1, 1) as
            # (row, column) offsets in the cell, so converted weights line up.
            x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
            x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, height // 2, width // 2, -1)
        x = normalize(float32_layer_norm(SWIN_LAYER_NORM_EPSILON, 'norm'), x)
        return nn.Dense(2 * channels, use_bias=False, kernel_init=transformer_init,
                        dtype=self.dtype, name='reduction')(x)


class SwinTransformer(nn.Module):
    """F: normalised NHWC images -> A (b, h, w, 8C); `head` is f's start. See the module
    docstring. `__call__(x, train, start, stop)` runs stages start+1..stop (`stage_range`)."""

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None  # unused: no BatchNorm
    patch_size: int = 4
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    window_size: int = 7
    mlp_ratio: float = 4.0

    base_dim = 96
    num_stages = 4

    def setup(self):
        if len(self.depths) != self.num_stages or len(self.num_heads) != self.num_stages:
            raise ValueError(f'model.swin.depths and model.swin.num_heads need one entry per '
                             f'stage ({self.num_stages}); got {self.depths}, {self.num_heads}')
        if self.last_stride not in (1, 2):
            raise ValueError(f'model.last_stride must be 1 or 2; got {self.last_stride}')
        dim = scaled_channels(self.base_dim, self.width)
        for stage, heads in enumerate(self.num_heads):
            if (dim << stage) % heads:
                raise ValueError(f'model.swin.num_heads={heads} does not divide the '
                                 f'{dim << stage} channels of stage {stage + 1}')
        self.patch_embedding = patch_embedding(dim, self.patch_size, self.dtype)
        self.patch_norm = float32_layer_norm(SWIN_LAYER_NORM_EPSILON)
        for stage in range(1, self.num_stages + 1):
            if stage > 1:
                stride = self.last_stride if stage == self.num_stages else 2
                setattr(self, f'stage{stage}_merging', PatchMerging(stride, dtype=self.dtype))
            for block in range(1, self.depths[stage - 1] + 1):
                setattr(self, f'stage{stage}_block{block}', SwinBlock(
                    self.num_heads[stage - 1], self.window_size, shifted=block % 2 == 0,
                    mlp_ratio=self.mlp_ratio, dtype=self.dtype))
        self.final_norm = float32_layer_norm(SWIN_LAYER_NORM_EPSILON)

    def _stage(self, stage: int, x: jnp.ndarray) -> jnp.ndarray:
        if stage == 1:
            x = normalize(self.patch_norm,
                          embed_patches(self.patch_embedding, x, 'model.swin.patch_size'))
        else:
            x = getattr(self, f'stage{stage}_merging')(x)
        for block in range(1, self.depths[stage - 1] + 1):
            x = getattr(self, f'stage{stage}_block{block}')(x)
        return x

    def __call__(self, x: jnp.ndarray, train: bool, start: int = 0,
                 stop: int | None = None) -> jnp.ndarray:
        """Representation `stop` (None: A) from representation `start` (0: the images)."""
        del train  # no dropout, no BatchNorm: training and evaluation compute the same
        start, stop = stage_range(start, stop, self.num_stages)
        for stage in range(start + 1, stop + 1):
            x = self._stage(stage, x)
        if stop == self.num_stages and start < stop:
            x = pool_features(x, self.feature_pool)
        return x

    def head(self, a: jnp.ndarray, train: bool) -> jnp.ndarray:
        """f's start: A (b, h, w, 8C) -> (b, 8C), the final LayerNorm then the mean position."""
        del train
        return jnp.mean(normalize(self.final_norm, a), axis=(1, 2))
