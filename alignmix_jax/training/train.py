"""AlignMix training and evaluation, from one CPU to many hosts.

`train_and_evaluate(config, workdir)` trains a classifier with the mixup modes of Algorithm 1,
evaluates it on the whole test split periodically, writes metrics to absl's log,
`workdir/metrics.jsonl` and TensorBoard (`alignmix_jax.runtime.metric_log`) and its progress
to the console it is given (`alignmix_jax.runtime.console`), checkpoints to
`workdir/checkpoints`, and resumes from the latest checkpoint there.

The step itself (the state, the optimizer, the forward pass of each mode, the data-parallel
step, the frozen parameter groups) is `alignmix_jax.training.train_step`; this module is the loop
around it: the data, the mode drawn per step, logging, the test evaluation (the classification
evaluator of `alignmix_jax.evaluation`, so the loop and the evaluation command print one
figure), the evaluations of `config.train.evals`, checkpoints and the stop on divergence. The
step's metrics stay on the device until the loop fetches them every `log_every_steps`.

Divergence (alignmix_jax/training/divergence.py): each step reports whether its new state and
metrics are finite with its metrics; every fetch checks the steps since the last one for a
non-finite value or an exploding loss, and a fetch comes before every checkpoint. A divergence
stops the run before it saves, so no non-finite state is ever written and the rotation
(`keep_checkpoints`) deletes nothing: the newest checkpoint is the last finite one.

SIGTERM or SIGINT ends the run after the step in progress, saved
(alignmix_jax/runtime/preemption.py); a failed asynchronous save stops it at the next step
(`checkpointing.check_saves`); a restart continues only a run of the same settings
(alignmix_jax/runtime/run_config.py).
"""

import contextlib
import itertools
import os
import time
from collections import Counter

import jax
import ml_collections
import numpy as np
from absl import logging

from alignmix_jax import data, evaluation
from alignmix_jax.data import augmentation
from alignmix_jax.evaluation import classification
from alignmix_jax.evaluation import common as evaluation_common
from alignmix_jax.method import mixup
from alignmix_jax.models import encoder_stages
from alignmix_jax.runtime import (
    checkpointing,
    metric_log,
    preemption,
    run_config,
    sharding,
    workdir_lock,
)
from alignmix_jax.runtime.console import Console
from alignmix_jax.settings import config_checks
from alignmix_jax.training import divergence, inert_alignment
from alignmix_jax.training.train_step import (
    build_training_model,
    create_train_state,
    make_optimizer,
    make_train_step,
)

# Stream tag that keeps the per-step mode draw independent of the data order.
_MODE_STREAM = 0x6D6F6465


