"""A Vision Transformer (DeiT-S/16 by default) split into AlignMixup's stages F, f.

The network of Dosovitskiy et al. (2021) in the DeiT-S size of Touvron et al. (2021): the image
cut into p x p patches, each linearly embedded (a convolution with kernel = stride = p) to
d = 384 x width dimensions, a learned class token prepended, a learned position embedding
added, then `depth` = 12 pre-norm encoder blocks (LayerNorm, 6-head self-attention, residual;
LayerNorm, MLP of ratio 4 with exact GELU, residual) and a final LayerNorm. No dropout, no
stochastic depth: DeiT trains with drop path 0.1, which would need an rng in every stage call;
left out so F and f stay deterministic functions of their inputs.

The stages:

    F: x -> A   patch embedding, class token, position embedding and the first
                depth - head_blocks blocks. A is a `PatchTokens` pair: the patch tokens at
                their grid positions (b, h/p, w/p, d), which AlignMixup aligns and mixes as it
                does a ResNet's feature tensor, and the class token (b, d), mixed linearly
                (mixup.mix_features).
    f: A -> e   `head`: the last `head_blocks` blocks on [class token; patch tokens, row-major],
                the final LayerNorm, then the class token's output (without a class token: the
                mean patch token); the Classifier adds its optional Dense layer and g.

f contains transformer blocks so that e depends on how the patch tokens were aligned: in them
the class token attends to every patch token. With head_blocks=0 and a class token, e is the
normalised class token alone, and aligning the patch tokens would not change e at all. (f does
not depend on the order of the patch tokens: the position embedding is added once, in stage 1,
and lives on in their values. Alignment acts through which token of A' is mixed into which
token of A, as behind a ResNet's pooling head, but here the mixed tokens meet in attention.)

F's blocks are split into `num_stages` = 4 consecutive groups, as evenly as possible (group k
of n blocks: [k n / 4, (k + 1) n / 4)); representation k (k >= 1) is the `PatchTokens` after
group k (the embeddings belong to stage 1), A is representation 4: manifold mixup's hidden
modes mix representations 1..3.

On 32x32 CIFAR images use patch_size=4 (an 8x8 grid of 64 tokens); the ImageNet default
patch_size=16 gives 14x14 at 224x224. `last_stride` and `feature_pool` are the ResNets'
resolution options and must stay at 2 and 1: the grid is set by patch_size alone.

Parameters: 'patch_embedding' (conv), 'class_token' (d,), 'position_embedding' ('embedding':
(tokens, d), the class token's position first), 'block1'..'block{depth}' (each 'norm1',
'attention' with 'query', 'key', 'value', 'out', 'norm2', 'mlp' with 'dense1', 'dense2'),
'final_norm'. At 224x224 with a 1000-class Dense on e, DeiT-S/16 has 22,050,664 parameters,
as timm's deit_small_patch16_224 (whose qkv projection is one fused Linear).

Initialisation as timm and DeiT: Dense and patch-embedding kernels, position embedding and
class token drawn with standard deviation 0.02, biases zero, LayerNorm scale 1 and bias 0.

`dtype` is the computation dtype; parameters are float32. LayerNorm is computed in float32 and
cast back; the attention softmax is taken in float32 (flax's `force_fp32_for_softmax`: without
it, MultiHeadDotProductAttention takes the softmax in `dtype`; its logits are still the
product of `dtype` queries and keys).
"""

import typing
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from alignmix_jax.models.layers import (
    Mlp,
    attention_layer,
    embed_patches,
    float32_layer_norm,
    normalize,
    patch_embedding,
    scaled_channels,
    stage_range,
    transformer_init,
)

VIT_LAYER_NORM_EPSILON = 1e-6


class PatchTokens(typing.NamedTuple):
    """A transformer's representation: the patch tokens at their grid positions (b, gh, gw, d)
    and the class token (b, d), or None for a network without one. A pytree: mixup.mix and
    mixup.pair act on both parts alike."""

    grid: jnp.ndarray
    class_token: jnp.ndarray | None


class EncoderBlock(nn.Module):
    """A pre-norm transformer block on a token sequence (b, length, d)."""

    num_heads: int
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        attended = normalize(float32_layer_norm(VIT_LAYER_NORM_EPSILON, 'norm1'), x)
        x = x + attention_layer(self.num_heads, self.dtype, 'attention')(attended)
        hidden = normalize(float32_layer_norm(VIT_LAYER_NORM_EPSILON, 'norm2'), x)
        return x + Mlp(int(x.shape[-1] * self.mlp_ratio), self.dtype, name='mlp')(hidden)


class PositionEmbedding(nn.Module):
    """Adds a learned embedding to each position of a sequence (b, length, d); its parameter
    'embedding' (length, d) takes its shape from the first sequence it sees."""

    @nn.compact
    def __call__(self, sequence: jnp.ndarray) -> jnp.ndarray:
        embedding = self.param('embedding', transformer_init, sequence.shape[1:])
        return sequence + embedding.astype(sequence.dtype)


