"""File-system trouble is one `error:` line, before the work where it can be foreseen: a bad
--workdir, a read-only workdir (training or evaluating), a disk that fills during a save.

Read-only and full file systems are real ones: a tmpfs mounted in a private mount namespace
(`unshare -rm`: a user namespace, so no privileges are needed where the kernel allows them)."""

import errno
import os
import shutil
import subprocess
import sys

import pytest

from alignmix_jax.runtime import output_dirs
from alignmix_jax.runtime.command_line import one_line_errors
from alignmix_jax.training import train
from tests.conftest import REPO_ROOT, make_tiny_config
from tests.test_preemption import tiny_run_args

# Slow (left out by -m "not slow"): runs the training command on full and read-only file systems.
pytestmark = pytest.mark.slow


def run_main(*args):
    return subprocess.run([sys.executable, '-m', 'alignmix_jax.main', *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


def _namespaces_available() -> bool:
    try:
        return subprocess.run(['unshare', '-rm', 'true'], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


needs_mounts = pytest.mark.skipif(
    not _namespaces_available(),
    reason='mounting a read-only or small file system needs `unshare -rm` (user and mount '
           'namespaces), which this machine does not allow')


def run_in_mount_namespace(script: str, *args) -> subprocess.CompletedProcess:
    """Runs the shell `script` (its arguments $1...) in a private mount namespace."""
    return subprocess.run(['unshare', '-rm', 'sh', '-c', script, 'sh', *map(str, args)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))


def one_error_line(stderr: str) -> str:
    assert 'Traceback' not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr[-3000:]
    return errors[0]


def test_an_empty_workdir_a_file_and_a_too_long_name_are_one_line_at_once(tmp_path):
    result = run_main('--config=configs/demo.py', '--workdir=')
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        'error: --workdir is empty (an unset variable?): give the folder to write to')
    a_file = tmp_path / 'notes.txt'
    a_file.write_text('not a folder')
    result = run_main('--config=configs/demo.py', f'--workdir={a_file}')
    assert one_error_line(result.stderr) == (
        f'error: --workdir {a_file} is a file, not a folder: give a folder (it is created if '
        f'missing)')
    long_name = tmp_path / ('r' * 300)
    result = run_main('--config=configs/demo.py', f'--workdir={long_name}')
    assert one_error_line(result.stderr) == (
        f'error: --workdir {long_name}: a name in it is too long for the file system (300 '
        f'bytes, {"r" * 40}...); give a shorter one')
    assert result.returncode == 1


def test_any_os_error_at_the_top_is_one_line_with_the_path_and_the_reason():
    with pytest.raises(SystemExit) as raised:
        with one_line_errors():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), '/runs/x/results.json')
    assert str(raised.value) == ('error: No space left on device (ENOSPC): '
                                 '/runs/x/results.json')


@needs_mounts
def test_training_into_a_read_only_workdir_stops_before_the_work(tmp_path):
    mount_point = tmp_path / 'mnt'
    mount_point.mkdir()
    result = run_in_mount_namespace(
        'mount -t tmpfs -o size=1m,ro none "$1" && exec "$2" -m alignmix_jax.main '
        '--config=configs/demo.py --workdir="$1/run"', mount_point, sys.executable)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        f'error: --workdir {mount_point}/run cannot be written: Read-only file system '
        f'(EROFS): {mount_point}/run')


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('finished') / 'run'
    train.train_and_evaluate(make_tiny_config(), str(workdir))
    return workdir


@needs_mounts
def test_an_evaluation_of_a_read_only_workdir_stops_before_it_computes(finished_run,
                                                                     tmp_path):
    workdir = tmp_path / 'run'
    shutil.copytree(finished_run, workdir)
    result = run_in_mount_namespace(
        'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && exec "$2" -m '
        'alignmix_jax.evaluation.classification --config=configs/demo.py --workdir="$1" '
        '--config.model.width=0.125 --config.train.eval_batch_size=250', workdir,
        sys.executable)
    assert result.returncode == 1
    assert one_error_line(result.stderr) == (
        f'error: the results folder {workdir}/eval cannot be written: Read-only file system '
        f'(EROFS): {workdir}/eval')
    assert 'top-1' not in result.stdout  # it stopped before computing the table


@needs_mounts
def test_a_disk_that_fills_during_a_save_stops_the_run_in_one_line(tmp_path):
    """A 2 MB file system holds one tiny checkpoint (1.5 MB), not two: the save of step 4
    fails in orbax's background threads, and the run stops before the next save (step 6), not
    at the end (step 8)."""
    mount_point = tmp_path / 'mnt'
    mount_point.mkdir()
    workdir = mount_point / 'run'
    listing = ('from alignmix_jax.runtime import checkpointing; import sys; '
               'print("steps", checkpointing.make_manager(sys.argv[1], read_only=True)'
               '.all_steps())')
    result = run_in_mount_namespace(
        'mnt=$1 python=$2 listing=$3; shift 3; mount -t tmpfs -o size=2m none "$mnt" && '
        '"$python" -m alignmix_jax.main "$@" 2>"$mnt/../err"; echo "exit $?"; '
        '"$python" -c "$listing" "$mnt/run" 2>/dev/null; cat "$mnt/../err" >&2',
        mount_point, sys.executable, listing, *tiny_run_args(workdir, num_epochs=2))
    assert 'exit 1\nsteps [2]\n' in result.stdout, result.stdout + result.stderr[-3000:]
    assert one_error_line(result.stderr) == (
        f'error: the checkpoint of step 4 could not be written to {workdir}/checkpoints (No '
        f'space left on device (ENOSPC)); the earlier checkpoints (2) are intact; resume from '
        f'the latest by running the same command once that is fixed')
    # The console's progress lines: step 4 reported, step 8 never reached.
    assert 'step 8/8' not in result.stderr and 'step 4/8' in result.stderr


def test_check_writable_creates_the_folder(tmp_path):
    output_dirs.check_writable(str(tmp_path / 'a' / 'b'), '--workdir')
    assert (tmp_path / 'a' / 'b').is_dir() and not list((tmp_path / 'a' / 'b').iterdir())
