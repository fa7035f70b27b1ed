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
"""

import functools
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

from alignmix_jax import alignment, checkpointing, input_pipeline, mixup, sharding
from alignmix_jax.models import build_model

# Stream tag that keeps the per-step mode draw independent of the data order.
_MODE_STREAM = 0x6D6F6465


class TrainState(train_state.TrainState):
    batch_stats: Any
    rng: jax.Array  # the run's key; each step folds in its step number and device index


@struct.dataclass
class EvalMetrics(metrics.Collection):
    accuracy: metrics.Accuracy
    loss: metrics.Average.from_output('loss')


def make_optimizer(train_config: ml_collections.ConfigDict, steps_per_epoch: int):
    """SGD with momentum and weight decay as PyTorch applies them, and the step schedule.

    Weight decay is added to the gradient before momentum (torch.optim.SGD's `weight_decay`),
    and the learning rate is multiplied by `lr_decay_factor` at each of `lr_decay_epochs`.
    If `classifier_learning_rate` is set, the classifier g has its own base learning rate (the
    paper's ImageNet protocol: 0.1 for g, 0.01 for the rest). Returns the optimizer and the
    schedule of the other layers.
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
    if train_config.classifier_learning_rate is not None:
        classifier_optimizer, _ = sgd(train_config.classifier_learning_rate)

        def parameter_groups(params):
            return {name: jax.tree.map(
                lambda _, group=('classifier' if name == 'classifier' else 'rest'): group,
                subtree) for name, subtree in params.items()}

        optimizer = optax.multi_transform(
            {'classifier': classifier_optimizer, 'rest': optimizer}, parameter_groups)
    return optimizer, schedule


def create_train_state(config: ml_collections.ConfigDict, model, image_shape, steps_per_epoch,
                       mesh=None) -> TrainState:
    """The initial state, replicated on every device of `mesh` (default: all devices)."""
    optimizer, _ = make_optimizer(config.train, steps_per_epoch)

    def initial_state():
        init_key, run_key = jax.random.split(jax.random.PRNGKey(config.seed))
        variables = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
        state = TrainState.create(apply_fn=model.apply, params=variables['params'],
                                  tx=optimizer, batch_stats=variables['batch_stats'],
                                  rng=run_key)
        # A concrete int32 step: with the default Python int the second call of each jitted
        # step would see a different input type and compile again.
        return state.replace(step=jnp.zeros((), jnp.int32))

    mesh = sharding.make_mesh() if mesh is None else mesh
    # Built by jit straight into its replicated layout, identically in every process.
    return jax.jit(initial_state, out_shardings=sharding.replicated(mesh))()


def choose_mode(modes: tuple[str, ...], seed: int, step: int) -> str:
    """Algorithm 1, line 2: a mode drawn uniformly for this step, reproducible on resume."""
    return modes[np.random.default_rng([seed, _MODE_STREAM, step]).integers(len(modes))]


def _mixed_forward(mode, model, params, batch_stats, images, one_hot, permutation, lam,
                   mixup_config):
    """Logits, soft targets, updated BatchNorm statistics and the plan (or None) of one mode."""

    def stage(method, inputs, stats):
        outputs, updates = model.apply({'params': params, 'batch_stats': stats}, inputs,
                                       train=True, method=method, mutable=['batch_stats'])
        return outputs, updates['batch_stats']

    plan = None
    swap = mode == 'feature_prime'
    if mode == 'input':
        # Eq. (2), (3): e = f(F(mix(x, x'))).
        features, batch_stats = stage('features', mixup.mix(*mixup.pair(
            images, permutation), lam), batch_stats)
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
    else:
        raise ValueError(f'unknown mixup mode {mode!r}; expected one of {mixup.MODES}')
    logits = model.apply({'params': params}, embedding, method='classify')
    targets = mixup.mixed_targets(one_hot, permutation, lam, swap=swap)
    return logits, targets, batch_stats, plan


def shard_gradients(state: TrainState, images, labels, device_index, *, mode: str, model,
                    config: ml_collections.ConfigDict):
    """Gradients, BatchNorm statistics and metrics of mixup `mode` on one device's slice.

    Algorithm 1 on the slice alone: its own augmentation, permutation pi and lambda, drawn from
    the run's key folded in by step and by `device_index`.
    """
    device_key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), device_index)
    augment_key, pairing_key = jax.random.split(device_key)
    dataset_config = config.dataset
    images = input_pipeline.augment(augment_key, images, padding=dataset_config.crop_padding,
                                    flip=dataset_config.random_flip)
    images = input_pipeline.normalize(images, dataset_config.mean, dataset_config.std)
    one_hot = jax.nn.one_hot(labels, model.num_classes, dtype=jnp.float32)
    permutation, lam = mixup.sample_pairing(pairing_key, labels.shape[0], config.mixup.alpha)

    def loss_fn(params):
        logits, targets, batch_stats, plan = _mixed_forward(
            mode, model, params, state.batch_stats, images, one_hot, permutation, lam,
            config.mixup)
        loss = jnp.mean(mixup.soft_cross_entropy(logits, targets))  # Eq. (6)
        return loss, (logits, targets, batch_stats, plan)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (logits, targets, batch_stats, plan)), grads = grad_fn(state.params)
    step_metrics = {
        'loss': loss,
        # Agreement with the label that carries the larger weight of the mixed target.
        'accuracy': jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1)),
        'lambda': lam,
    }
    if plan is not None:
        step_metrics['marginal_error'] = jnp.mean(alignment.marginal_error(plan))
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
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), step_metrics


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


