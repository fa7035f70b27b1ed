"""One run per workdir: the lock, a second process, a killed holder, multi-process files."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from alignmix_jax.runtime import workdir_lock
from tests.conftest import REPO_ROOT

# Slow (left out by -m "not slow"): starts training commands against held workdirs.
pytestmark = pytest.mark.slow

HOLDER = '''
import sys, time
from alignmix_jax.runtime import workdir_lock
with workdir_lock.hold(sys.argv[1], int(sys.argv[2])):
    print('locked', flush=True)
    time.sleep(600)
'''


@pytest.fixture
def start_holder():
    """Starts processes that hold a workdir's lock (of process index i) until killed."""
    started = []

    def start(workdir, process_index=0):
        holder = subprocess.Popen([sys.executable, '-c', HOLDER, str(workdir),
                                   str(process_index)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                  text=True)
        started.append(holder)
        assert holder.stdout.readline().strip() == 'locked'
        return holder

    yield start
    for holder in started:
        if holder.poll() is None:
            holder.kill()
        holder.wait()


def test_a_held_workdir_stops_a_second_run_naming_the_holder(tmp_path, start_holder):
    holder = start_holder(tmp_path)
    with pytest.raises(workdir_lock.WorkdirLockedError) as raised:
        with workdir_lock.hold(str(tmp_path)):
            pass
    message = str(raised.value)
    assert message.startswith(f'another run holds {tmp_path}: host {socket.gethostname()} '
                              f'pid {holder.pid} started ')
    assert message.endswith(f'(lock {tmp_path}/train.lock); wait for it to finish or stop '
                            'it, or use another --workdir')
    assert '\n' not in message


def test_a_lock_left_by_a_killed_process_does_not_block_the_next_run(tmp_path, start_holder):
    holder = start_holder(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    # The file is still there, naming the dead process; the kernel released its lock.
    assert f'pid {holder.pid} ' in (tmp_path / 'train.lock').read_text()
    with workdir_lock.hold(str(tmp_path)) as path:
        assert f'pid {os.getpid()} ' in open(path).read()
    with workdir_lock.hold(str(tmp_path)):  # released on leaving the block
        pass


def test_the_same_process_cannot_hold_a_workdir_twice(tmp_path):
    # POSIX locks belong to the process: without the registry the second lock would succeed.
    with workdir_lock.hold(str(tmp_path)):
        with pytest.raises(workdir_lock.WorkdirLockedError, match='this process already runs'):
            with workdir_lock.hold(str(tmp_path)):
                pass
        assert 'pid' in (tmp_path / 'train.lock').read_text()  # still held: not closed


def test_processes_of_one_job_lock_their_own_files(tmp_path, start_holder):
    """Process 1 of a job does not collide with process 0 of the same job; process 0's file
    is the single-process run's, so such a run and a multi-process job exclude each other."""
    start_holder(tmp_path, process_index=0)
    with workdir_lock.hold(str(tmp_path), process_index=1) as path:
        assert path == str(tmp_path / 'train.lock.process1')
    start_holder(tmp_path, process_index=1)
    with pytest.raises(workdir_lock.WorkdirLockedError, match=r'train\.lock\.process1\)'):
        with workdir_lock.hold(str(tmp_path), process_index=1):
            pass


def test_second_training_command_on_a_locked_workdir_exits_with_one_line(tmp_path,
                                                                         start_holder):
    holder = start_holder(tmp_path)
    result = subprocess.run(
        [sys.executable, '-m', 'alignmix_jax.main', '--config=configs/demo.py',
         f'--workdir={tmp_path}'], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f'error: another run holds {tmp_path}: host '
                                f'{socket.gethostname()} pid {holder.pid} started ')
    assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'checkpoints').exists()  # stopped before anything was written
