"""The workdir remembers its run: the resolved config in WORKDIR/config.json, compared on resume.

    run_config.check(config, workdir)           at the start of training, before the data
    run_config.check_num_epochs(...)            once the checkpoint's step is known
    run_config.record(config, workdir)          then (process 0)

The first start writes the config with every override applied. A restart into a workdir that
holds checkpoints compares its config with that file, field by field:

- the model and the data (`model.*`, `dataset.*`): the checkpoint is another run's with other
  values; refused, whatever the flags (another --workdir);
- the course of the run (the seed, the batch size, the mixup modes and alpha, the schedule, the
  optimizer, ...): a resumed run with other values is no longer the run it continues (with
  another batch size the learning rate jumps back and an epoch is seen twice; with another seed,
  data order and modes follow the new seed, lambda the saved key); refused unless
  `--config.train.allow_config_change=True`, which continues with the new values (and logs
  each change);
- bookkeeping (`_FREE`: logging, checkpoint and evaluation intervals, evaluation options, where
  the data lives): free to change;
- `train.num_epochs` may grow (the run continues) but not shrink below the checkpoint's step
  (`check_num_epochs`, once the epoch length is known).

The file is then rewritten with the config the run goes on with. Fields only one of the two
configs has (a config of an older or newer version) are not compared.
"""

import json
import os

import ml_collections
import orbax.checkpoint as ocp

from alignmix_jax.runtime import checkpointing

CONFIG_FILE = 'config.json'

# Longest matching prefix wins.
_FREE = ('train.num_epochs', 'train.log_every_steps', 'train.checkpoint_every_steps',
         'train.keep_checkpoints', 'train.eval_batch_size', 'train.eval_every_epochs',
         'train.evals', 'train.allow_config_change', 'train.loss_explosion_factor', 'evals',
         'dataset.data_dir', 'dataset.download', 'model.pretrained',
         'mixup.allow_inert_alignment')
# Fields of model.* that change the computation but not the checkpoint's shapes.
_CHANGEABLE = ('model.dtype', 'model.sync_batch_norm')
_FIXED = ('model', 'dataset')


class ConfigChangedError(ValueError):
    """A restart with settings the workdir's run cannot continue with; the message names each
    changed field, its old and new value, and the way out."""


def _kind(field: str) -> str:
    """'free', 'changeable' (with allow_config_change) or 'fixed'."""
    rules = [(prefix, 'free') for prefix in _FREE] + \
        [(prefix, 'changeable') for prefix in _CHANGEABLE] + \
        [(prefix, 'fixed') for prefix in _FIXED]
    matches = [(len(prefix), kind) for prefix, kind in rules
               if field == prefix or field.startswith(prefix + '.')]
    return max(matches)[1] if matches else 'changeable'


def _flatten(tree, prefix: str = '') -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f'{prefix}.{key}' if prefix else key))
    return flat


def as_json(config: ml_collections.ConfigDict) -> str:
    """The config as WORKDIR/config.json holds it (and --print_config prints it)."""
    return config.to_json_best_effort(indent=2, sort_keys=True)


def _describe(changes: list[tuple[str, object, object]]) -> str:
    return ', '.join(f'{field} {json.dumps(old)} -> {json.dumps(new)}'
                     for field, old, new in changes)


def changed_fields(saved: dict, config: ml_collections.ConfigDict
                   ) -> list[tuple[str, object, object]]:
    """(field, saved value, new value) of each field both configs have and that differs, in
    the order of the field names; values as JSON has them (tuples as lists)."""
    old, new = _flatten(saved), _flatten(json.loads(as_json(config)))
    return [(field, old[field], new[field]) for field in sorted(old.keys() & new.keys())
            if old[field] != new[field]]


def check(config: ml_collections.ConfigDict, workdir: str) -> list[tuple[str, object, object]]:
    """Compares `config` with the one `workdir`'s run was started with (if it holds
    checkpoints) and raises ConfigChangedError as the module docstring says; returns the
    changes it lets through (allow_config_change)."""
    path = os.path.join(workdir, CONFIG_FILE)
    directory = checkpointing.checkpoint_dir(workdir)
    has_checkpoints = directory.is_dir() and bool(ocp.path.step.checkpoint_steps(directory))
    if not (has_checkpoints and os.path.isfile(path)):
        return []
    try:
        with open(path) as config_file:
            saved = json.load(config_file)
    except (ValueError, UnicodeDecodeError) as error:
        raise ConfigChangedError(f'{path} is not the JSON config this program writes '
                                 f'({error}); restore it, or use another --workdir') from error
    changes = [change for change in changed_fields(saved, config)
               if _kind(change[0]) != 'free']
    fixed = [change for change in changes if _kind(change[0]) == 'fixed']
    if fixed:
        raise ConfigChangedError(
            f'{workdir} holds the checkpoints of another model or data: {_describe(fixed)} '
            f'(from {path}); resume with the values it was trained with, or start a new run '
            f'with another --workdir')
    if changes and not config.train.allow_config_change:
        raise ConfigChangedError(
            f'{workdir} holds a run started with other settings: {_describe(changes)} '
            f'(from {path}); resume with its values, start a new run with another '
            f'--workdir, or pass --config.train.allow_config_change=True to continue this '
            f'one with the new values (it is then no longer the run it continues)')
    return changes


def record(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `config` to WORKDIR/config.json (process 0, once the checks have passed)."""
    path = os.path.join(workdir, CONFIG_FILE)
    partial = f'{path}.tmp'
    with open(partial, 'w') as config_file:
        config_file.write(as_json(config) + '\n')
    os.replace(partial, path)  # other processes never read a half-written file


def check_num_epochs(config: ml_collections.ConfigDict, checkpoint_step: int,
                     steps_per_epoch: int, directory) -> None:
    """ConfigChangedError when `config.train.num_epochs` ends before the checkpoint's step."""
    total_steps = config.train.num_epochs * steps_per_epoch
    if checkpoint_step > total_steps:
        needed = -(-checkpoint_step // steps_per_epoch)
        raise ConfigChangedError(
            f'config.train.num_epochs={config.train.num_epochs} ({total_steps} steps of '
            f'{steps_per_epoch} an epoch) ends before the latest checkpoint in {directory}, '
            f'step {checkpoint_step}: pass --config.train.num_epochs={needed} or more to '
            f'continue or re-evaluate it, or use another --workdir')