def eval_step(state: TrainState, images, labels, mask, *, model,
              dataset_config: ml_collections.ConfigDict) -> EvalMetrics:
    images = input_pipeline.normalize(images, dataset_config.mean, dataset_config.std)
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, images,
                         train=False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return EvalMetrics.single_from_model_output(logits=logits, labels=labels, loss=loss,
                                                mask=mask)


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

    def __init__(self):
        self.steps, self.modes = [], []

    def add(self, mode: str, step_metrics: dict):
        self.modes.append(mode)
        self.steps.append(step_metrics)

    def flush(self, step: int, learning_rate: float) -> dict:
        """Fetches and averages the buffered metrics; raises FloatingPointError on a NaN loss."""
        fetched = jax.device_get(self.steps)
        losses = np.array([m['loss'] for m in fetched])
        if not np.all(np.isfinite(losses)):
            bad = int(np.argmin(np.isfinite(losses)))
            raise FloatingPointError(
                f'the training loss became {losses[bad]} at step {step - len(losses) + bad + 1} '
                f'(mode {self.modes[bad]!r})')
        summary = {f'train/{key}': float(np.mean([m[key] for m in fetched if key in m]))
                   for key in ('loss', 'accuracy', 'lambda', 'marginal_error')
                   if any(key in m for m in fetched)}
        counts = Counter(self.modes)
        summary.update({f'train/mode_fraction/{mode}': counts[mode] / len(self.modes)
                        for mode in mixup.MODES})
        summary['train/learning_rate'] = learning_rate
        self.steps, self.modes = [], []
        return summary


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics."""
    modes = mixup.validate_modes(config.mixup.modes)
    dataset = input_pipeline.load_dataset(config.dataset)
    model = build_model(config.model, dataset.num_classes, batch_norm_axis=(
        sharding.DATA_AXIS if config.model.sync_batch_norm else None))
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
    buffer = _MetricBuffer()
    eval_every_steps = train_config.eval_every_epochs * steps_per_epoch
    test_metrics = {}
    if start_step < total_steps:
        logging.info('Training %d steps (%d epochs of %d steps) from step %d; modes %s.',
                     total_steps, train_config.num_epochs, steps_per_epoch, start_step, modes)
    else:
        logging.info('The checkpoint is at the last step (%d); evaluating it.', start_step)
    start_time = time.time()
    try:
        for step in range(start_step + 1, total_steps + 1):
            images, labels = sharding.global_batch(next(batches), mesh)
            mode = choose_mode(modes, config.seed, step)
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
                writer.write_scalars(step, {
                    'test/accuracy': test_metrics['accuracy'], 'test/loss': test_metrics['loss'],
                    'test/best_accuracy': progress['best_test_accuracy']})
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
