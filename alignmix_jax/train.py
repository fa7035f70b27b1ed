"""AlignMix training and evaluation, from one CPU to many hosts.

`train_and_evaluate(config, workdir)` trains a classifier with the mixup modes of Algorithm 1,
evaluates it on the whole test split periodically, writes metrics to TensorBoard and the
console, checkpoints to `workdir/checkpoints`, and resumes from the latest checkpoint there.

Data parallel: the state is replicated over a one-axis device mesh and each global batch is
split over its devices. The step runs under `shard_map`: every device augments, pairs (its own
permutation and lambda), aligns and mixes its own slice of the batch, so no image or feature
tensor crosses devices; only the gradients and BatchNorm statistics are averaged. BatchNorm
normalises with the statistics of each device's slice (`model.sync_batch_norm=False`, as
PyTorch's DataParallel) or of the global batch (True). With one device this is plain
single-device training.

The step is jit-compiled once per mixup mode (the mode is a static argument, drawn on the host
for each step) and never synchronises with the host: its metrics stay on the device until the
loop fetches them every `log_every_steps`. Augmentation runs on the device inside the step.

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
import os
import time
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, metrics, periodic_actions
from flax import struct
from flax.training import train_state

from alignmix_jax import (
    alignment,
    checkpointing,
    config_checks,
    convert_torchvision,
    evaluation,
    input_pipeline,
    mixup,
    sharding,
    workdir_lock,
)
from alignmix_jax.evaluation import common as evaluation_common
from alignmix_jax.models import build_model_for_dataset, encoder_stages

# Stream tag that keeps the per-step mode draw independent of the data order.
_MODE_STREAM = 0x6D6F6465


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # the run's key; each step folds in its step number and device index


@struct.dataclass
class EvalMetrics(metrics.Collection):
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output('loss')


@struct.dataclass
class AutoencoderEvalMetrics(metrics.Collection):
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output('loss')
    # The mean squared error per pixel value of D(f(F(x))) against the normalised test image.
    reconstruction_error: metrics.Average.from_output('reconstruction_error')


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
        ('decoder', train_config.get('decoder_learning_rate'))) if rate is not None}
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
        init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
        variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        # .get: a network without BatchNorm (VGG-GAP) has no statistics.
        state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  tx=optimizer, batch_stats=variables.get('batch_stats', {}),
                                  rng=run_key)
        # A concrete int32 step: with the default Python int the second call of each jitted
        # step would see a different input type and compile again.
        return state.replace(step=jnp.zeros((), jnp.int32))

    mesh = sharding.make_mesh() if mesh is None else mesh
    # Built by jit straight into its replicated layout, identically in every process.
    state = jax.jit(initial_state, out_shardings=sharding.replicated(mesh))()
    if config.model.pretrained:
        # Outside the jit, so the weights are not compiled into the program as constants. A
        # resumed run then restores its checkpoint over them.
        pretrained = convert_torchvision.load_pretrained(
            {'params': state.params, 'batch_stats': state.batch_stats}, config.model.pretrained)
        state = state.replace(**pretrained)
    return state


def build_training_model(config: ml_collections.ConfigDict, dataset):
    """The run's model for the train step: BatchNorm over the mesh's data axis if
    `model.sync_batch_norm`, else per device (see the module docstring)."""
    return build_model_for_dataset(config, dataset, batch_norm_axis=(
        sharding.DATA_AXIS if config.model.sync_batch_norm else None))


def training_modes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The modes drawn uniformly per step: config.mixup.modes, plus 'clean' when there is a
    decoder (and, with config.mixup.cutmix_probability > 0, 'cutmix' drawn before them)."""
    probability = config.mixup.cutmix_probability
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f'config.mixup.cutmix_probability must lie in [0, 1]; got '
                         f'{probability}')
    return mixup.validate_modes(config.mixup.modes,
                                with_decoder=config.model.decoder != 'none',
                                encoder_stages=encoder_stages(config.model.name))


def frozen_groups(mode: str, params) -> tuple[str, ...]:
    """Top-level parameter groups a step of `mode` must leave untouched (see the module doc)."""
    if mode == mixup.CLEAN_MODE:
        return ('classifier',)  # g never sees decoded or clean-only batches
    return ('decoder',) if 'decoder' in params else ()


