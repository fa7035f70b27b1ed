"""The forward pass of each mode, for the train step: e = f(F(.)) with the mixing of the mode
between the model's stages, the soft targets, and the updated BatchNorm statistics.

`mixed_forward` composes Algorithm 1's modes (and the baselines') from `mixup`'s array
functions and the model's stages F, f, g; `reconstruction_forward` is AlignMixup/AE's 'clean'
mode (Algorithm 1, lines 5-7); `contrastive_forward` the optional NT-Xent term. The gradients,
the optimizer and the sharded step are `train_step`'s.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from alignmix_jax.method import losses, mixup
from alignmix_jax.training import alignment_effect


def train_stage(model, params, method, inputs, batch_stats, **kwargs):
    """One stage of the model (`method`) in training mode: (outputs, new BatchNorm statistics)."""
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                                   train=True, method=method, mutable=['batch_stats'], **kwargs)
    return outputs, updates['batch_stats']


def mixed_forward(mode, model, params, batch_stats, images, one_hot, permutation, lam,
                   mixup_config, box_key=None):
    """Logits, soft targets, updated BatchNorm statistics, the plan (or None; with
    `mixup.sinkhorn='public'` the pair (plan, iterations run)), the lambda the targets were
    mixed with (None for 'none') and, in the aligned feature and embedding-tensor modes,
    `alignment_effect.measure`'s figure (else None) of one mode."""

    stage = functools.partial(train_stage, model, params)

    plan = iterations = effect = None
    prime_plan = mixup_config.get('prime_plan', 'fresh')
    swap = mode in mixup.SWAPPED_MODES
    if mode == mixup.NO_MIXUP_MODE:
        # The baseline: e = f(F(x)) and the hard labels, through the same loss.
        features, batch_stats = stage('features', images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
        logits = model.apply({'params': params}, embedding, method='classify')
        return logits, one_hot, batch_stats, None, None, None
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
    elif mode in mixup.FEATURE_MODES:
        # Eq. (12) or (13): e = f(mix(A, A~)), A~ the anchor aligned to its partner.
        features, batch_stats = stage('features', images, batch_stats)
        mixed_features, plan, iterations = mixup.align_and_mix(
            features, permutation, lam, swap=swap, align=mixup_config.align,
            epsilon=mixup_config.epsilon, num_iters=mixup_config.sinkhorn_iters,
            cost_scale=mixup_config.cost_scale, sinkhorn=mixup_config.get('sinkhorn', 'paper'),
            prime_plan=prime_plan, threshold=mixup_config.get('sinkhorn_threshold', 0.1))
        feature_stats = batch_stats
        embedding, batch_stats = stage('embed', mixed_features, batch_stats)
        if plan is not None:
            effect = alignment_effect.measure(
                mode, model, params, feature_stats, features, permutation, lam, mixed_features,
                embedding, swap=mixup.targets_swapped(mode, prime_plan))
    elif mode in mixup.TENSOR_EMBEDDING_MODES:
        # Table 8's E: Eq. (12) or (13) on E = conv(A) instead of A, then e = E flattened.
        features, batch_stats = stage('features', images, batch_stats)
        tensor, batch_stats = stage('embed_to_tensor', features, batch_stats)
        mixed_tensor, plan = mixup.mix_features(
            tensor, permutation, lam, swap=swap, align=mixup_config.align,
            epsilon=mixup_config.epsilon, num_iters=mixup_config.sinkhorn_iters,
            cost_scale=mixup_config.cost_scale)
        embedding = model.apply({'params': params}, mixed_tensor, method='flatten_embedding')
        if plan is not None:
            effect = alignment_effect.measure(mode, model, params, batch_stats, tensor,
                                              permutation, lam, mixed_tensor, embedding,
                                              swap=swap)
    else:
        raise ValueError(f'unknown mixup mode {mode!r}; expected one of {mixup.ALL_MODES}')
    logits = model.apply({'params': params}, embedding, method='classify')
    targets = mixup.mixed_targets(one_hot, permutation, lam,
                                  swap=mixup.targets_swapped(mode, prime_plan))
    if iterations is not None:  # the public loop's iteration count, logged by the step
        plan = (plan, iterations)
    return logits, targets, batch_stats, plan, lam, effect


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
