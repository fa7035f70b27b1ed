"""The start-up refusal of runs whose alignment changes nothing.

Behind an f that averages A linearly before anything nonlinear (global average pooling, then
linear layers: the public code's head), the columns of R sum to one, so the spatial mean of
A' R^T is that of A' and the feature modes are exactly mixup of the pooled features. Whether a
model is such a model is decided by measuring it, not by its config's names, so the check holds
for every backbone: before the first step, `check_alignment_acts` runs a feature mode's forward
(`mode_forward.mixed_forward`, whose `alignment_effect.measure` is the step's own
`train/alignment_effect`) with the initial model on the first batch, and refuses the run when
the effect is below `alignment_effect.INERT_THRESHOLD`. The pairs are fixed (each image with
the next one, lambda = 1/2), so no pair is an image with itself and the figure does not depend
on a draw.
"""

import jax
import jax.numpy as jnp
import ml_collections

from alignmix_jax.data import augmentation
from alignmix_jax.method import mixup
from alignmix_jax.training import alignment_effect, mode_forward

# Enough pairs to measure f's response; fewer than a large run's batch, so the check is cheap.
_CHECK_EXAMPLES = 16


def measured_mode(config: ml_collections.ConfigDict) -> str | None:
    """The first configured mode whose alignment the check measures (None: no such mode, or
    alignment off)."""
    if not config.mixup.align:
        return None
    aligned_modes = mixup.FEATURE_MODES + mixup.TENSOR_EMBEDDING_MODES
    return next((mode for mode in config.mixup.modes if mode in aligned_modes), None)


def startup_effect(config: ml_collections.ConfigDict, model, variables, images,
                   mode: str) -> float:
    """`train/alignment_effect` of `mode` on `images` (raw, as the dataset yields them)."""
    batch = augmentation.normalize(jnp.asarray(images[:_CHECK_EXAMPLES]), config.dataset.mean,
                                   config.dataset.std)
    size = batch.shape[0]
    if size < 2:
        raise ValueError('the inert-alignment check needs at least 2 images in a batch; set '
                         'mixup.allow_inert_alignment=True to skip it')
    permutation = jnp.roll(jnp.arange(size), 1)
    # Outside shard_map: BatchNorm over this batch alone.
    model = model.clone(batch_norm_axis=None)

    def effect(variables, batch):
        return mode_forward.mixed_forward(
            mode, model, variables['params'], variables.get('batch_stats', {}), batch,
            jnp.zeros((size, model.num_classes), jnp.float32), permutation, jnp.float32(0.5),
            config.mixup).alignment_effect

    return float(jax.jit(effect)(variables, batch))


def check_alignment_acts(config: ml_collections.ConfigDict, model, variables,
                         images) -> float | None:
    """Raises ValueError if the configured feature modes' alignment is inert in `model`
    (`variables`: the initial ones) on `images`; returns the measured effect (None: nothing
    to measure, or mixup.allow_inert_alignment)."""
    mode = measured_mode(config)
    if mode is None or config.mixup.allow_inert_alignment:
        return None
    effect = startup_effect(config, model, variables, images, mode)
    if effect < alignment_effect.INERT_THRESHOLD:
        raise ValueError(
            f'alignment changes nothing in this model (alignment_effect {effect:.2g} < '
            f'{alignment_effect.INERT_THRESHOLD:g} in mode {mode!r} on the first batch): f '
            'averages A linearly (pooling, then linear layers) before anything nonlinear, so '
            'aligned mixing equals mixing the pooled features; give f a nonlinearity or the '
            'layout of A (model.head_norm=True, or model.flatten_features=True with '
            'model.embedding_dim > 0, or model.embedding_tensor_channels > 0), or set '
            'mixup.allow_inert_alignment=True to train this way on purpose')
    return effect
