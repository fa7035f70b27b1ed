"""Mixup of inputs, embeddings and aligned feature tensors (Algorithm 1 of the paper).

Pure functions on arrays: the train step composes them with the model's stages
F: x -> A, f: A -> e and g: e -> logits. One permutation pi and one lambda are drawn per
mini-batch (Algorithm 1, lines 1 and 9), and every mode mixes example i with example pi(i).
AlignMixup/AE's fifth mode, 'clean', mixes nothing: its loss is `reconstruction_loss` (line 7),
plus `gaussian_kl` for the VAE.

The comparison methods of the paper's Table 1 are modes too, drawn the same way:
'none' (the baseline: clean images, hard labels), 'cutmix' (Yun et al., 2019: `cutmix`), and
'hidden1', 'hidden2', 'hidden3' (mix the output of stage k of F, `hidden_stage`): manifold
mixup (Verma et al., 2019) draws among 'input' and hidden stages. Beyond the paper,
`nt_xent` is the optional SimCLR term the train step adds on two augmented views.

A transformer's representations are tokens rather than one tensor: a pair (grid, class token),
the patch tokens at their grid positions (b, h, w, c) and the class token (b, c) or None
(`models.vit.PatchTokens`). `mix` and `pair` act on every part of such a pair alike;
`mix_features` aligns the grid and mixes the class token linearly.
"""

import jax
import jax.numpy as jnp
import optax

from alignmix_jax import alignment

# 'feature_prime' is Algorithm 1's feat': the feature mode with the pair (and the labels) swapped,
# so that A' is aligned to A and mixed by Eq. (13) instead of Eq. (12).
MODES = ('input', 'embedding', 'feature', 'feature_prime')
FEATURE_MODES = ('feature', 'feature_prime')
# Table 8's {x, E}: the same two modes on the embedding tensor E instead of A (models with
# embedding_tensor_channels > 0).
TENSOR_EMBEDDING_MODES = ('embedding_tensor', 'embedding_tensor_prime')
# Modes that swap the pair and the labels (Algorithm 1, line 17).
SWAPPED_MODES = ('feature_prime', 'embedding_tensor_prime')
# AlignMixup/AE's fifth choice (Algorithm 1, lines 5-7): no mixup, reconstruction of x.
CLEAN_MODE = 'clean'
# The baselines' modes: no mixup, CutMix, and mixing the output of stage k of F (manifold
# mixup's hidden layers; which k exist depends on the encoder).
NO_MIXUP_MODE = 'none'
CUTMIX_MODE = 'cutmix'
HIDDEN_MODES = ('hidden1', 'hidden2', 'hidden3')
BASELINE_MODES = (NO_MIXUP_MODE, CUTMIX_MODE) + HIDDEN_MODES
ALL_MODES = MODES + TENSOR_EMBEDDING_MODES + BASELINE_MODES + (CLEAN_MODE,)


def hidden_stage(mode: str) -> int:
    """The stage k whose output a 'hiddenk' mode mixes."""
    if mode not in HIDDEN_MODES:
        raise ValueError(f'{mode!r} is not one of the hidden-stage modes {HIDDEN_MODES}')
    return int(mode.removeprefix('hidden'))


def validate_modes(modes, *, with_decoder: bool = False,
                   encoder_stages: int = 4) -> tuple[str, ...]:
    """The modes to draw from, as a tuple; raises a one-line error naming unknown ones.

    With a decoder, 'clean' joins the listed mixup modes (Algorithm 1, line 2: five choices
    drawn uniformly), unless it is listed already (list it twice to draw it twice as often).
    Without one, 'clean' is an error. 'hiddenk' needs an encoder of more than k stages
    (`encoder_stages`; the output of the last one is A, mixed by the feature modes).
    """
    modes = tuple(modes)
    valid = ALL_MODES if with_decoder else MODES + TENSOR_EMBEDDING_MODES + BASELINE_MODES
    unknown = [mode for mode in modes if mode not in valid]
    if not modes or unknown:
        raise ValueError(
            f'config.mixup.modes must be a non-empty list of {valid}; got {modes}'
            + ('' if with_decoder else " ('clean' needs config.model.decoder 'ae' or 'vae')"))
    too_deep = [mode for mode in modes
                if mode in HIDDEN_MODES and hidden_stage(mode) >= encoder_stages]
    if too_deep:
        hidden = HIDDEN_MODES[:max(encoder_stages - 1, 0)]
        raise ValueError(f'config.mixup.modes: {too_deep[0]!r} needs an encoder with more than '
                         f'{hidden_stage(too_deep[0])} stages; this one has {encoder_stages} '
                         f'(hidden modes: {hidden or "none"})')
    if with_decoder and CLEAN_MODE not in modes:
        modes += (CLEAN_MODE,)
    return modes


