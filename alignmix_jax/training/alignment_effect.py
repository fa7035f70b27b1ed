"""What alignment changes in a feature-mode step: `train/alignment_effect`, measured on a model.

The effect of a step is `mixup.alignment_effect(e_aligned, e_unaligned)`: e_aligned
is the step's own embedding, f of the pair mixed with alignment (Eq. 12 or 13), e_unaligned is
f of the same pair mixed without it, same lambda. It is the one figure that tells a run whose
alignment acts from one where aligned mixing is exactly mixing the pooled features (an f that
averages A linearly before anything nonlinear: the columns of R sum to one).

e_unaligned is an extra forward of f alone, without gradient, and it must see the batch
statistics of the real forward, not those of the unaligned batch (which would make the two
differ even behind an inert head) nor the running averages. f is run in evaluation mode with
each of its BatchNorm layers' running statistics replaced by the batch statistics that layer
computed on the aligned mixed batch; for a BatchNorm layer, train-mode f(A) equals eval-mode
f(A) with those statistics. The statistics are captured by intercepting every nn.BatchNorm call
of f (`batch_statistics`), so this holds for any encoder's f (the head's BatchNorm, a
transformer's own head, none at all) without a case per encoder. They are computed as flax
computes them for `use_fast_variance=False` (two passes, float32, the mean over the layer's
`axis_name` when BatchNorm is synchronised), the setting of every BatchNorm of f here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from alignmix_jax.method import mixup

# Measured: behind inert heads at most 2.6e-5 (float rounding through the BatchNorm
# statistics of F), behind live ones at least 0.11 on an initial model.
INERT_THRESHOLD = 1e-3


def _layer_statistics(module: nn.BatchNorm, inputs: jax.Array):
    """(mean, var) of one BatchNorm layer's input over all axes but its feature axes."""
    inputs = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
    feature_axes = {axis % inputs.ndim for axis in
                    (module.axis if isinstance(module.axis, tuple) else (module.axis,))}
    axes = tuple(axis for axis in range(inputs.ndim) if axis not in feature_axes)

    def mean(value):
        value = jnp.mean(value, axis=axes)
        return value if module.axis_name is None else jax.lax.pmean(value, module.axis_name)

    mu = mean(inputs)
    return mu, mean(jnp.square(inputs - jnp.expand_dims(mu, axes)))


def batch_statistics(model, variables, inputs, method: str = 'embed') -> dict:
    """The batch statistics that every BatchNorm layer of `method` (train mode) computes on
    `inputs`: a 'batch_stats'-shaped tree ({} when the method has no BatchNorm)."""
    captured = {}

    def capture(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == '__call__':
            mean, var = _layer_statistics(module, args[0])
            captured[module.path] = {'mean': mean, 'var': var}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        model.apply(variables, inputs, train=True, method=method, mutable=['batch_stats'])
    flat = {path + (name,): value for path, layer in captured.items()
            for name, value in layer.items()}
    return traverse_util.unflatten_dict(flat)


def with_batch_statistics(batch_stats, statistics) -> dict:
    """`batch_stats` with the layers of `statistics` replaced by them."""
    flat = traverse_util.flatten_dict(dict(batch_stats))
    flat.update(traverse_util.flatten_dict(statistics))
    return traverse_util.unflatten_dict(flat)


def measure(mode: str, model, params, batch_stats, features, permutation, lam,
            mixed_features, embedding, *, swap: bool) -> jax.Array:
    """`train/alignment_effect` of one feature-mode (or embedding-tensor-mode) forward.

    `features`: what was mixed (A, or E in the embedding-tensor modes), `mixed_features` that
    mixed with alignment and `embedding` the e computed from it in train mode; `batch_stats`
    the statistics f was applied with; `swap` whether the pair was mixed swapped, (A', A)
    (feat', except with the public code's reused plan, which mixes A R with A' on (A, A')'s
    lambda sides). No gradient flows through the figure.
    """
    unaligned = mixup.mix(*mixup.pair(features, permutation, swap=swap), lam)
    if mode in mixup.TENSOR_EMBEDDING_MODES:
        # e = E flattened: nothing but a reshape between the mixing and e.
        unaligned_embedding = model.apply({'params': params}, unaligned,
                                          method='flatten_embedding')
    else:
        variables = {'params': params, 'batch_stats': batch_stats}
        statistics = batch_statistics(model, variables, jax.lax.stop_gradient(mixed_features))
        unaligned_embedding = model.apply(
            {'params': params, 'batch_stats': with_batch_statistics(batch_stats, statistics)},
            unaligned, train=False, method='embed')
    return mixup.alignment_effect(jax.lax.stop_gradient(embedding),
                                  jax.lax.stop_gradient(unaligned_embedding))
