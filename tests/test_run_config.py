"""The workdir remembers its run's config: a restart with settings its checkpoints cannot
continue with is refused in one line naming each change; num_epochs may grow, not shrink."""

import json
import shutil

import pytest

from alignmix_jax.runtime import run_config
from alignmix_jax.training import train
from tests.conftest import make_tiny_config

# Slow (left out by -m "not slow"): trains a run, then restarts it with changed settings.
pytestmark = pytest.mark.slow


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished tiny run of 2 epochs (checkpoints up to step 8) and its config."""
    workdir = tmp_path_factory.mktemp('trained') / 'run'
    config = make_tiny_config()
    train.train_and_evaluate(config, str(workdir))
    return workdir, config


def saved_config(workdir):
    with open(workdir / 'config.json') as config_file:
        return json.load(config_file)


def test_the_first_start_writes_the_resolved_config(trained):
    workdir, config = trained
    assert saved_config(workdir) == json.loads(config.to_json_best_effort())
    assert saved_config(workdir)['train']['batch_size'] == 16
    assert saved_config(workdir)['mixup']['modes'] == list(config.mixup.modes)


def refused(config, workdir) -> str:
    before = (workdir / 'config.json').read_text()
    with pytest.raises(run_config.ConfigChangedError) as raised:
        train.train_and_evaluate(config, str(workdir))
    assert (workdir / 'config.json').read_text() == before  # nothing recorded
    message = str(raised.value)
    assert '\n' not in message
    return message


def test_another_batch_size_is_refused_naming_old_and_new_values(trained):
    workdir, config = trained
    changed = make_tiny_config()
    changed.train.batch_size = 32
    assert refused(changed, workdir) == (
        f'{workdir} holds a run started with other settings: train.batch_size 16 -> 32 (from '
        f'{workdir}/config.json); resume with its values, start a new run with another '
        f'--workdir, or pass --config.train.allow_config_change=True to continue this one '
        f'with the new values (it is then no longer the run it continues)')


def test_another_seed_modes_and_alpha_are_each_named(trained):
    workdir, _ = trained
    changed = make_tiny_config()
    changed.seed = 1
    changed.mixup.modes = ('input', 'feature')
    changed.mixup.alpha = 1.0
    changed.train.lr_decay_epochs = (2,)
    assert (': mixup.alpha 2.0 -> 1.0, mixup.modes ["input", "embedding", "feature", '
            '"feature_prime"] -> ["input", "feature"], seed 0 -> 1, train.lr_decay_epochs [1] '
            '-> [2] (from') in refused(changed, workdir)


def test_another_model_or_data_is_refused_even_when_changes_are_allowed(trained):
    workdir, _ = trained
    changed = make_tiny_config()
    changed.model.width = 0.25
    changed.dataset.train_subset = 128
    changed.train.learning_rate = 0.01
    changed.train.allow_config_change = True
    assert refused(changed, workdir) == (
        f'{workdir} holds the checkpoints of another model or data: dataset.train_subset 64 '
        f'-> 128, model.width 0.125 -> 0.25 (from {workdir}/config.json); resume with the '
        f'values it was trained with, or start a new run with another --workdir')


def test_fewer_epochs_than_the_checkpoint_step_is_refused(trained):
    workdir, _ = trained
    changed = make_tiny_config()
    changed.train.num_epochs = 1
    assert refused(changed, workdir) == (
        f'config.train.num_epochs=1 (4 steps of 4 an epoch) ends before the latest checkpoint '
        f'in {workdir}/checkpoints, step 8: pass --config.train.num_epochs=2 or more to '
        f'continue or re-evaluate it, or use another --workdir')
    assert not (workdir / 'results.json').exists()


def test_allowed_changes_and_bookkeeping_go_on_and_are_recorded(trained, tmp_path):
    source, _ = trained
    workdir = tmp_path / 'run'
    shutil.copytree(source, workdir)
    changed = make_tiny_config()
    changed.train.num_epochs = 3  # may grow: the run continues
    changed.train.log_every_steps = 1  # bookkeeping: free
    changed.train.learning_rate = 0.05
    changed.train.allow_config_change = True
    result = train.train_and_evaluate(changed, str(workdir))
    assert result['steps'] == 12
    assert saved_config(workdir)['train']['learning_rate'] == 0.05
    assert saved_config(workdir)['train']['num_epochs'] == 3
    # The recorded config is the new one: the same settings resume without the flag.
    changed.train.allow_config_change = False
    assert run_config.check(changed, str(workdir)) == []


def test_a_workdir_without_checkpoints_takes_any_config(tmp_path):
    workdir = tmp_path / 'run'
    (workdir / 'checkpoints').mkdir(parents=True)  # e.g. a run stopped before its first save
    (workdir / 'config.json').write_text(make_tiny_config().to_json_best_effort())
    changed = make_tiny_config()
    changed.train.batch_size = 32
    assert run_config.check(changed, str(workdir)) == []