def sample_pairing(key: jax.Array, batch_size: int, alpha: float):
    """Algorithm 1, lines 1 and 9: a random permutation of the batch and lambda ~ Beta(a, a)."""
    permutation_key, lam_key = jax.random.split(key)
    permutation = jax.random.permutation(permutation_key, batch_size)
    lam = jax.random.beta(lam_key, alpha, alpha)
    return permutation, lam


def mix(u, v, lam: jax.Array):
    """Eq. (2): mix_lambda(u, v) = lambda u + (1 - lambda) v, in the dtype of `u`; arrays, or
    pytrees of arrays (tokens) mixed part by part."""

    def mix_array(u, v):
        mixing = jnp.asarray(lam, u.dtype)
        return mixing * u + (1 - mixing) * v

    return jax.tree.map(mix_array, u, v)


def pair(values, permutation: jax.Array, *, swap: bool = False):
    """The pairs (v, v') = (v_i, v_pi(i)) of Algorithm 1 line 10, or (v', v) if `swap` (line 17);
    `values` an array or a pytree of arrays (tokens) with the batch first."""
    partners = jax.tree.map(lambda value: value[permutation], values)
    return (partners, values) if swap else (values, partners)


def mixed_targets(one_hot: jax.Array, permutation: jax.Array, lam: jax.Array, *,
                  swap: bool = False) -> jax.Array:
    """Eq. (1): the soft target mix_lambda(y, y') of the pair (y, y') (swapped for feat')."""
    return mix(*pair(one_hot, permutation, swap=swap), lam)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Eq. (6): per-example cross-entropy of softmax(logits) against soft targets, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets * log_probs, axis=-1)


def mix_features(features, permutation: jax.Array, lam: jax.Array, *,
                 swap: bool, align: bool, epsilon: float, num_iters: int,
                 cost_scale: str = 'none'):
    """Mixes the feature tensors A (b, h, w, c) of each pair, aligned or not.

    Without swap, A is mixed with A aligned to A' (Eq. 12); with swap, the pair is swapped
    first (Algorithm 1, line 17), so A' is mixed with A' aligned to A (Eq. 13). Returns the
    mixed tensor and the transport plans (b, r, r), or None when `align` is False (the
    unaligned rows of the paper's Table 8 mix A and A' directly).

    A transformer's tokens (grid, class token): the patch tokens are A, aligned and mixed as
    above (r = the number of patches, one plan per pair), and the class token, which has no
    position, is mixed linearly (Eq. 2); returned as the same kind of pair.

    `cost_scale` is `alignment.transport_plan`'s ('none': the paper's absolute epsilon).
    """
    if isinstance(features, tuple):
        grid, class_token = features
        mixed_grid, plan = mix_features(grid, permutation, lam, swap=swap, align=align,
                                        epsilon=epsilon, num_iters=num_iters,
                                        cost_scale=cost_scale)
        mixed_class_token = (None if class_token is None
                             else mix(*pair(class_token, permutation, swap=swap), lam))
        return type(features)(mixed_grid, mixed_class_token), plan
    anchor, partner = pair(features, permutation, swap=swap)
    if not align:
        return mix(anchor, partner, lam), None
    plan = alignment.transport_plan(anchor, partner, epsilon=epsilon, num_iters=num_iters,
                                    cost_scale=cost_scale)
    # Eq. (10): the anchor aligned to its partner, A~ = A' R^T (no gradient through the plan).
    aligned_partner = alignment.apply_plan(plan, partner)
    return mix(anchor, aligned_partner, lam), plan