def choose_mode(modes: tuple[str, ...], seed: int, step: int,
                cutmix_probability: float = 0.0) -> str:
    """Algorithm 1, line 2: a mode drawn uniformly for this step, reproducible on resume.

    AlignMix + CutMix (`config.mixup.cutmix_probability` p > 0): the step is a CutMix step
    with probability p, else one of `modes` drawn uniformly. With p = 0 the draws are exactly
    those without the option.
    """
    rng = np.random.default_rng([seed, _MODE_STREAM, step])
    if cutmix_probability > 0 and rng.random() < cutmix_probability:
        return mixup.CUTMIX_MODE
    return modes[rng.integers(len(modes))]


def _train_stage(model, params, method, inputs, batch_stats, **kwargs):
    """One stage of the model (`method`) in training mode: (outputs, new BatchNorm statistics)."""
    outputs, updates = model.apply({'params': params, 'batch_stats': batch_stats}, inputs,
                                   train=True, method=method, mutable=['batch_stats'], **kwargs)
    return outputs, updates['batch_stats']


def _mixed_forward(mode, model, params, batch_stats, images, one_hot, permutation, lam,
                   mixup_config, box_key=None):
    """Logits, soft targets, updated BatchNorm statistics, the plan (or None) and the lambda
    the targets were mixed with (None for 'none') of one mode."""

    stage = functools.partial(_train_stage, model, params)

    plan = None
    swap = mode in mixup.SWAPPED_MODES
    if mode == mixup.NO_MIXUP_MODE:
        # The baseline: e = f(F(x)) and the hard labels, through the same loss.
        features, batch_stats = stage('features', images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
        logits = model.apply({'params': params}, embedding, method='classify')
        return logits, one_hot, batch_stats, None, None
    if mode == mixup.CUTMIX_MODE:
        # Yun et al. (2019): a box of x' in x; lambda becomes the share of x left visible.
        mixed_images, lam = mixup.cutmix(box_key, images, permutation, lam)
        features, batch_stats = stage('features', mixed_images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
    elif mode == 'input':
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
    elif mode == 'embedding':
        # Eq. (2), (5): e = mix(f(F(x)), f(F(x'))); x' is x permuted, so F and f run once.
        features, batch_stats = stage('features', images, batch_stats)
        embedding, batch_stats = stage('embed', features, batch_stats)
        embedding = mixup.mix(*mixup.pair(embedding, permutation), lam)
    elif mode in mixup.FEATURE_MODES:
        # Eq. (12) or (13): e = f(mix(A, A~)), A~ the anchor aligned to its partner.
        features, batch_stats = stage('features', images, batch_stats)
        mixed_features, plan = mixup.mix_features(
            features, permutation, lam, swap=swap, align=mixup_config.align,
            epsilon=mixup_config.epsilon, num_iters=mixup_config.sinkhorn_iters)
        embedding, batch_stats = stage('embed', mixed_features, batch_stats)
    elif mode in mixup.TENSOR_EMBEDDING_MODES:
        # Table 8's E: Eq. (12) or (13) on E = conv(A) instead of A, then e = E flattened.
        features, batch_stats = stage('features', images, batch_stats)
        tensor, batch_stats = stage('embed_to_tensor', features, batch_stats)
        mixed_tensor, plan = mixup.mix_features(
            tensor, permutation, lam, swap=swap, align=mixup_config.align,
            epsilon=mixup_config.epsilon, num_iters=mixup_config.sinkhorn_iters)
        embedding = model.apply({'params': params}, mixed_tensor, method='flatten_embedding')
    else:
        raise ValueError(f'unknown mixup mode {mode!r}; expected one of {mixup.ALL_MODES}')
    logits = model.apply({'params': params}, embedding, method='classify')
    targets = mixup.mixed_targets(one_hot, permutation, lam, swap=swap)
    return logits, targets, batch_stats, plan, lam


def _reconstruction_forward(model, params, batch_stats, images, noise_key, kl_weight):
    """Algorithm 1, lines 5-7: the loss of D(f(F(x))) against x, BatchNorm statistics, metrics.

    A VAE decodes a reparameterised sample of its posterior and adds the KL term, divided like
    the reconstruction loss by the number of pixel values (so kl_weight = 1 is the ELBO).
    """

    stage = functools.partial(_train_stage, model, params)

    features, batch_stats = stage('features', images, batch_stats)
    embedding, batch_stats = stage('embed', features, batch_stats)
    noise, kl_divergence = None, None
    if model.decoder_type == 'vae':
        mean, log_sigma = model.apply({'params': params}, embedding, method='posterior_parts')
        noise = jax.random.normal(noise_key, mean.shape, jnp.float32)
        kl_divergence = jnp.mean(mixup.gaussian_kl(mean, log_sigma))
    reconstructions, batch_stats = stage('decode', embedding, batch_stats, noise=noise)
    reconstruction_loss = jnp.mean(mixup.reconstruction_loss(images, reconstructions))
    step_metrics = {'reconstruction_loss': reconstruction_loss}
    loss = reconstruction_loss
    if kl_divergence is not None:
        loss = loss + kl_weight * kl_divergence / np.prod(images.shape[1:])
        step_metrics['kl_divergence'] = kl_divergence
    return loss, batch_stats, step_metrics


def _contrastive_loss(model, params, batch_stats, views, temperature):
    """SimCLR's NT-Xent on the embeddings e = f(F(v)) of two views (stacked: first all of view
    one, then view two, in the same order); a VAE's e is its mean. (loss, BatchNorm statistics)
    """
    stage = functools.partial(_train_stage, model, params)
    features, batch_stats = stage('features', views, batch_stats)
    embeddings, batch_stats = stage('embed', features, batch_stats)
    if model.decoder_type == 'vae':
        embeddings = model.apply({'params': params}, embeddings, method='posterior_parts')[0]
    first, second = jnp.split(embeddings, 2)
    return mixup.nt_xent(first, second, temperature), batch_stats


def shard_gradients(state: TrainState, images, labels, device_index, *, mode: str, model,
                    config: ml_collections.ConfigDict):
    """Gradients, BatchNorm statistics and metrics of mixup `mode` on one device's slice.

    Algorithm 1 on the slice alone: its own augmentation, permutation pi and lambda, drawn from
    the run's key folded in by step and by `device_index`.
    """
    device_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device_index)
    augment_key, pairing_key = jax.random.split(device_key)
    dataset_config = config.dataset
    augment = functools.partial(
        input_pipeline.augment, padding=dataset_config.crop_padding,
        flip=dataset_config.random_flip, color_jitter=tuple(dataset_config.color_jitter),
        rotation_degrees=dataset_config.rotation_degrees)
    raw_images = images
    images = input_pipeline.normalize(augment(augment_key, raw_images), dataset_config.mean,
                                      dataset_config.std)
    one_hot = jax.nn.one_hot(labels, model.num_classes, dtype=jnp.float32)
    alpha = config.mixup.alpha
    if mode == mixup.CUTMIX_MODE and config.mixup.cutmix_alpha is not None:
        alpha = config.mixup.cutmix_alpha  # CutMix's own, when drawn beside AlignMix
    permutation, lam = mixup.sample_pairing(pairing_key, labels.shape[0], alpha)

    if mode == mixup.CLEAN_MODE:
        # The VAE's sampling noise: a key of its own, so the other draws stay as they were.
        noise_key = jax.random.fold_in(device_key, 1)

        def reconstruction_loss_fn(params):
            loss, batch_stats, step_metrics = _reconstruction_forward(
                model, params, state.batch_stats, images, noise_key, config.train.kl_weight)
            return loss, (batch_stats, step_metrics)

        grad_fn = jax.value_and_grad(reconstruction_loss_fn, has_aux=True)
        (_, (batch_stats, step_metrics)), grads = grad_fn(state.params)
        return grads, batch_stats, step_metrics

    # CutMix's box: a key of its own, so the other draws stay as they were.
    box_key = jax.random.fold_in(device_key, 2)

    contrastive_weight = config.train.contrastive_weight
    views = None
    if contrastive_weight > 0:
        # The NT-Xent term's two views: two more augmentations of the same images, each with
        # a key of its own, stacked into one batch.
        views = input_pipeline.normalize(jnp.concatenate([
            augment(jax.random.fold_in(device_key, 3 + view), raw_images) for view in (0, 1)]),
            dataset_config.mean, dataset_config.std)

    def loss_fn(params):
        logits, targets, batch_stats, plan, targets_lam = _mixed_forward(
            mode, model, params, state.batch_stats, images, one_hot, permutation, lam,
            config.mixup, box_key)
        loss = jnp.mean(mixup.soft_cross_entropy(logits, targets))  # Eq. (6)
        contrastive_loss = None
        if contrastive_weight > 0:
            contrastive_loss, batch_stats = _contrastive_loss(
                model, params, batch_stats, views, config.train.contrastive_temperature)
            loss = loss + contrastive_weight * contrastive_loss
        return loss, (logits, targets, batch_stats, plan, targets_lam, contrastive_loss)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, targets, batch_stats, plan, targets_lam, contrastive_loss)), grads = \
        grad_fn(state.params)
    step_metrics = {
        'loss': loss,
        # Agreement with the label that carries the larger weight of the mixed target.
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
    }
    if targets_lam is not None:  # CutMix's is the area-corrected one; 'none' mixes nothing
        step_metrics['lambda'] = targets_lam
    if plan is not None:
        step_metrics['marginal_error'] = jnp.mean(alignment.marginal_error(plan))
    if contrastive_loss is not None:
        step_metrics['contrastive_loss'] = contrastive_loss
    return grads, batch_stats, step_metrics


