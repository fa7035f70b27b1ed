"""Orbax checkpoints of the training state in `<workdir>/checkpoints`.

Each checkpoint holds the train state (a pytree) and a small JSON record of the run's progress
(best test accuracy so far and its epoch). Orbax writes each step to a temporary directory and
renames it when complete, so a run killed at any moment leaves only whole checkpoints behind.
"""

import errno
import os
import re
import weakref

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used; the message says what to do."""


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / 'checkpoints'


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
    # A read-only manager (evaluation) saves, deletes and cleans nothing. Saying so here keeps
    # orbax from overriding each of these options with a warning.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        save_interval_steps=0 if read_only else 1)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=('state', 'progress'))


# The step each manager saves last (asynchronously), for the message if that save fails: orbax
# forgets a failed step, and not every error of its threads names it.
_SAVING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def save(manager: ocp.CheckpointManager, step: int, state, progress: dict) -> None:
    """Saves asynchronously; `check_saves` after each step reports a failed save, and
    `wait_for_saves` waits for it to complete (before exiting)."""
    check_saves(manager, wait=True)  # orbax waits for the previous save: its failure is ours
    _SAVING[manager] = step
    try:
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))
    except Exception as error:  # the synchronous part: the temporary directory, the arrays
        raise _save_failed(manager, step, error) from error


def check_saves(manager: ocp.CheckpointManager, *, wait: bool = False) -> None:
    """CheckpointError (one line: the step, the path, the reason) if the last asynchronous
    save failed; with `wait`, waits for it first, else returns at once while it runs."""
    if not wait and manager.is_saving_in_progress():
        return
    try:
        manager.wait_until_finished()  # re-raises the save's error
        manager.check_for_errors()
    except Exception as error:
        raise _save_failed(manager, _SAVING.get(manager), error) from error


def _save_failed(manager: ocp.CheckpointManager, step: int | None,
                 error: BaseException) -> CheckpointError:
    which = f'the checkpoint of step {step}' if step is not None else 'a checkpoint'
    manager.reload()  # what is on disk now
    kept = manager.all_steps()
    earlier = (f'the earlier checkpoints ({", ".join(map(str, sorted(kept)))}) are intact; '
               f'resume from the latest by running the same command' if kept
               else 'there is no earlier checkpoint')
    return CheckpointError(f'{which} could not be written to {manager.directory} '
                           f'({_save_failure_reason(error)}); {earlier} once that is fixed')


def _save_failure_reason(error: BaseException) -> str:
    """The file system's reason ('No space left on device (ENOSPC)'), where TensorStore's
    message names its error code, else `underlying_reason`."""
    for cause in _chain(error):
        if isinstance(cause, OSError) and cause.errno:
            return f'{os.strerror(cause.errno)} ({errno.errorcode.get(cause.errno, cause.errno)})'
        code = re.search(r"\[os_error_code='(\d+)'\]", str(cause))
        if code:
            number = int(code[1])
            return f'{os.strerror(number)} ({errno.errorcode.get(number, number)})'
    return underlying_reason(error)


def _chain(error: BaseException):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def underlying_reason(error: BaseException, max_length: int = 300) -> str:
    """'Type: first line' of the innermost exception `error` was raised from.

    Orbax wraps TensorStore's errors in an Exception whose message embeds the repr of a bound
    pybind11 method and a multi-line spec; the error it was raised from says what is wrong
    (e.g. 'OUT_OF_RANGE: Error reading "params.classifier.kernel/0.0" in OCDBT database ...').
    """
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    if not lines:
        return type(error).__name__
    line = lines[0]
    if len(line) > max_length:
        line = line[:max_length - 3].rstrip() + '...'
    return f'{type(error).__name__}: {line}'


def _unreadable(directory: epath.Path, what: str, reason: str) -> CheckpointError:
    return CheckpointError(
        f'{what} in {directory} is unreadable ({reason}); it is left untouched: move it away to '
        f'resume from an earlier checkpoint, or start a new run with another --workdir')


def restore_latest(manager: ocp.CheckpointManager, abstract_state, *, step: int | None = None,
                   required: bool = False):
    """Restores (state, progress, step) of `step` or the latest step, or None if there is none.

    Raises CheckpointError when the directory holds something but no readable checkpoint, so a
    damaged run is never silently replaced by a fresh start, and, if `required` (evaluation
    jobs), when it holds no checkpoint at all.
    """
    directory = manager.directory
    steps = manager.all_steps()
    if not steps:
        leftovers = [p.name for p in directory.iterdir()] if directory.exists() else []
        leftovers = [name for name in leftovers if not name.startswith(('.', '_'))]
        if leftovers:
            raise _unreadable(directory, 'the checkpoint directory', f'no complete checkpoint; '
                              f'found {", ".join(sorted(leftovers)[:5])}')
        if required:
            raise CheckpointError(
                f'no checkpoint in {directory}: train first with `python -m alignmix_jax.main '
                f'--config=... --workdir={directory.parent}`')
        return None
    if step is None:
        step = max(steps)
    elif step not in steps:
        raise CheckpointError(f'no checkpoint of step {step} in {directory}; '
                              f'available steps: {sorted(steps)}')
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), progress=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for damaged files
        # Stops orbax's background work, which would otherwise print tracebacks at exit; the
        # run cannot go on with this checkpoint anyway.
        manager.close()
        raise _unreadable(directory, f'the checkpoint of step {step}',
                          f'{underlying_reason(error)}; or it was written with a different '
                          f'model config') from error
    return restored.state, dict(restored.progress), step


# How often an evaluation of the latest checkpoint moves on to the newest one when the one it
# reads is deleted under it (a training run's rotation, `keep_checkpoints`).
_ROTATION_RETRIES = 3


def restore_variables(workdir: str, abstract_variables: dict, *, step: int | None = None):
    """(variables, step): only the model's variables of `step` or the latest checkpoint.

    For evaluation, which has no optimizer and no train state: `abstract_variables` is a dict
    such as {'params': ..., 'batch_stats': ...} of jax.ShapeDtypeStruct trees (with shardings),
    naming fields of the saved train state; the optimizer state and the rest stay on disk.
    Raises CheckpointError with one line saying what to do when there is nothing to restore.
    A training run may delete the checkpoint being read (its rotation): the latest is then
    read again, the newest one (`_ROTATION_RETRIES` times); a `step` asked for is reported.
    """
    root = epath.Path(workdir)
    if not root.is_dir():
        raise CheckpointError(f'workdir {root} does not exist: train first with `python -m '
                              f'alignmix_jax.main --config=... --workdir={root}`')
    manager = make_manager(workdir, read_only=True)
    try:
        for attempt in range(_ROTATION_RETRIES + 1):
            manager.reload()  # what is on disk now: a training run may have rotated since
            steps = manager.all_steps()
            if not steps:
                # The same messages as for training: damaged, or empty (then: train first).
                restore_latest(manager, None, required=True)
            chosen = max(steps) if step is None else step
            if chosen not in steps:
                raise CheckpointError(f'no checkpoint of step {chosen} in {manager.directory}; '
                                      f'available steps: {sorted(steps)}')
            try:
                return _restore_variables(manager, chosen, abstract_variables), chosen
            except CheckpointError:
                if (manager.directory / str(chosen)).exists():
                    raise
                # Deleted while it was read: by a training run's rotation.
                if step is not None:
                    manager.reload()
                    raise CheckpointError(
                        f'the checkpoint of step {chosen} in {manager.directory} was deleted '
                        f'while it was read (a training run keeps only its newest '
                        f'keep_checkpoints); available steps: '
                        f'{sorted(manager.all_steps())}') from None
                logging.info('The checkpoint of step %d was deleted while it was read; reading '
                             'the newest one (attempt %d).', chosen, attempt + 2)
        raise CheckpointError(
            f'the latest checkpoint in {manager.directory} was deleted while it was read, '
            f'{_ROTATION_RETRIES + 1} times (a training run rotating its checkpoints faster '
            f'than they load): evaluate once it has finished, or keep more checkpoints')
    finally:
        # Stops orbax's background threads, which would otherwise print tracebacks at exit.
        manager.close()


def _restore_variables(manager: ocp.CheckpointManager, step: int,
                       abstract_variables: dict) -> dict:
    _check_variables_fit(manager.directory / str(step) / 'state', abstract_variables)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract_variables,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_variables),
                partial_restore=True)))
    except Exception as error:  # orbax raises many types for damaged or mismatched files
        raise CheckpointError(
            f'the checkpoint of step {step} in {manager.directory} does not fit the model '
            f'({underlying_reason(error)}): pass the config and overrides it was trained '
            f'with') from error
    return dict(restored.state)


def _check_variables_fit(state_directory: epath.Path, abstract_variables: dict) -> None:
    """CheckpointError naming the first variable the checkpoint lacks or holds in another shape.

    Checked from orbax's metadata before restoring: a failed restore leaves orbax's background
    work behind, which prints tracebacks at exit. The item's handler reads it: a checkpointer
    would also look for step metadata in the item's folder (it is one folder up) and warn.
    """
    handler = ocp.PyTreeCheckpointHandler()
    try:
        saved = handler.metadata(state_directory).tree
    except Exception as error:  # orbax raises many types for damaged files
        step_directory = state_directory.parent
        raise _unreadable(step_directory.parent, f'the checkpoint of step {step_directory.name}',
                          type(error).__name__) from error
    finally:
        handler.close()
    for path, wanted in jax.tree_util.tree_flatten_with_path(abstract_variables)[0]:
        keys = [str(getattr(entry, 'key', entry)) for entry in path]
        node = saved
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        name = '/'.join(keys)
        if node is None or tuple(node.shape) != tuple(wanted.shape):
            found = 'no such variable' if node is None else f'shape {tuple(node.shape)}'
            raise CheckpointError(
                f'the checkpoint in {state_directory.parent} does not fit the model: {name} '
                f'has {found} there, shape {tuple(wanted.shape)} in the model; pass the config '
                f'and overrides it was trained with')
