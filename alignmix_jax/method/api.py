"""AlignMix in your own training loop: mix a batch, get the soft targets.

For a user with their own Flax (or any JAX) model split into F: x -> A (channels-last feature
tensors) and a head g, in the spirit of big_vision's `mixup`: each function takes a key, the
batch, its integer labels, the number of classes and alpha, and returns a `MixedBatch` whose
`mixed` goes through the rest of the network and whose `targets` go into a soft-target
cross-entropy (e.g. `optax.softmax_cross_entropy(logits, batch.targets)`, Eq. 6).

    batch = api.mix_aligned_features(key, F(x), labels, num_classes, alpha=2.0)   # Eq. 12
    batch = api.mix_aligned_features(key, F(x), labels, num_classes, 2.0, prime=True)  # 13
    batch = api.mix_inputs(key, x, labels, num_classes, alpha=2.0)                # Eq. 3

Algorithm 1 draws one of these per mini-batch (the README's example does it). Everything is
jit-compatible (num_classes, prime, align, num_iters and lambda_per static) and draws its
permutation and lambda from `key` alone. The arithmetic lives in `mixup` and `alignment`;
this module only composes it.
"""

from typing import Any, NamedTuple

import jax

from alignmix_jax.method import mixup


class MixedBatch(NamedTuple):
    mixed: Any  # the mixed inputs or features, shape and dtype of the given ones
    targets: jax.Array  # (b, num_classes) float32 soft targets, Eq. (1)
    lam: jax.Array  # the lambda of each pair: shape () ('batch') or (b,) ('example')
    permutation: jax.Array  # (b,): example i is mixed with example permutation[i]
    plan: jax.Array | None  # (b, r, r) transport plans of the feature modes (None otherwise)


def mix_inputs(key: jax.Array, images: jax.Array, labels: jax.Array, num_classes: int,
               alpha: float, *, label_smoothing: float = 0.0,
               lambda_per: str = 'batch') -> MixedBatch:
    """Input mixup (Eq. 2, 3): x mixed with x' = x[pi], lambda ~ Beta(alpha, alpha).

    `images` (b, ...) in any dtype; `labels` (b,) integers. `label_smoothing` smooths the
    labels before they are mixed (timm's); `lambda_per` 'example' draws one lambda per pair.
    """
    permutation, lam = mixup.sample_pairing(key, labels.shape[0], alpha, lambda_per=lambda_per)
    targets = mixup.mixed_targets(mixup.smooth_one_hot(labels, num_classes, label_smoothing),
                                  permutation, lam)
    return MixedBatch(mixup.mix(*mixup.pair(images, permutation), lam), targets, lam,
                      permutation, None)


def mix_aligned_features(key: jax.Array, features: jax.Array, labels: jax.Array,
                         num_classes: int, alpha: float, *, prime: bool = False,
                         align: bool = True, epsilon: float = 0.1, num_iters: int = 100,
                         label_smoothing: float = 0.0, lambda_per: str = 'batch') -> MixedBatch:
    """AlignMix (Eq. 7-12): A mixed with A aligned to its partner A' = A[pi].

    Args:
      key: the draw of the permutation pi and lambda ~ Beta(alpha, alpha).
      features: F's output A, channels last (b, h, w, c); the plans are solved in float32
        and carry no gradient, the mixed features get gradients through A and A'.
      labels: (b,) integer labels.
      num_classes: k, the width of the targets.
      alpha: lambda ~ Beta(alpha, alpha) (the paper: 2).
      prime: Algorithm 1's feat' (Eq. 13): the pair and the labels swapped, A' mixed with A'
        aligned to A.
      align: False mixes A and A' without alignment (the paper's Table 8, 'unaligned').
      epsilon, num_iters: Sinkhorn's absolute entropic regularisation and its exact number of
        iterations (the paper: 0.1 and 100).
      label_smoothing: timm's label smoothing, applied before the labels are mixed.
      lambda_per: 'batch' (one lambda) or 'example' (one per pair).

    Returns:
      A `MixedBatch`; `alignment.marginal_error(batch.plan)` tells how far Sinkhorn is from
      convergence.
    """
    permutation, lam = mixup.sample_pairing(key, labels.shape[0], alpha, lambda_per=lambda_per)
    mixed, plan = mixup.mix_features(features, permutation, lam, swap=prime, align=align,
                                     epsilon=epsilon, num_iters=num_iters)
    targets = mixup.mixed_targets(mixup.smooth_one_hot(labels, num_classes, label_smoothing),
                                  permutation, lam, swap=prime)
    return MixedBatch(mixed, targets, lam, permutation, plan)
