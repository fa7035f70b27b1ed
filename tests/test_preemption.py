"""SIGTERM and SIGINT: the run saves the step in progress, says how to resume, exits with
preemption.EXIT_CODE, and the resumed run ends bit-identical to an uninterrupted one."""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from alignmix_jax import data
from alignmix_jax.runtime import checkpointing, preemption
from alignmix_jax.training import train
from tests.conftest import REPO_ROOT, make_tiny_config
from tests.test_train import restore_params

# Slow (left out by -m "not slow"): trains runs and stops them with signals (also two
# processes).
pytestmark = pytest.mark.slow


def preemption_config():
    config = make_tiny_config()  # 4 steps an epoch
    config.train.num_epochs = 3
    config.train.checkpoint_every_steps = 3
    return config


@pytest.fixture(scope='module')
def demo_dataset():
    return data.load_dataset(make_tiny_config().dataset)


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp('uninterrupted'))
    return workdir, train.train_and_evaluate(preemption_config(), workdir)


# The step each signal arrives at: neither a checkpoint step (3, 6, 9) nor an evaluation step
# (4, 8), so the saved step is the signal's alone.
SIGNAL_STEPS = {signal.SIGTERM: 5, signal.SIGINT: 10}


@pytest.mark.parametrize('signum', list(SIGNAL_STEPS), ids=['SIGTERM', 'SIGINT'])
def test_a_signal_saves_the_step_in_progress_and_the_resumed_run_is_bit_identical(
        tmp_path, monkeypatch, demo_dataset, uninterrupted, signum):
    config = preemption_config()
    workdir = str(tmp_path / 'run')
    signal_step = SIGNAL_STEPS[signum]
    draw_mode = train.choose_mode

    def signalled_draw(modes, seed, step, *args):
        if step == signal_step:  # the signal arrives while the step is being prepared
            os.kill(os.getpid(), signum)
        return draw_mode(modes, seed, step, *args)

    monkeypatch.setattr(train, 'choose_mode', signalled_draw)
    handlers = {sig: signal.getsignal(sig) for sig in SIGNAL_STEPS}
    with pytest.raises(preemption.Preempted) as raised:
        train.train_and_evaluate(config, workdir)
    name = signal.Signals(signum).name
    assert str(raised.value) == (
        f'stopped by {name} at step {signal_step} of 12: saved the checkpoint of step '
        f'{signal_step} in {workdir}/checkpoints; run the same command again to resume from '
        f'it (exit status 75)')
    # The handlers are the caller's again.
    assert {sig: signal.getsignal(sig) for sig in SIGNAL_STEPS} == handlers
    manager = checkpointing.make_manager(workdir, read_only=True)
    assert max(manager.all_steps()) == signal_step
    state, _, step = restore_params(workdir, config, demo_dataset)
    assert step == int(state.step) == signal_step

    monkeypatch.setattr(train, 'choose_mode', draw_mode)
    resumed = train.train_and_evaluate(config, workdir)
    uninterrupted_dir, uninterrupted_result = uninterrupted
    state_a, progress_a, step_a = restore_params(uninterrupted_dir, config, demo_dataset)
    state_b, progress_b, step_b = restore_params(workdir, config, demo_dataset)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
    jax.tree.map(np.testing.assert_array_equal, state_a.batch_stats, state_b.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, state_a.opt_state, state_b.opt_state)
    # Equal but for the training time each run took.
    assert progress_a.pop('train_seconds') > 0 and progress_b.pop('train_seconds') > 0
    assert progress_a == progress_b
    assert resumed['final_test_accuracy'] == uninterrupted_result['final_test_accuracy']
    assert resumed['final_test_loss'] == uninterrupted_result['final_test_loss']