def block_groups(num_blocks: int, num_groups: int) -> list[range]:
    """Consecutive groups of blocks, as even as possible: group k is [k n / g, (k + 1) n / g)."""
    return [range(group * num_blocks // num_groups, (group + 1) * num_blocks // num_groups)
            for group in range(num_groups)]


class VisionTransformer(nn.Module):
    """F: normalised NHWC images -> PatchTokens; `head` is f's start. See the module docstring.

    `__call__(x, train, start, stop)` runs stages start+1..stop (`stage_range`): from the images
    (start 0) or a PatchTokens representation to representation `stop` (None: A).
    """

    width: float = 1.0
    last_stride: int = 2
    feature_pool: int = 1
    dtype: Any = jnp.float32
    batch_norm_axis: str | None = None  # unused: no BatchNorm
    patch_size: int = 16
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    class_token: bool = True
    head_blocks: int = 1

    base_dim = 384
    num_stages = 4

    def setup(self):
        if self.last_stride != 2 or self.feature_pool != 1:
            raise ValueError('the ViT\'s token grid is set by model.vit.patch_size: leave '
                             f'model.last_stride=2 and model.feature_pool=1 (got '
                             f'{self.last_stride}, {self.feature_pool})')
        if not 0 <= self.head_blocks <= self.depth:
            raise ValueError(f'model.vit.head_blocks must lie in [0, depth={self.depth}]; got '
                             f'{self.head_blocks}')
        dim = scaled_channels(self.base_dim, self.width)
        if dim % self.num_heads:
            raise ValueError(f'model.vit.num_heads={self.num_heads} does not divide the token '
                             f'dimension {dim} (384 x model.width)')
        self.patch_embedding = patch_embedding(dim, self.patch_size, self.dtype)
        if self.class_token:
            self.class_embedding = self.param('class_token', transformer_init, (dim,))
        self.position_embedding = PositionEmbedding()
        for index in range(self.depth):
            setattr(self, f'block{index + 1}',
                    EncoderBlock(self.num_heads, self.mlp_ratio, dtype=self.dtype))
        self.final_norm = float32_layer_norm(VIT_LAYER_NORM_EPSILON)

    def _block(self, index: int) -> EncoderBlock:
        return getattr(self, f'block{index + 1}')

    def _embed(self, images: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, int]]:
        """Images -> the token sequence [class token; patch tokens row-major] + positions."""
        patches = embed_patches(self.patch_embedding, images, 'model.vit.patch_size')
        sequence = patches.reshape(patches.shape[0], -1, patches.shape[-1])
        if self.class_token:
            class_tokens = jnp.broadcast_to(self.class_embedding.astype(sequence.dtype),
                                            (sequence.shape[0], 1, sequence.shape[-1]))
            sequence = jnp.concatenate([class_tokens, sequence], axis=1)
        return self.position_embedding(sequence), patches.shape[1:3]

    def _sequence(self, tokens: PatchTokens) -> jnp.ndarray:
        grid = tokens.grid
        sequence = grid.reshape(grid.shape[0], -1, grid.shape[-1])
        if (tokens.class_token is None) == self.class_token:
            raise ValueError(f'this ViT has class_token={self.class_token}; the tokens given '
                             f'{"lack" if self.class_token else "have"} one')
        if tokens.class_token is None:
            return sequence
        return jnp.concatenate([tokens.class_token[:, None, :].astype(sequence.dtype), sequence],
                               axis=1)

    def _tokens(self, sequence: jnp.ndarray, grid_shape: tuple[int, int]) -> PatchTokens:
        class_token = sequence[:, 0] if self.class_token else None
        patches = sequence[:, 1:] if self.class_token else sequence
        return PatchTokens(patches.reshape(patches.shape[0], *grid_shape, patches.shape[-1]),
                           class_token)

    def __call__(self, x, train: bool, start: int = 0, stop: int | None = None):
        """Representation `stop` (None: A) from representation `start` (0: images (b, h, w, 3);
        k >= 1: the PatchTokens after block group k)."""
        del train  # no dropout, no BatchNorm: training and evaluation compute the same
        start, stop = stage_range(start, stop, self.num_stages)
        if stop == 0:
            return x
        if start == 0:
            sequence, grid_shape = self._embed(x)
        else:
            sequence, grid_shape = self._sequence(x), x.grid.shape[1:3]
        groups = block_groups(self.depth - self.head_blocks, self.num_stages)
        for stage in range(start + 1, stop + 1):
            for index in groups[stage - 1]:
                sequence = self._block(index)(sequence)
        return self._tokens(sequence, grid_shape)

    def head(self, tokens: PatchTokens, train: bool) -> jnp.ndarray:
        """f's start: A -> (b, d). The last `head_blocks` blocks, the final LayerNorm, then the
        class token (or, without one, the mean patch token)."""
        del train
        sequence = self._sequence(tokens)
        for index in range(self.depth - self.head_blocks, self.depth):
            sequence = self._block(index)(sequence)
        sequence = normalize(self.final_norm, sequence)
        return sequence[:, 0] if self.class_token else jnp.mean(sequence, axis=1)
