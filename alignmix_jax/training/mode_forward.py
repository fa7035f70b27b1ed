"""The forward pass of each mode, for the train step: e = f(F(.)) with the mixing of the mode
between the model's stages, the soft targets, and the updated BatchNorm statistics.

`mixed_forward` composes Algorithm 1's modes (and the baselines') from `mixup`'s array
functions and the model's stages F, f, g, and returns them by name (`MixedForward`); the
aligned modes on A and on Table 8's tensor E share one path, so the Sinkhorn loop and feat''s
plan options act on both alike. `reconstruction_forward` is AlignMixup/AE's 'clean'
mode (Algorithm 1, lines 5-7); `contrastive_forward` the optional NT-Xent term. The gradients,
the optimizer and the sharded step are `train_step`'s.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from alignmix_jax.method import losses, mixup
from alignmix_jax.training import alignment_effect


def train_stage(model, params, method, inputs, batch_stats, **kwargs):
    """One stage of the model (`method`) in training mode: (outputs, new BatchNorm statistics)."""
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                                   train=True, method=method, mutable=['batch_stats'], **kwargs)
    return outputs, updates['batch_stats']


@struct.dataclass
class MixedForward:
    """What one mode's forward pass gives the step, by name (a pytree: it leaves the loss
    function as its aux).

    `lam` is the lambda the targets were mixed with (CutMix's area-corrected one; None for
    'none'); `plan` the transport plans (b, r, r) of an aligned mode (None otherwise, or with
    `mixup.align` False); `sinkhorn_iterations` the public loop's iteration count (None with
    the paper's fixed count); `alignment_effect` `alignment_effect.measure`'s figure of an
    aligned mode (else None).
    """
    logits: jax.Array
    targets: jax.Array
    batch_stats: Any
    lam: jax.Array | None = None
    plan: jax.Array | None = None
    sinkhorn_iterations: jax.Array | None = None
    alignment_effect: jax.Array | None = None


def mixed_forward(mode, model, params, batch_stats, images, one_hot, permutation, lam,
                  mixup_config, box_key=None) -> MixedForward:
    """The logits, soft targets and updated BatchNorm statistics of one mode (`MixedForward`).

    `mixup_config` is config.mixup; `box_key` draws CutMix's box (read in 'cutmix' only).
    """
    stage = functools.partial(train_stage, model, params)

    if mode == mixup.NO_MIXUP_MODE:
        # The baseline: e = f(F(x)) and the hard labels, through the same loss.
        features, batch_stats = stage('features', images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
        logits = model.apply({'params': params}, embedding, method='classify')
        return MixedForward(logits=logits, targets=one_hot, batch_stats=batch_stats)
    if mode in mixup.FEATURE_MODES + mixup.TENSOR_EMBEDDING_MODES:
        return _aligned_forward(mode, model, params, batch_stats, images, one_hot, permutation,
                                lam, mixup_config)
    if mode == mixup.CUTMIX_MODE:
        # Yun et al. (2019): a box of x' in x; lambda becomes the share of x left visible.
        mixed_images, lam = mixup.cutmix(box_key, images, permutation, lam)
        features, batch_stats = stage('features', mixed_images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
    elif mode == mixup.INPUT_MODE:
        # Eq. (2), (3): e = f(F(mix(x, x'))).
        features, batch_stats = stage('features', mixup.mix(*mixup.pair(
            images, permutation), lam), batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
    elif mode in mixup.HIDDEN_MODES:
        # Manifold mixup (Verma et al., 2019): F's stages up to k on the clean batch, the
        # mixed output of stage k through the rest of F.
        level = mixup.hidden_stage(mode)
        hidden, batch_stats = stage('features', images, batch_stats, stop=level)
        features, batch_stats = stage('features', mixup.mix(*mixup.pair(
            hidden, permutation), lam), batch_stats, start=level)
        embedding, batch_stats = stage('embed', features, batch_stats)
    elif mode == mixup.EMBEDDING_MODE:
        # Eq. (2), (5): e = mix(f(F(x)), f(F(x'))); x' is x permuted, so F and f run once.
        features, batch_stats = stage('features', images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
        embedding = mixup.mix(*mixup.pair(embedding, permutation), lam)
    else:
        raise ValueError(f'unknown mixup mode {mode!r}; expected one of {mixup.ALL_MODES}')
    logits = model.apply({'params': params}, embedding, method='classify')
    return MixedForward(logits=logits, targets=mixup.mixed_targets(one_hot, permutation, lam),
                        batch_stats=batch_stats, lam=lam)


def _aligned_forward(mode, model, params, batch_stats, images, one_hot, permutation, lam,
                     mixup_config) -> MixedForward:
    """The aligned modes: Eq. (12) or (13) on A (feat, feat'), or on Table 8's tensor E =
    conv(A) (embedding_tensor, embedding_tensor_prime), with the same options for both: the
    Sinkhorn loop, feat''s plan, and the targets of the pair as it was mixed."""
    stage = functools.partial(train_stage, model, params)
    features, batch_stats = stage('features', images, batch_stats)
    on_tensor = mode in mixup.TENSOR_EMBEDDING_MODES
    if on_tensor:
        features, batch_stats = stage('embed_to_tensor', features, batch_stats)
    mixed, plan, iterations = mixup.align_and_mix(
        features, permutation, lam, swap=mode in mixup.SWAPPED_MODES, align=mixup_config.align,
        epsilon=mixup_config.epsilon, num_iters=mixup_config.sinkhorn_iters,
        cost_scale=mixup_config.cost_scale, sinkhorn=mixup_config.sinkhorn,
        prime_plan=mixup_config.prime_plan, threshold=mixup_config.sinkhorn_threshold)
    # What f was applied with: the alignment effect's unaligned forward of f uses it too.
    f_stats = batch_stats
    if on_tensor:  # e = E flattened: no stage of its own between the mixing and e
        embedding = model.apply({'params': params}, mixed, method='flatten_embedding')
    else:
        embedding, batch_stats = stage('embed', mixed, batch_stats)
    # The reused plan mixes A R with A' on the sides of (A, A'); Eq. (13) the swapped pair.
    swapped = mixup.targets_swapped(mode, mixup_config.prime_plan)
    effect = None
    if plan is not None:
        effect = alignment_effect.measure(mode, model, params, f_stats, features, permutation,
                                          lam, mixed, embedding, swap=swapped)
    logits = model.apply({'params': params}, embedding, method='classify')
    targets = mixup.mixed_targets(one_hot, permutation, lam, swap=swapped)
    return MixedForward(logits=logits, targets=targets, batch_stats=batch_stats, lam=lam,
                        plan=plan, sinkhorn_iterations=iterations, alignment_effect=effect)


def reconstruction_forward(model, params, batch_stats, images, noise_key, kl_weight):
    """Algorithm 1, lines 5-7: the loss of D(f(F(x))) against x, BatchNorm statistics, metrics.

    A VAE decodes a reparameterised sample of its posterior and adds the KL term, divided like
    the reconstruction loss by the number of pixel values (so kl_weight = 1 is the ELBO).
    """

    stage = functools.partial(train_stage, model, params)

    features, batch_stats = stage('features', images, batch_stats)
    embedding, batch_stats = stage('embed', features, batch_stats)
    noise, kl_divergence = None, None
    if model.decoder_type == 'vae':
        mean, log_sigma = model.apply({'params': params}, embedding, method='posterior_parts')
        noise = jax.random.normal(noise_key, mean.shape, jnp.float32)
        kl_divergence = jnp.mean(losses.gaussian_kl(mean, log_sigma))
    reconstructions, batch_stats = stage('decode', embedding, batch_stats, noise=noise)
    reconstruction_loss = jnp.mean(losses.reconstruction_loss(images, reconstructions))
    step_metrics = {'reconstruction_loss': reconstruction_loss}
    loss = reconstruction_loss
    if kl_divergence is not None:
        loss = loss + kl_weight * kl_divergence / np.prod(images.shape[1:])
        step_metrics['kl_divergence'] = kl_divergence
    return loss, batch_stats, step_metrics


def contrastive_forward(model, params, batch_stats, views, temperature):
    """SimCLR's NT-Xent on the embeddings e = f(F(v)) of two views (stacked: first all of view
    one, then view two, in the same order); a VAE's e is its mean. (loss, BatchNorm statistics)
    """
    stage = functools.partial(train_stage, model, params)
    features, batch_stats = stage('features', views, batch_stats)
    embeddings, batch_stats = stage('embed', features, batch_stats)
    if model.decoder_type == 'vae':
        embeddings = model.apply({'params': params}, embeddings, method='posterior_parts')[0]
    first, second = jnp.split(embeddings, 2)
    return losses.nt_xent(first, second, temperature), batch_stats
