"""Mixup of inputs, embeddings and aligned feature tensors (Algorithm 1 of the paper).

Pure functions on arrays: the train step composes them with the model's stages
F: x -> A, f: A -> e and g: e -> logits. One permutation pi is drawn per mini-batch
(Algorithm 1, line 1) and every mode mixes example i with example pi(i). Algorithm 1 draws
lambda inside its loop over the examples (line 9), one per pair; by default we draw one per
mini-batch instead (`config.mixup.lambda_per='batch'`), because the public AlignMixup code
does (one np.random.beta per batch) and our parity runs follow it; `lambda_per='example'`
draws one per pair as Algorithm 1 writes it (`sample_pairing`).
AlignMixup/AE's fifth mode, 'clean', mixes nothing: its loss is `losses.reconstruction_loss`
(line 7), plus `losses.gaussian_kl` for the VAE.

The comparison methods of the paper's Table 1 are modes too, drawn the same way:
'none' (the baseline: clean images, hard labels), 'cutmix' (Yun et al., 2019: `cutmix`), and
'hidden1', 'hidden2', 'hidden3' (mix the output of stage k of F, `hidden_stage`): manifold
mixup (Verma et al., 2019) draws among 'input' and hidden stages. (The losses, among them the
optional SimCLR term on two augmented views, are in `alignmix_jax.method.losses`.)

A transformer's representations are tokens rather than one tensor: a pair (grid, class token),
the patch tokens at their grid positions (b, h, w, c) and the class token (b, c) or None
(`models.vit.PatchTokens`). `mix` and `pair` act on every part of such a pair alike;
`mix_features` aligns the grid and mixes the class token linearly.

The mode names and the checks of a mode list and of timm's options are pure Python and live in
`config_choices` (the settings check reads them before JAX is imported); they are imported
here, so `mixup.FEATURE_MODE`, `mixup.validate_modes` etc. name the same objects.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alignmix_jax.method import alignment
from alignmix_jax.settings.config_choices import (  # noqa: F401
    ALL_MODES,
    BASELINE_MODES,
    CLEAN_MODE,
    CUTMIX_MODE,
    EMBEDDING_MODE,
    EMBEDDING_TENSOR_MODE,
    EMBEDDING_TENSOR_PRIME_MODE,
    FEATURE_MODE,
    FEATURE_MODES,
    FEATURE_PRIME_MODE,
    HIDDEN_MODES,
    INPUT_MODE,
    LAMBDA_PER,
    MODES,
    NO_MIXUP_MODE,
    PRIME_PLANS,
    SINKHORNS,
    SWAPPED_MODES,
    TENSOR_EMBEDDING_MODES,
    check_options,
    hidden_stage,
    validate_modes,
)

# Stream tag of the per-batch draw of config.mixup.probability (see scheduled_mode).
_PROBABILITY_STREAM = 0x70726F62


def sample_pairing(key: jax.Array, batch_size: int, alpha: float, *,
                   lambda_per: str = 'batch'):
    """Algorithm 1, lines 1 and 9: a random permutation of the batch and lambda ~ Beta(a, a).

    `lambda_per` 'batch': one lambda for the whole batch, shape () (the public code's choice);
    'example': one per pair, shape (batch_size,), as Algorithm 1 writes it in its loop over
    examples (timm's mode='elem'). The permutation is the same either way.
    """
    check_options(lambda_per=lambda_per)
    permutation_key, lam_key = jax.random.split(key)
    permutation = jax.random.permutation(permutation_key, batch_size)
    shape = (batch_size,) if lambda_per == 'example' else ()
    lam = jax.random.beta(lam_key, alpha, alpha, shape)
    return permutation, lam


def smooth_one_hot(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Integer labels (b,) to float32 targets (b, num_classes), label-smoothed as timm does it.

    1 - s + s/k at the label and s/k elsewhere (k = num_classes, s = `smoothing`); the soft
    targets of a mixup mode mix these (Eq. 1), as timm's Mixup smooths before it mixes. With
    s = 0 they are exactly the one-hot labels.
    """
    check_options(label_smoothing=smoothing)
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    is_label = jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_)
    return jnp.where(is_label, jnp.float32(on_value), jnp.float32(off_value))


def scheduled_mode(mode: str, *, seed: int, step: int, epoch: int, probability: float = 1.0,
                   off_epoch: int | None = None) -> str:
    """The mode step `step` (in 0-based epoch `epoch`) trains with: `mode`, or 'none' (clean
    images, the hard or smoothed labels) when this batch is not mixed.

    timm's Mixup options: from epoch `off_epoch` on no batch is mixed (mixup_off_epoch; None:
    never off), and before it a batch is mixed with probability `probability` (prob), one
    draw per batch. The draw is a function of (seed, step) alone, from a stream of its own,
    so a resumed run draws what the uninterrupted run drew, and the other per-step draws
    (the mode, the pairing) are the same with and without the option. A host-side numpy draw
    rather than one from the step's device key, because the mode is a static argument of
    the compiled step, chosen on the host before it runs. 'clean' (AlignMixup/AE's
    reconstruction) and 'none' mix nothing and are returned as they are.
    """
    check_options(probability=probability, off_epoch=off_epoch)
    if mode in (NO_MIXUP_MODE, CLEAN_MODE):
        return mode
    if off_epoch is not None and epoch >= off_epoch:
        return NO_MIXUP_MODE
    if probability < 1.0 and np.random.default_rng(
            [seed, _PROBABILITY_STREAM, step]).random() >= probability:
        return NO_MIXUP_MODE
    return mode


def _broadcast_lambda(lam, like: jax.Array) -> jax.Array:
    """lambda in the dtype of `like`, shaped to broadcast over its trailing axes: one per batch
    (shape ()) or one per example (shape (b,), against `like` of shape (b, ...))."""
    mixing = jnp.asarray(lam, like.dtype)
    return mixing.reshape(mixing.shape + (1,) * (like.ndim - mixing.ndim))


def mix(u, v, lam: jax.Array):
    """Eq. (2): mix_lambda(u, v) = lambda u + (1 - lambda) v, in the dtype of `u`; arrays, or
    pytrees of arrays (tokens) mixed part by part. `lam` is one lambda (shape ()) or one per
    example (shape (b,) for arrays of shape (b, ...)); traced, so no value recompiles."""

    def mix_array(u, v):
        mixing = _broadcast_lambda(lam, u)
        return mixing * u + (1 - mixing) * v

    return jax.tree.map(mix_array, u, v)


def pair(values, permutation: jax.Array, *, swap: bool = False):
    """The pairs (v, v') = (v_i, v_pi(i)) of Algorithm 1 line 10, or (v', v) if `swap` (line 17);
    `values` an array or a pytree of arrays (tokens) with the batch first."""
    partners = jax.tree.map(lambda value: value[permutation], values)
    return (partners, values) if swap else (values, partners)


def mixed_targets(one_hot: jax.Array, permutation: jax.Array, lam: jax.Array, *,
                  swap: bool = False) -> jax.Array:
    """Eq. (1): the soft target mix_lambda(y, y') of the pair (y, y') (swapped for feat').

    `one_hot`: the targets of the clean labels, (b, k), one-hot or label-smoothed
    (`smooth_one_hot`); `lam` one per batch or one per pair, as for `mix`."""
    return mix(*pair(one_hot, permutation, swap=swap), lam)


def mix_features(features, permutation: jax.Array, lam: jax.Array, *,
                 swap: bool, align: bool, epsilon: float, num_iters: int,
                 cost_scale: str = 'none'):
    """Mixes the feature tensors A (b, h, w, c) of each pair, aligned or not.

    Without swap, A is mixed with A aligned to A' (Eq. 12); with swap, the pair is swapped
    first (Algorithm 1, line 17), so A' is mixed with A' aligned to A (Eq. 13). Returns the
    mixed tensor and the transport plans (b, r, r), or None when `align` is False (the
    unaligned rows of the paper's Table 8 mix A and A' directly). `lam` is one per batch or
    one per pair (b,), pair i mixed with its own lambda (the plans do not depend on it).

    A transformer's tokens (grid, class token): the patch tokens are A, aligned and mixed as
    above (r = the number of patches, one plan per pair), and the class token, which has no
    position, is mixed linearly (Eq. 2); returned as the same kind of pair.

    `cost_scale` is `alignment.transport_plan`'s ('none': the paper's absolute epsilon).
    `align_and_mix` is the same with the public code's Sinkhorn and plan reuse as options.
    """
    mixed, plan, _ = align_and_mix(features, permutation, lam, swap=swap, align=align,
                                   epsilon=epsilon, num_iters=num_iters, cost_scale=cost_scale)
    return mixed, plan


def targets_swapped(mode: str, prime_plan: str = 'fresh') -> bool:
    """Whether `mode` mixes the swapped pair's targets (y', y): the swapped modes (feat' and
    its tensor E twin) do, except with the public code's reused plan, which mixes A R with A'
    and so keeps A's label on the lambda side."""
    return mode in SWAPPED_MODES and prime_plan == 'fresh'


def align_and_mix(features, permutation: jax.Array, lam: jax.Array, *,
                  swap: bool, align: bool, epsilon: float, num_iters: int,
                  cost_scale: str = 'none', sinkhorn: str = 'paper',
                  prime_plan: str = 'fresh', threshold: float = 0.1):
    """`mix_features` with the public AlignMixup code's two choices as options; returns
    (mixed, plans or None, Sinkhorn iterations run or None).

    `sinkhorn` (config.mixup.sinkhorn): 'paper', `alignment.transport_plan` (exactly
    `num_iters` iterations); 'public', `alignment.public_transport_plan` (at most `num_iters`,
    the whole slice stopping once the mean L1 change of A's potential falls below `threshold`;
    `cost_scale` must then be 'none', as the public cost is unscaled).

    `prime_plan` (config.mixup.prime_plan), read with `swap` only: 'fresh', Eq. (13) with its
    own plan from A' to A; 'reuse', as the public code: the plan P of A to A' is reused, A
    laid out as A' by A~' = A R (R = r P transposed onto A''s positions), and the mix is
    lam A~' + (1 - lam) A', its targets lam y + (1 - lam) y' (`targets_swapped` is False).
    A plan solved from A to A' is exact on A''s marginal only, so behind a pooling head A~'
    is A's positions weighted by the plan's unconverged row sums, not the mean of A.
    """
    if sinkhorn not in SINKHORNS:
        raise ValueError(f'config.mixup.sinkhorn must be one of {SINKHORNS}; got {sinkhorn!r}')
    if prime_plan not in PRIME_PLANS:
        raise ValueError(f'config.mixup.prime_plan must be one of {PRIME_PLANS}; got '
                         f'{prime_plan!r}')
    if isinstance(features, tuple):
        grid, class_token = features
        mixed_grid, plan, iterations = align_and_mix(
            grid, permutation, lam, swap=swap, align=align, epsilon=epsilon,
            num_iters=num_iters, cost_scale=cost_scale, sinkhorn=sinkhorn,
            prime_plan=prime_plan, threshold=threshold)
        swapped = swap and prime_plan == 'fresh'
        mixed_class_token = (None if class_token is None
                             else mix(*pair(class_token, permutation, swap=swapped), lam))
        return type(features)(mixed_grid, mixed_class_token), plan, iterations
    reuse = swap and prime_plan == 'reuse'
    anchor, partner = pair(features, permutation, swap=swap and not reuse)
    if not align:
        return mix(anchor, partner, lam), None, None
    iterations = None
    if sinkhorn == 'public':
        if cost_scale != 'none':
            raise ValueError("config.mixup.sinkhorn='public' solves the unscaled cost: set "
                             "config.mixup.cost_scale='none'")
        plan, iterations = alignment.public_transport_plan(
            anchor, partner, epsilon=epsilon, max_iters=num_iters, threshold=threshold)
    else:
        plan = alignment.transport_plan(anchor, partner, epsilon=epsilon, num_iters=num_iters,
                                        cost_scale=cost_scale)
    if reuse:
        # A~' = A R: position j of A' receives sum_i R_ij a_i (the plan read by columns).
        return mix(alignment.apply_plan(jnp.swapaxes(plan, -1, -2), anchor), partner, lam), \
            plan, iterations
    # Eq. (10): the anchor aligned to its partner, A~ = A' R^T (no gradient through the plan).
    aligned_partner = alignment.apply_plan(plan, partner)
    return mix(anchor, aligned_partner, lam), plan, iterations


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

    With one lambda (shape ()), one box for the whole batch: sides round(H sqrt(1 - lambda))
    and round(W sqrt(1 - lambda)) (area about (1 - lambda) H W), centred at a uniformly drawn
    pixel and clipped at the image border. With one lambda per pair (shape (b,)), each pair
    gets its own box, sized by its lambda and placed by its own draw (timm's mode='elem').
    The returned lambda (of the same shape) is 1 - (clipped box area) / (H W), the share of x
    that is left, so that the labels mix_lambda(y, y') (Eq. 1) weigh each image by the pixels
    it shows, as Yun et al. correct it. `images` (b, h, w, c) in any dtype.
    """
    height, width = images.shape[1:3]
    lam = jnp.asarray(lam, jnp.float32)
    if lam.ndim == 0:
        in_box, kept_share = _cutmix_box(key, lam, height, width)
        in_box = in_box[None]
    else:
        boxes = functools.partial(_cutmix_box, height=height, width=width)
        in_box, kept_share = jax.vmap(boxes)(jax.random.split(key, lam.shape[0]), lam)
    images, partners = pair(images, permutation)
    mixed = jnp.where(in_box[..., None], partners, images)
    return mixed, kept_share


def _cutmix_box(key: jax.Array, lam: jax.Array, height: int, width: int):
    """One CutMix box for a scalar lambda: its (h, w) mask and the share of pixels outside it."""
    row_key, column_key = jax.random.split(key)
    side = jnp.sqrt(1.0 - lam)
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
    kept_share = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (height * width)
    return in_box, kept_share
