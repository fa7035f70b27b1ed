"""The data-parallel train step: the state, the optimizer, the sharded step and the parameter
groups a mode leaves frozen (the forward pass of each mode is `mode_forward`'s).

Data parallel: the state is replicated over a one-axis device mesh and each global batch is
split over its devices. The step runs under `shard_map`: every device augments, pairs (its own
permutation and lambda), aligns and mixes its own slice of the batch, so no image or feature
tensor crosses devices; only the gradients and BatchNorm statistics are averaged. BatchNorm
normalises with the statistics of each device's slice (`model.sync_batch_norm=False`, as
PyTorch's DataParallel) or of the global batch (True). With one device this is plain
single-device training.

The step is jit-compiled once per mixup mode (the mode is a static argument, drawn on the host
for each step) and never synchronises with the host: its metrics stay on the device until the
loop fetches them. The device augments the batch inside the step when the dataset asks for it
(`device_augmentation`; ImageNet and CUB are augmented by their own pipelines).

AlignMixup/AE (`model.decoder` 'ae' or 'vae'): a fifth mode, 'clean', trains F, f and the
decoder D to reconstruct the clean (augmented, normalised) images; the mixup modes train F, f
and g. Each mode leaves the parameters it does not train bit for bit as they are, together with
their momentum: the optimizer runs on all parameters, then the step puts back the old values
of the untouched group (g in 'clean', D in the mixup modes) in the parameters and in every
parameter-shaped part of the optimizer state. Step counts (and so the learning rate schedule)
advance for all groups alike. Without this, weight decay and momentum would move g and D on
steps whose gradient for them is zero.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from alignmix_jax import models
from alignmix_jax.data import augmentation
from alignmix_jax.method import alignment, losses, mixup
from alignmix_jax.models import build_model_for_dataset, pretrained
from alignmix_jax.runtime import sharding
from alignmix_jax.training import divergence, mode_forward

# The streams folded into a device's key (the run's key folded in by step, then by device
# index) for the draws beside the augmentation and the pairing (its two halves): each has a
# key of its own, so turning one on leaves the others' draws as they were.
VAE_NOISE_STREAM = 1  # the VAE's sampling noise in 'clean'
CUTMIX_BOX_STREAM = 2  # CutMix's box
CONTRASTIVE_VIEW_STREAMS = (3, 4)  # the NT-Xent term's two augmented views


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # the run's key; each step folds in its step number and device index


def make_optimizer(train_config: ml_collections.ConfigDict, steps_per_epoch: int):
    """SGD with momentum and weight decay as PyTorch applies them, and the step schedule.

    Weight decay is added to the gradient before momentum (torch.optim.SGD's `weight_decay`),
    and the learning rate is multiplied by `lr_decay_factor` at each of `lr_decay_epochs`.
    If `classifier_learning_rate` is set, the classifier g has its own base learning rate (the
    paper's ImageNet protocol: 0.1 for g, 0.01 for the rest); `decoder_learning_rate` does the
    same for the decoder D of AlignMixup/AE. Returns the optimizer and the schedule of the
    other layers.
    """
    boundaries = {int(epoch * steps_per_epoch): train_config.lr_decay_factor
                  for epoch in train_config.lr_decay_epochs}

    def sgd(base_learning_rate):
        schedule = optax.piecewise_constant_schedule(base_learning_rate, boundaries)
        return optax.chain(
            optax.add_decayed_weights(train_config.weight_decay),
            optax.sgd(schedule, momentum=train_config.momentum,
                      nesterov=train_config.nesterov)), schedule

    optimizer, schedule = sgd(train_config.learning_rate)
    # Top-level parameter group -> its own base learning rate, where one is set.
    own_rates = {name: rate for name, rate in (
        ('classifier', train_config.classifier_learning_rate),
        ('decoder', train_config.decoder_learning_rate)) if rate is not None}
    if own_rates:
        def parameter_groups(params):
            return {name: jax.tree.map(
                lambda _, group=(name if name in own_rates else 'rest'): group,
                subtree) for name, subtree in params.items()}

        transforms = {name: sgd(rate)[0] for name, rate in own_rates.items()}
        optimizer = optax.multi_transform({**transforms, 'rest': optimizer}, parameter_groups)
    return optimizer, schedule


def create_train_state(config: ml_collections.ConfigDict, model, image_shape, steps_per_epoch,
                       mesh=None) -> TrainState:
    """The initial state, replicated on every device of `mesh` (default: all devices)."""
    optimizer, _ = make_optimizer(config.train, steps_per_epoch)

    def initial_state():
        init_key, run_key = models.run_keys(config.seed)
        variables = models.initial_variables(config, model, image_shape, init_key)
        state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  tx=optimizer, batch_stats=variables['batch_stats'],
                                  rng=run_key)
        # A concrete int32 step: with the default Python int the second call of each jitted
        # step would see a different input type and compile again.
        return state.replace(step=jnp.zeros((), jnp.int32))

    mesh = sharding.make_mesh() if mesh is None else mesh
    # Built by jit straight into its replicated layout, identically in every process.
    state = jax.jit(initial_state, out_shardings=sharding.replicated(mesh),
                    compiler_options=models.init_compiler_options())()
    if config.model.pretrained:
        # Outside the jit, so the weights are not compiled into the program as constants. A
        # resumed run then restores its checkpoint over them.
        loaded = pretrained.load_pretrained(
            {'params': state.params, 'batch_stats': state.batch_stats}, config.model.pretrained)
        state = state.replace(**loaded)
    return state


def build_training_model(config: ml_collections.ConfigDict, dataset):
    """The run's model for the train step: BatchNorm over the mesh's data axis if
    `model.sync_batch_norm`, else per device (see the module docstring)."""
    return build_model_for_dataset(config, dataset, batch_norm_axis=(
        sharding.DATA_AXIS if config.model.sync_batch_norm else None))


def frozen_groups(mode: str, params) -> tuple[str, ...]:
    """Top-level parameter groups a step of `mode` must leave untouched (see the module doc)."""
    if mode == mixup.CLEAN_MODE:
        return ('classifier',)  # g never sees decoded or clean-only batches
    return ('decoder',) if 'decoder' in params else ()


def device_gradients(state: TrainState, images, labels, device_index, *, mode: str, model,
                     config: ml_collections.ConfigDict, device_augmentation: bool = True):
    """Gradients, BatchNorm statistics and metrics of mixup `mode` on one device's slice.

    Algorithm 1 on the slice alone: its own augmentation (if `device_augmentation`),
    permutation pi and lambda, drawn from the run's key folded in by step and by `device_index`.
    """
    device_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device_index)
    augment_key, pairing_key = jax.random.split(device_key)
    dataset_config = config.dataset
    if device_augmentation:
        augment = functools.partial(
            augmentation.augment, padding=dataset_config.crop_padding,
            flip=dataset_config.random_flip, color_jitter=tuple(dataset_config.color_jitter),
            rotation_degrees=dataset_config.rotation_degrees)
    else:  # the dataset's own pipeline augmented the batch
        def augment(key, batch):
            del key
            return batch
    raw_images = images
    images = augmentation.normalize(augment(augment_key, raw_images), dataset_config.mean,
                                      dataset_config.std)
    # timm's label smoothing before the mix (exactly the one-hot labels with 0).
    one_hot = mixup.smooth_one_hot(labels, model.num_classes, config.mixup.label_smoothing)
    alpha = config.mixup.alpha
    if mode == mixup.CUTMIX_MODE and config.mixup.cutmix_alpha is not None:
        alpha = config.mixup.cutmix_alpha  # CutMix's own, when drawn beside AlignMix
    # lambda (b,) with lambda_per 'example': traced like the scalar, so it compiles once.
    permutation, lam = mixup.sample_pairing(pairing_key, labels.shape[0], alpha,
                                            lambda_per=config.mixup.lambda_per)

    if mode == mixup.CLEAN_MODE:
        noise_key = jax.random.fold_in(device_key, VAE_NOISE_STREAM)

        def reconstruction_loss_fn(params):
            loss, batch_stats, step_metrics = mode_forward.reconstruction_forward(
                model, params, state.batch_stats, images, noise_key, config.train.kl_weight)
            return loss, (batch_stats, step_metrics)

        grad_fn = jax.value_and_grad(reconstruction_loss_fn, has_aux=True)
        (_, (batch_stats, step_metrics)), grads = grad_fn(state.params)
        return grads, batch_stats, step_metrics

    box_key = jax.random.fold_in(device_key, CUTMIX_BOX_STREAM)

    contrastive_weight = config.train.contrastive_weight
    views = None
    if contrastive_weight > 0:
        # The NT-Xent term's two views: two more augmentations of the same images, stacked
        # into one batch.
        views = augmentation.normalize(jnp.concatenate([
            augment(jax.random.fold_in(device_key, stream), raw_images)
            for stream in CONTRASTIVE_VIEW_STREAMS]),
            dataset_config.mean, dataset_config.std)

    def loss_fn(params):
        forward = mode_forward.mixed_forward(mode, model, params, state.batch_stats, images,
                                             one_hot, permutation, lam, config.mixup, box_key)
        loss = jnp.mean(losses.soft_cross_entropy(forward.logits, forward.targets))  # Eq. (6)
        contrastive_loss = None
        batch_stats = forward.batch_stats
        if contrastive_weight > 0:
            contrastive_loss, batch_stats = mode_forward.contrastive_forward(
                model, params, batch_stats, views, config.train.contrastive_temperature)
            loss = loss + contrastive_weight * contrastive_loss
        return loss, (forward.replace(batch_stats=batch_stats), contrastive_loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (forward, contrastive_loss)), grads = grad_fn(state.params)
    step_metrics = {
        'loss': loss,
        # Agreement with the label that carries the larger weight of the mixed target.
        'accuracy': jnp.mean(jnp.argmax(forward.logits, -1) == jnp.argmax(forward.targets, -1)),
    }
    if forward.lam is not None:  # CutMix's is the area-corrected one; 'none' mixes nothing
        step_metrics['lambda'] = jnp.mean(forward.lam)  # one per pair: their batch mean
    if forward.sinkhorn_iterations is not None:  # the public Sinkhorn loop's count
        step_metrics['sinkhorn_iterations'] = forward.sinkhorn_iterations.astype(jnp.float32)
    if forward.plan is not None:
        step_metrics['marginal_error'] = jnp.mean(alignment.marginal_error(forward.plan))
    if forward.alignment_effect is not None:
        step_metrics['alignment_effect'] = forward.alignment_effect
    if contrastive_loss is not None:
        step_metrics['contrastive_loss'] = contrastive_loss
    return grads, forward.batch_stats, step_metrics


def train_step(state: TrainState, images, labels, *, mode: str, model,
               config: ml_collections.ConfigDict, device_augmentation: bool = True):
    """One SGD step on a device's slice of the batch, run under `shard_map` (see module doc).

    Slices are equal in size, so the mean of the devices' gradients is the gradient of the
    global batch's mean loss. Averaging the running BatchNorm statistics keeps the replicas
    identical.
    """
    device_index = jax.lax.axis_index(sharding.DATA_AXIS)
    grads, batch_stats, step_metrics = device_gradients(
        state, images, labels, device_index, mode=mode, model=model, config=config,
        device_augmentation=device_augmentation)
    grads, batch_stats, step_metrics = jax.lax.pmean((grads, batch_stats, step_metrics),
                                                     sharding.DATA_AXIS)
    new_state = apply_gradients(state, grads, batch_stats, frozen_groups(mode, state.params))
    # One fused reduction on the device, fetched with the metrics, so the loop can
    # refuse to checkpoint a state that became non-finite.
    step_metrics[divergence.STATE_FINITE] = divergence.all_finite(
        new_state.params, new_state.batch_stats, step_metrics)
    return new_state, step_metrics


def apply_gradients(state: TrainState, grads, batch_stats, frozen: tuple[str, ...]):
    """The optimizer step, leaving the `frozen` top-level parameter groups exactly as they are.

    Their parameters, and their entries in every parameter-shaped part of the optimizer state
    (momentum traces, also inside optax.multi_transform's groups), keep their old values;
    scalar state such as the step count advances.
    """
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if frozen:
        group_names = set(state.params)

        def is_parameter_shaped(node):
            return isinstance(node, dict) and set(node) == group_names

        def keep_frozen(new, old):
            if not is_parameter_shaped(new):
                return new
            return {name: old[name] if name in frozen else value for name, value in new.items()}

        params = keep_frozen(params, state.params)
        opt_state = jax.tree.map(keep_frozen, opt_state, state.opt_state,
                                 is_leaf=is_parameter_shaped)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=batch_stats)


def make_train_step(model, config: ml_collections.ConfigDict, mesh, *,
                    device_augmentation: bool = True):
    """The data-parallel step on `mesh`, compiled once per mode, donating the incoming state.

    `device_augmentation`: the dataset's (False for datasets augmented by their own pipeline).

    Takes the replicated state and the global batch (sharded along the data axis), returns the
    new replicated state and the metrics averaged over devices.
    """
    replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
        sharding.DATA_AXIS)

    def step(state, images, labels, mode):
        per_device = functools.partial(train_step, mode=mode, model=model, config=config,
                                       device_augmentation=device_augmentation)
        # check_vma=False: ott's Sinkhorn loop mixes per-device and constant values in a cond,
        # which the replication checker rejects; the outputs are replicated by the pmean.
        return jax.shard_map(per_device, mesh=mesh, in_specs=(replicated, split, split),
                             out_specs=(replicated, replicated),
                             check_vma=False)(state, images, labels)

    return jax.jit(step, static_argnames='mode', donate_argnums=0)
