"""The training losses: Eq. (6)'s soft-target cross-entropy, AlignMixup/AE's reconstruction
loss (Algorithm 1, line 7) and the VAE's KL term, and the optional SimCLR NT-Xent term.

Per example and in float32 (the step averages them over its slice of the batch), except NT-Xent,
which is a mean over the views by definition.
"""

import jax
import jax.numpy as jnp
import optax


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Eq. (6): per-example cross-entropy of softmax(logits) against soft targets, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.sum(targets * log_probs, axis=-1)


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