def train_step(state: TrainState, images, labels, *, mode: str, model,
               config: ml_collections.ConfigDict):
    """One SGD step on a device's slice of the batch, run under `shard_map` (see module doc).

    Slices are equal in size, so the mean of the devices' gradients is the gradient of the
    global batch's mean loss. Averaging the running BatchNorm statistics keeps the replicas
    identical.
    """
    device_index = jax.lax.axis_index(sharding.DATA_AXIS)
    grads, batch_stats, step_metrics = shard_gradients(
        state, images, labels, device_index, mode=mode, model=model, config=config)
    grads, batch_stats, step_metrics = jax.lax.pmean((grads, batch_stats, step_metrics),
                                                     sharding.DATA_AXIS)
    return apply_gradients(state, grads, batch_stats, frozen_groups(mode, state.params)), \
        step_metrics


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


def make_train_step(model, config: ml_collections.ConfigDict, mesh):
    """The data-parallel step on `mesh`, compiled once per mode, donating the incoming state.

    Takes the replicated state and the global batch (sharded along the data axis), returns the
    new replicated state and the metrics averaged over devices.
    """
    replicated, split = jax.sharding.PartitionSpec(), jax.sharding.PartitionSpec(
        sharding.DATA_AXIS)

    def step(state, images, labels, mode):
        per_device = functools.partial(train_step, mode=mode, model=model, config=config)
        # check_vma=False: ott's Sinkhorn loop mixes per-device and constant values in a cond,
        # which the replication checker rejects; the outputs are replicated by the pmean.
        return jax.shard_map(per_device, mesh=mesh, in_specs=(replicated, split, split),
                             out_specs=(replicated, replicated),
                             check_vma=False)(state, images, labels)

    return jax.jit(step, static_argnames='mode', donate_argnums=0)