def alignment_effect(aligned_embeddings: jax.Array, unaligned_embeddings: jax.Array
                     ) -> jax.Array:
    """How much alignment changes what g sees: mean over pairs of ||e_a - e_u|| / ||e_u||.

    `aligned_embeddings` are f of each pair's features mixed with alignment (Eq. 12 or 13),
    `unaligned_embeddings` f of the same pair mixed without it, same lambda, both (b, d); a
    scalar in float32. Exactly 0 behind an f that averages A linearly (pooling then a linear
    layer): R's columns sum to one, so the spatial mean of A' R^T is that of A'.
    """
    aligned = aligned_embeddings.astype(jnp.float32).reshape(aligned_embeddings.shape[0], -1)
    unaligned = unaligned_embeddings.astype(jnp.float32).reshape(aligned.shape)
    change = jnp.linalg.norm(aligned - unaligned, axis=-1)
    # An all-zero e_unaligned (e.g. all ReLUs off) gives 0 / tiny, not NaN, when e_aligned is 0.
    size = jnp.maximum(jnp.linalg.norm(unaligned, axis=-1), jnp.finfo(jnp.float32).tiny)
    return jnp.mean(change / size)


def cutmix(key: jax.Array, images: jax.Array, permutation: jax.Array, lam: jax.Array):
    """CutMix (Yun et al., 2019, Eq. 1-2): a box of x' pasted into x; returns (images, lambda).

    One box for the whole batch, as one lambda: sides round(H sqrt(1 - lambda)) and
    round(W sqrt(1 - lambda)) (area about (1 - lambda) H W), centred at a uniformly drawn pixel
    and clipped at the image border. The returned lambda is 1 - (clipped box area) / (H W), the
    share of x that is left, so that the labels mix_lambda(y, y') (Eq. 1) weigh each image by
    the pixels it shows, as Yun et al. correct it. `images` (b, h, w, c) in any dtype.
    """
    height, width = images.shape[1:3]
    row_key, column_key = jax.random.split(key)
    side = jnp.sqrt(1.0 - jnp.asarray(lam, jnp.float32))
    box_height = jnp.round(height * side).astype(jnp.int32)
    box_width = jnp.round(width * side).astype(jnp.int32)
    centre_row = jax.random.randint(row_key, (), 0, height)
    centre_column = jax.random.randint(column_key, (), 0, width)
    top = jnp.clip(centre_row - box_height // 2, 0, height)
    bottom = jnp.clip(centre_row - box_height // 2 + box_height, 0, height)
    left = jnp.clip(centre_column - box_width // 2, 0, width)
    right = jnp.clip(centre_column - box_width // 2 + box_width, 0, width)
    rows, columns = jnp.arange(height), jnp.arange(width)
    in_box = (((rows >= top) & (rows < bottom))[:, None]
              & ((columns >= left) & (columns < right))[None, :])
    images, partners = pair(images, permutation)
    mixed = jnp.where(in_box[None, :, :, None], partners, images)
    kept_share = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    return mixed, kept_share


def reconstruction_loss(images: jax.Array, reconstructions: jax.Array) -> jax.Array:
    """Algorithm 1, line 7: L_r(x, x_hat) = ||x - x_hat||^2 per example, in float32.

    Divided by the number of pixel values (h w c): the mean squared error, so that the scale of
    the clean mode's gradient does not grow with the image size.
    """
    difference = images.astype(jnp.float32) - reconstructions.astype(jnp.float32)
    return jnp.mean(jnp.square(difference), axis=tuple(range(1, images.ndim)))


def gaussian_kl(mean: jax.Array, log_sigma: jax.Array) -> jax.Array:
    """KL(N(mean, sigma^2) || N(0, 1)) per example, summed over the latent dimensions."""
    mean, log_sigma = mean.astype(jnp.float32), log_sigma.astype(jnp.float32)
    return 0.5 * jnp.sum(jnp.square(mean) + jnp.exp(2 * log_sigma) - 1 - 2 * log_sigma, axis=-1)


def nt_xent(first: jax.Array, second: jax.Array, temperature: float) -> jax.Array:
    """SimCLR's NT-Xent loss (Chen et al., 2020, Eq. 1), in float32, averaged over the 2N
    embeddings of N examples seen in two views (`first`, `second`: (N, d), row i of each the
    same example): each one's positive is its other view, its negatives the 2N - 2 others,
    similarities are cosines divided by `temperature`. optax.ntxent with the pairs as labels.
    """
    embeddings = jnp.concatenate([first, second]).astype(jnp.float32)
    examples = jnp.arange(first.shape[0])
    return optax.ntxent(embeddings, jnp.concatenate([examples, examples]), temperature)