def tiny_run_args(workdir, num_epochs):
    """make_tiny_config's run as command-line overrides of configs/demo.py."""
    return ['--config=configs/demo.py', f'--workdir={workdir}',
            '--config.dataset.train_subset=64', '--config.model.width=0.125',
            '--config.train.batch_size=16', f'--config.train.num_epochs={num_epochs}',
            '--config.train.lr_decay_epochs=(1,)', '--config.train.eval_batch_size=250',
            f'--config.train.eval_every_epochs={num_epochs}',
            '--config.train.log_every_steps=2', '--config.train.checkpoint_every_steps=2']


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['SIGTERM', 'SIGINT'])
def test_the_training_command_stops_on_a_signal_in_one_line(tmp_path, signum):
    """A real signal at a moment the test does not choose: the run is long (400 steps), the
    signal comes once its first checkpoint is complete."""
    workdir = tmp_path / 'run'
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
    process = subprocess.Popen([sys.executable, '-m', 'alignmix_jax.main',
                                *tiny_run_args(workdir, num_epochs=100)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment)
    try:
        deadline = time.monotonic() + 300
        while not (workdir / 'checkpoints' / '2').is_dir():
            assert process.poll() is None and time.monotonic() < deadline, \
                process.communicate()[1][-3000:]
            time.sleep(0.1)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == preemption.EXIT_CODE, stderr[-3000:]
    assert 'Traceback' not in stderr
    last_line = stderr.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    match = re.fullmatch(rf'stopped by {name} at step (\d+) of 400: saved the checkpoint of '
                         rf'step (\d+) in {workdir}/checkpoints; run the same command again to '
                         r'resume from it \(exit status 75\)', last_line)
    assert match and match[1] == match[2], last_line
    stopped_at = int(match[1])
    assert 2 <= stopped_at < 400
    manager = checkpointing.make_manager(str(workdir), read_only=True)
    assert max(manager.all_steps()) == stopped_at
    assert not (workdir / 'results.json').exists()


SECOND_SIGNAL_RUN = '''
import os, signal, sys
from alignmix_jax.runtime import checkpointing
from alignmix_jax.training import train
from tests.conftest import make_tiny_config
from tests.test_preemption import preemption_config

save = checkpointing.save
draw_mode = train.choose_mode

def signalled_draw(modes, seed, step, *args):
    if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return draw_mode(modes, seed, step, *args)

def save_then_signal(manager, step, state, progress):
    save(manager, step, state, progress)  # asynchronous: the save of step 5 is in flight
    if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)

train.choose_mode = signalled_draw
checkpointing.save = save_then_signal
train.train_and_evaluate(preemption_config(), sys.argv[1])
'''


def test_a_second_signal_while_saving_exits_at_once_and_keeps_the_checkpoints(
        tmp_path, demo_dataset, uninterrupted):
    workdir = str(tmp_path / 'run')
    result = subprocess.run([sys.executable, '-c', SECOND_SIGNAL_RUN, workdir], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        'error: stopped by a second SIGTERM before the save of the stopping step completed; '
        'the checkpoints completed before it are intact')
    # Step 4's checkpoint (an evaluation step's) is whole; step 5's too if its save won the
    # race with the exit.
    config = preemption_config()
    state, _, step = restore_params(workdir, config, demo_dataset)
    assert step in (4, 5) and int(state.step) == step
    train.train_and_evaluate(config, workdir)
    uninterrupted_state, _, _ = restore_params(uninterrupted[0], config, demo_dataset)
    state, _, step = restore_params(workdir, config, demo_dataset)
    assert step == 12
    jax.tree.map(np.testing.assert_array_equal, uninterrupted_state.params, state.params)


def child_processes(pid: int) -> list[int]:
    with open(f'/proc/{pid}/task/{pid}/children') as children:
        return [int(child) for child in children.read().split()]


def test_two_processes_stop_at_the_same_step_and_resume_bit_identical(tmp_path, demo_dataset):
    """SIGTERM to process 1 alone: JAX's preemption service makes both save the same step."""
    from tests.test_sharding import demo_run_args, run_python

    uninterrupted_dir, workdir = tmp_path / 'uninterrupted', tmp_path / 'run'
    launch = ['launch/local.py', '--num_processes=2', '--']
    assert run_python(*launch, *demo_run_args(uninterrupted_dir, num_epochs=3)).returncode == 0

    launcher = subprocess.Popen([sys.executable, *launch, *demo_run_args(workdir, num_epochs=3)],
                                cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))
    try:
        deadline = time.monotonic() + 600
        while not (workdir / 'checkpoints' / '4').is_dir():  # the first: epoch 1's
            assert launcher.poll() is None and time.monotonic() < deadline, \
                launcher.communicate()[0][-3000:]
            time.sleep(0.1)
        [process_1] = [pid for pid in child_processes(launcher.pid)
                       if '--process_id=1' in open(f'/proc/{pid}/cmdline').read()]
        os.kill(process_1, signal.SIGTERM)
        output, _ = launcher.communicate(timeout=300)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert launcher.returncode == preemption.EXIT_CODE, output[-3000:]
    stops = re.findall(r'\[(\d)\] stopped by a preemption notice \(SIGTERM or SIGINT to one of '
                       r'the processes\) at step (\d+) of 12: saved the checkpoint of step '
                       r'\2 in ', output)
    assert sorted(process for process, _ in stops) == ['0', '1'], output[-3000:]
    assert stops[0][1] == stops[1][1]
    stopped_at = int(stops[0][1])
    assert 1 <= stopped_at < 12
    manager = checkpointing.make_manager(str(workdir), read_only=True)
    assert max(manager.all_steps()) == stopped_at

    resumed = run_python(*launch, *demo_run_args(workdir, num_epochs=3))
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f'at step {stopped_at}.' in resumed.stdout  # 'Resumed from ... at step N.'
    config = make_tiny_config()
    config.mixup.modes = ('input', 'feature')
    config.train.lr_decay_epochs = ()
    state_a, progress_a, step_a = restore_params(str(uninterrupted_dir), config, demo_dataset)
    state_b, progress_b, step_b = restore_params(str(workdir), config, demo_dataset)
    assert step_a == step_b == 12
    jax.tree.map(np.testing.assert_array_equal, state_a.params, state_b.params)
    jax.tree.map(np.testing.assert_array_equal, state_a.batch_stats, state_b.batch_stats)
    # Equal but for the training time each run took.
    assert progress_a.pop('train_seconds') > 0 and progress_b.pop('train_seconds') > 0
    assert progress_a == progress_b