def _classify_and_reconstruct(module, images):
    embedding = module.embed(module.features(images, train=False), train=False)
    return module.classify(embedding), module.decode(embedding, train=False)


def eval_step(state: TrainState, images, labels, mask, *, model,
              dataset_config: ml_collections.ConfigDict) -> EvalMetrics:
    images = input_pipeline.normalize(images, dataset_config.mean, dataset_config.std)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    if model.decoder_type == 'none':
        logits = model.apply(variables, images, train=False)
    else:
        # A VAE reconstructs from mu (no sampling noise at evaluation).
        logits, reconstructions = model.apply(variables, images,
                                              method=_classify_and_reconstruct)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    if model.decoder_type == 'none':
        return EvalMetrics.single_from_model_output(logits=logits, labels=labels, loss=loss,
                                                    mask=mask)
    return AutoencoderEvalMetrics.single_from_model_output(
        logits=logits, labels=labels, loss=loss, mask=mask,
        reconstruction_error=mixup.reconstruction_loss(images, reconstructions))


def make_eval_step(model, dataset_config: ml_collections.ConfigDict):
    """Evaluation needs no cross-device work but the final sums; jit partitions it by itself."""
    return jax.jit(functools.partial(eval_step, model=model, dataset_config=dataset_config))


def evaluate(eval_fn, state: TrainState, dataset, batch_size: int, mesh) -> dict:
    """Accuracy and loss over the whole test split, all processes together.

    Padded, masked batches count each image exactly once; the metrics are sums over the global
    batch, so every process computes the same result.
    """
    merged = None
    for local_batch in dataset.eval_batches(batch_size, process_index=jax.process_index(),
                                            process_count=jax.process_count()):
        batch_metrics = eval_fn(state, *sharding.global_batch(local_batch, mesh))
        merged = batch_metrics if merged is None else merged.merge(batch_metrics)
    results = {name: float(value) for name, value in merged.compute().items()}
    results['num_examples'] = int(merged.accuracy.count)
    return results


