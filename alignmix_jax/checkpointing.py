"""Orbax checkpoints of the training state in `<workdir>/checkpoints`.

Each checkpoint holds the train state (a pytree) and a small JSON record of the run's progress
(best test accuracy so far and its epoch). Orbax writes each step to a temporary directory and
renames it when complete, so a run killed at any moment leaves only whole checkpoints behind.
"""

import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used; the message says what to do."""


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / 'checkpoints'


def make_manager(workdir: str, *, max_to_keep: int = 3,
                 read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=True)
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                 item_names=('state', 'progress'))


def save(manager: ocp.CheckpointManager, step: int, state, progress: dict) -> None:
    """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)))


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
        reason = f'{type(error).__name__}: {str(error).splitlines()[0][:200]}' if str(error) \
            else type(error).__name__
        raise _unreadable(directory, f'the checkpoint of step {step}',
                          f'{reason}; or it was written with a different model config') from error
    return restored.state, dict(restored.progress), step