def training_modes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The modes drawn uniformly per step: config.mixup.modes, plus 'clean' when there is a
    decoder (and, with config.mixup.cutmix_probability > 0, 'cutmix' drawn before them; its
    range is config_checks.validate's)."""
    return mixup.validate_modes(config.mixup.modes,
                                with_decoder=config.model.decoder != 'none',
                                encoder_stages=encoder_stages(config.model.name))


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


class _MetricBuffer:
    """Train metrics of the steps since the last flush, kept on device until fetched."""

    def __init__(self, modes: tuple[str, ...] = mixup.MODES):
        self.steps, self.modes = [], []
        self.mode_names = tuple(dict.fromkeys(modes))  # each once, in order

    def add(self, mode: str, step_metrics: dict):
        self.modes.append(mode)
        self.steps.append(step_metrics)

    def flush(self, step: int, learning_rate: float,
              detector: divergence.LossExplosionDetector | None = None
              ) -> tuple[dict, divergence.Divergence | None]:
        """Fetches and averages the metrics of the buffered steps, which end at `step`; also
        returns the first divergence among them (`divergence.find_divergence`), or None."""
        fetched = jax.device_get(self.steps)
        found = divergence.find_divergence(step - len(fetched) + 1, self.modes, fetched,
                                           detector)
        summary = {f'train/{key}': float(np.mean([m[key] for m in fetched if key in m]))
                   for key in ('loss', 'accuracy', 'lambda', 'marginal_error', 'alignment_effect',
                               'sinkhorn_iterations', 'reconstruction_loss', 'kl_divergence',
                               'contrastive_loss')
                   if any(key in m for m in fetched)}
        counts = Counter(self.modes)
        summary.update({f'train/mode_fraction/{mode}': counts[mode] / len(self.modes)
                        for mode in self.mode_names})
        summary['train/learning_rate'] = learning_rate
        self.steps, self.modes = [], []
        return summary, found


def _divergence_error(config: ml_collections.ConfigDict, found: divergence.Divergence,
                      manager) -> FloatingPointError:
    """The one-line stop message: what diverged where, the newest checkpoint (finite: nothing
    non-finite is saved, and a resumed state is checked) and what to change."""
    manager.wait_until_finished()  # so latest_step() is the last saved one
    latest = manager.latest_step()
    newest = ('no checkpoint was saved before it' if latest is None else
              f'the newest checkpoint, all finite, is step {latest} '
              f'({manager.directory / str(latest)})')
    return FloatingPointError(f'{found}; stopped without saving: {newest}. To go on: '
                              f'{divergence.advice(config, found)}')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: data.Dataset | None = None,
                       console: Console | None = None) -> dict:
    """Trains (resuming from `workdir` if it holds a checkpoint); returns the final metrics.

    `dataset`: the data, already loaded by `data.load_dataset(config.dataset)`, for
    callers that train several runs on the same data (alignmix_jax/experiments/reproduce.py); None
    loads it. `console`: where the header, progress and evaluations are shown (the training
    command's terminal); None shows nothing (absl's log has it all). The settings are checked
    first; the run holds the workdir's lock (one run per workdir) and continues only a run of
    the same settings (alignmix_jax/runtime/run_config.py).
    """
    config_checks.validate(config, num_devices=jax.device_count())
    with workdir_lock.hold(workdir, jax.process_index()):
        # Before the data: a restart with settings its checkpoints cannot continue with stops.
        for field, old, new in run_config.check(config, workdir):
            logging.warning('config.%s changed from %s to %s (allow_config_change).', field,
                            old, new)
        return _train_and_evaluate(config, workdir, dataset, console or Console())


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        dataset: data.Dataset | None, console: Console) -> dict:
    # Orbax writes only to absolute paths; `--workdir=runs/demo` is relative to the caller.
    workdir = os.path.abspath(workdir)
    modes = training_modes(config)
    if dataset is None:
        dataset = data.load_dataset(config.dataset)
    augmentation.check_device_augmentation(config.dataset, dataset)
    config_checks.check_training_set(config, dataset.num_train_examples)
    model = build_training_model(config, dataset)
    train_config = config.train
    steps_per_epoch = data.steps_per_epoch(dataset.num_train_examples, train_config.batch_size)
    total_steps = train_config.num_epochs * steps_per_epoch
    _, schedule = make_optimizer(train_config, steps_per_epoch)
    mesh = sharding.make_mesh()
    logging.info('Process %d of %d; %d devices in all (%s).', jax.process_index(),
                 jax.process_count(), mesh.size, jax.devices()[0].platform)

    state = create_train_state(config, model, dataset.image_shape, steps_per_epoch, mesh)
    manager = checkpointing.make_manager(workdir, max_to_keep=train_config.keep_checkpoints)
    progress = {'best_test_accuracy': None, 'best_epoch': None}
    restored = checkpointing.restore_latest(manager, state)
    if restored is not None:
        state, progress, _ = restored
        # Jitted: run op by op it compiled two small programs per distinct leaf shape (35 on
        # the tiny test network, ~1.2 s of each resume).
        if not bool(jax.jit(divergence.all_finite)(state.params, state.batch_stats)):
            # Only a version without the divergence check can have saved it.
            raise checkpointing.CheckpointError(
                f'the latest checkpoint in {manager.directory} (step {int(state.step)}) holds '
                f'non-finite parameters or statistics; delete that step\'s directory to resume '
                f'from the one before it')
        run_config.check_num_epochs(config, int(state.step), steps_per_epoch, manager.directory)
        resumed = f'Resumed from {manager.directory} at step {int(state.step)}.'
        logging.info(resumed)
        console.line(resumed)
    start_step = int(state.step)
    if jax.process_index() == 0:  # the settings the run goes on with
        run_config.record(config, workdir)
    console.header(
        model=config.model.name + (f' (width {config.model.width:g})'
                                   if config.model.width != 1 else ''),
        data=f'{config.dataset.name} ({dataset.num_train_examples:,} training images, '
             f'{dataset.num_classes} classes)',
        num_devices=mesh.size, platform=jax.devices()[0].platform,
        processes=jax.process_count(),
        start_step=start_step, total_steps=total_steps, steps_per_epoch=steps_per_epoch,
        config_path=os.path.join(workdir, run_config.CONFIG_FILE))

    # Only process 0 logs and writes metrics (absl's log, metrics.jsonl, TensorBoard).
    writer = metric_log.open_writer(workdir, start_step, jax.process_index())
    if start_step == 0:
        writer.write_hparams(_flatten(config.to_dict()))
    report_progress = metric_log.ProgressReport(writer, total_steps=total_steps,
                                                every_steps=train_config.log_every_steps)

    compiled_train_step = make_train_step(model, config, mesh,
                                          device_augmentation=dataset.device_augmentation)
    batches = dataset.train_batches(train_config.batch_size, seed=config.seed,
                                    start_step=start_step, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    if start_step == 0:  # before the first step, with the initial model
        first_batch = next(batches)
        effect = inert_alignment.check_alignment_acts(
            config, model, {'params': state.params, 'batch_stats': state.batch_stats},
            first_batch[0])
        if effect is not None:
            logging.info('Alignment effect of the initial model on the first batch: %.3g.',
                         effect)
        batches = itertools.chain([first_batch], batches)
    # The next batches' copies to the devices overlap the current step (unchanged batches).
    batches = sharding.prefetch_to_mesh(batches, mesh)
    cutmix_probability = config.mixup.cutmix_probability
    # Modes reported in the mode fractions: CutMix's too when AlignMix + CutMix draws it.
    buffer = _MetricBuffer(modes + ((mixup.CUTMIX_MODE,) if cutmix_probability > 0 else ())
                           + ((mixup.NO_MIXUP_MODE,) if config.mixup.probability < 1
                              or config.mixup.off_epoch is not None else ()))
    detector = divergence.LossExplosionDetector(train_config.loss_explosion_factor)
    # The evaluation commands' evaluators, run at each evaluation (config.train.evals).
    eval_context = evaluation_common.EvalContext(config=config, model=model, dataset=dataset,
                                                 mesh=mesh)
    # The test evaluation: accuracy, loss (and a decoder's reconstruction error).
    test_evaluator = classification.Evaluator(eval_context,
                                              batch_size=train_config.eval_batch_size)
    evaluators = [evaluation.make_evaluator(kind, eval_context, config.evals)
                  for kind in train_config.evals]
    eval_every_steps = train_config.eval_every_epochs * steps_per_epoch
    test_metrics, eval_figures, latest_loss = {}, {}, None
    if start_step < total_steps:
        logging.info('Training %d steps (%d epochs of %d steps) from step %d; modes %s%s.',
                     total_steps, train_config.num_epochs, steps_per_epoch, start_step, modes,
                     f' (CutMix with probability {cutmix_probability:g} before them)'
                     if cutmix_probability > 0 else '')
    else:
        logging.info('The checkpoint is at the last step (%d); evaluating it.', start_step)
    # Training time of the run across resumes: each checkpoint records the seconds trained up
    # to it (steps lost to a kill after the last one are counted once, when trained again).
    trained_before = progress.get('train_seconds', 0.0)
    start_time = time.time()

    def train_seconds():
        return trained_before + time.time() - start_time

    # SIGTERM or SIGINT: the step in progress ends the run, saved
    # (alignmix_jax/runtime/preemption.py).
    with (preemption.StopOnSignal() as stop, _wait_for_saves(manager),
          contextlib.closing(writer), console.progress(start_step, total_steps)):
        for step in range(start_step + 1, total_steps + 1):
            images, labels = next(batches)
            # timm's probability and off_epoch may turn the drawn mode into 'none'; `step` is
            # 1-based (the state's step before it is step - 1), so its 0-based epoch is:
            mode = mixup.scheduled_mode(
                choose_mode(modes, config.seed, step, cutmix_probability), seed=config.seed,
                step=step, epoch=(step - 1) // steps_per_epoch,
                probability=config.mixup.probability, off_epoch=config.mixup.off_epoch)
            state, step_metrics = compiled_train_step(state, images, labels, mode=mode)
            buffer.add(mode, step_metrics)
            checkpointing.check_saves(manager)  # a failed save stops the run a step later
            steps_per_sec = report_progress(step)
            console.step(step)

            is_last = step == total_steps
            stopping = not is_last and stop.requested(step, manager)
            should_eval = step % eval_every_steps == 0 or is_last
            should_save = (step % train_config.checkpoint_every_steps == 0 or should_eval
                           or stopping)
            # Every save is preceded by a check of every step up to it.
            if step % train_config.log_every_steps == 0 or should_save:
                summary, found = buffer.flush(step, float(schedule(step - 1)), detector)
                if found is not None:
                    raise _divergence_error(config, found, manager)
                writer.write_scalars(step, summary)
                latest_loss = summary.get('train/loss')
            if steps_per_sec is not None:
                console.report(step, steps_per_sec, latest_loss)
            if should_eval:
                epoch = step // steps_per_epoch
                test_metrics = test_evaluator.run({'params': state.params,
                                                   'batch_stats': state.batch_stats})
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
                console.evaluation(epoch, step, test_metrics['accuracy'], test_metrics['loss'],
                                   progress['best_test_accuracy'], progress['best_epoch'])
            if should_save:
                checkpointing.save(manager, step, state,
                                   {**progress, 'train_seconds': train_seconds()})
            if stopping:
                checkpointing.check_saves(manager, wait=True)
                writer.flush()
                raise stop.preempted(step, total_steps, manager.directory)

    if start_step >= total_steps:  # nothing left to train: report the checkpoint as it is
        test_metrics = test_evaluator.run({'params': state.params,
                                           'batch_stats': state.batch_stats})
    result = {'final_test_accuracy': test_metrics['accuracy'],
              'final_test_loss': test_metrics['loss'],
              'best_test_accuracy': progress['best_test_accuracy'],
              'best_epoch': progress['best_epoch'], 'steps': total_steps,
              # Over every part of a resumed run; this call's share was the rest.
              'train_seconds': train_seconds(), 'train_seconds_before_resume': trained_before}
    if 'reconstruction_error' in test_metrics:
        result['final_test_reconstruction_error'] = test_metrics['reconstruction_error']
    if eval_figures:  # the last figures of config.train.evals
        result['evals'] = eval_figures
    logging.info('Final test accuracy %.2f%% after %d epochs (best during training: %.2f%% at '
                 'epoch %s).', 100 * result['final_test_accuracy'], train_config.num_epochs,
                 100 * (result['best_test_accuracy'] or result['final_test_accuracy']),
                 result['best_epoch'])
    return result


@contextlib.contextmanager
def _wait_for_saves(manager):
    """A save in flight completes even when the loop stops on an error or a signal; its own
    failure is reported unless the loop's error is already on its way."""
    try:
        yield
    except BaseException:
        try:
            manager.wait_until_finished()
        except Exception:  # the loop's error is the one to report
            logging.debug('a save failed while the loop stopped', exc_info=True)
        raise
    checkpointing.check_saves(manager, wait=True)


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