class _MetricBuffer:
    """Train metrics of the steps since the last flush, kept on device until fetched."""

    def __init__(self, modes: tuple[str, ...] = mixup.MODES):
        self.steps, self.modes = [], []
        self.mode_names = tuple(dict.fromkeys(modes))  # each once, in order

    def add(self, mode: str, step_metrics: dict):
        self.modes.append(mode)
        self.steps.append(step_metrics)

    def flush(self, step: int, learning_rate: float) -> dict:
        """Fetches and averages the buffered metrics; raises FloatingPointError on a NaN loss."""
        fetched = jax.device_get(self.steps)
        # Each step's objective: the classification loss, or the reconstruction loss of 'clean'.
        losses = np.array([m['loss'] if 'loss' in m else m['reconstruction_loss']
                           for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f'the training loss became {losses[bad]} at step {step - len(losses) + bad + 1} '
                f'(mode {self.modes[bad]!r})')
        summary = {f'train/{key}': float(np.mean([m[key] for m in fetched if key in m]))
                   for key in ('loss', 'accuracy', 'lambda', 'marginal_error',
                               'reconstruction_loss', 'kl_divergence', 'contrastive_loss')
                   if any(key in m for m in fetched)}
        counts = Counter(self.modes)
        summary.update({f'train/mode_fraction/{mode}': counts[mode] / len(self.modes)
                        for mode in self.mode_names})
        summary['train/learning_rate'] = learning_rate
        self.steps, self.modes = [], []
        return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: input_pipeline.Dataset | None = None) -> dict:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

    `dataset`: the data, already loaded by `input_pipeline.load_dataset(config.dataset)`, for
    callers that train several runs on the same data (alignmix_jax/reproduce.py); None loads it.
    The settings are checked first; the run holds the workdir's lock (one run per workdir).
    """
    config_checks.validate(config, num_devices=jax.device_count())
    with workdir_lock.hold(workdir, jax.process_index()):
        return _train_and_evaluate(config, workdir, dataset)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        dataset: input_pipeline.Dataset | None) -> dict:
    # Orbax writes only to absolute paths; `--workdir=runs/demo` is relative to the caller.
    workdir = os.path.abspath(workdir)
    modes = training_modes(config)
    if dataset is None:
        dataset = input_pipeline.load_dataset(config.dataset)
    config_checks.check_training_set(config, dataset.num_train_examples)
    model = build_training_model(config, dataset)
    train_config = config.train
    steps_per_epoch = input_pipeline.steps_per_epoch(dataset.num_train_examples,
                                                     train_config.batch_size)
    total_steps = train_config.num_epochs * steps_per_epoch
    _, schedule = make_optimizer(train_config, steps_per_epoch)
    mesh = sharding.make_mesh()
    sharding.check_batch_size(train_config.batch_size, mesh, 'config.train.batch_size')
    sharding.check_batch_size(train_config.eval_batch_size, mesh, 'config.train.eval_batch_size')
    logging.info('Process %d of %d; %d devices in all (%s).', jax.process_index(),
                 jax.process_count(), mesh.size, jax.devices()[0].platform)

    state = create_train_state(config, model, dataset.image_shape, steps_per_epoch, mesh)
    manager = checkpointing.make_manager(workdir, max_to_keep=train_config.keep_checkpoints)
    progress = {'best_test_accuracy': None, 'best_epoch': None}
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state, progress, _ = restored
        logging.info('Resumed from %s at step %d.', manager.directory, int(state.step))
    start_step = int(state.step)

    # Only process 0 logs and writes TensorBoard summaries; the others write nowhere.
    writer = (metric_writers.create_default_writer(workdir) if jax.process_index() == 0
              else metric_writers.MultiWriter([]))
    if start_step == 0:
        writer.write_hparams(_flatten(config.to_dict()))
    report_progress = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_steps=train_config.log_every_steps)

    compiled_train_step = make_train_step(model, config, mesh)
    compiled_eval_step = make_eval_step(model, config.dataset)
    batches = dataset.train_batches(train_config.batch_size, seed=config.seed,
                                    start_step=start_step, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    cutmix_probability = config.mixup.cutmix_probability
    # Modes reported in the mode fractions: CutMix's too when AlignMix + CutMix draws it.
    buffer = _MetricBuffer(modes + ((mixup.CUTMIX_MODE,) if cutmix_probability > 0 else ()))
    # The evaluation commands' evaluators, run at each evaluation (config.train.evals).
    eval_context = evaluation_common.EvalContext(config=config, model=model, dataset=dataset,
                                                 mesh=mesh)
    evaluators = [evaluation.make_evaluator(kind, eval_context, config.evals)
                  for kind in train_config.evals]
    eval_every_steps = train_config.eval_every_epochs * steps_per_epoch
    test_metrics, eval_figures = {}, {}
    if start_step < total_steps:
        logging.info('Training %d steps (%d epochs of %d steps) from step %d; modes %s%s.',
                     total_steps, train_config.num_epochs, steps_per_epoch, start_step, modes,
                     f' (CutMix with probability {cutmix_probability:g} before them)'
                     if cutmix_probability > 0 else '')
    else:
        logging.info('The checkpoint is at the last step (%d); evaluating it.', start_step)
    start_time = time.time()
    try:
        for step in range(start_step + 1, total_steps + 1):
            images, labels = sharding.global_batch(next(batches), mesh)
            mode = choose_mode(modes, config.seed, step, cutmix_probability)
            state, step_metrics = compiled_train_step(state, images, labels, mode=mode)
            buffer.add(mode, step_metrics)
            report_progress(step)

            is_last = step == total_steps
            should_eval = step % eval_every_steps == 0 or is_last
            should_save = step % train_config.checkpoint_every_steps == 0 or should_eval
            if step % train_config.log_every_steps == 0 or should_save:
                try:
                    summary = buffer.flush(step, float(schedule(step - 1)))
                except FloatingPointError as error:
                    manager.wait_until_finished()  # so latest_step() is the last saved one
                    raise FloatingPointError(
                        f'{error}; stopped without saving: the last good checkpoint is step '
                        f'{manager.latest_step()} in {manager.directory}. Lower the learning rate '
                        f'or use float32 (--config.model.dtype=float32) and restart.') from None
                writer.write_scalars(step, summary)
            if should_eval:
                epoch = step // steps_per_epoch
                test_metrics = evaluate(compiled_eval_step, state, dataset,
                                        train_config.eval_batch_size, mesh)
                best = progress['best_test_accuracy']
                if best is None or test_metrics['accuracy'] > best:
                    progress = {'best_test_accuracy': test_metrics['accuracy'], 'best_epoch': epoch}
                test_scalars = {
                    'test/accuracy': test_metrics['accuracy'], 'test/loss': test_metrics['loss'],
                    'test/best_accuracy': progress['best_test_accuracy']}
                if 'reconstruction_error' in test_metrics:  # a model with a decoder
                    test_scalars['test/reconstruction_error'] = \
                        test_metrics['reconstruction_error']
                for evaluator in evaluators:
                    figures = evaluator.run({'params': state.params,
                                             'batch_stats': state.batch_stats})
                    eval_figures[evaluator.name] = figures
                    test_scalars.update({f'eval/{evaluator.name}/{name}': value
                                         for name, value in figures.items()
                                         if isinstance(value, (int, float))})
                writer.write_scalars(step, test_scalars)
                logging.info('Epoch %d: test accuracy %.2f%% (best so far %.2f%% at epoch %d).',
                             epoch, 100 * test_metrics['accuracy'],
                             100 * progress['best_test_accuracy'], progress['best_epoch'])
            if should_save:
                checkpointing.save(manager, step, state, progress)
    finally:
        # A save in flight completes even when the loop stops on an error or Ctrl-C.
        manager.wait_until_finished()
    writer.flush()

    if start_step >= total_steps:  # nothing left to train: report the checkpoint as it is
        test_metrics = evaluate(compiled_eval_step, state, dataset,
                                train_config.eval_batch_size, mesh)
    result = {'final_test_accuracy': test_metrics['accuracy'],
              'final_test_loss': test_metrics['loss'],
              'best_test_accuracy': progress['best_test_accuracy'],
              'best_epoch': progress['best_epoch'], 'steps': total_steps,
              'train_seconds': time.time() - start_time}
    if 'reconstruction_error' in test_metrics:
        result['final_test_reconstruction_error'] = test_metrics['reconstruction_error']
    if eval_figures:  # the last figures of config.train.evals
        result['evals'] = eval_figures
    logging.info('Final test accuracy %.2f%% after %d epochs (best during training: %.2f%% at '
                 'epoch %s).', 100 * result['final_test_accuracy'], train_config.num_epochs,
                 100 * (result['best_test_accuracy'] or result['final_test_accuracy']),
                 result['best_epoch'])
    return result


def _flatten(tree: dict, prefix: str = '') -> dict:
    """Config as flat 'a.b' keys with scalar values, for the hyperparameter table."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f'{prefix}{key}.'))
        else:
            flat[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) \
                else str(value)
    return flat
