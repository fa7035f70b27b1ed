"""One training run per workdir: a lock the kernel releases when its process ends.

    with workdir_lock.hold(workdir):     WorkdirLockedError (one line naming the holder) if
        ...                              another run holds it

The lock is a POSIX record lock (`fcntl.lockf`) on `WORKDIR/train.lock`. The kernel drops it
when the holding process exits in any way, `kill -9` included, so a lock is never stale: no
PID is compared, which would mislead on another host of a shared filesystem or after the PID
is reused. NFS (through its lock manager, or NFSv4's own locks), Lustre mounted with `flock`,
GPFS and CephFS honour these locks across hosts; a host that crashes loses its locks when its
lease expires (about 90 s on NFSv4). The host, PID and start time written into the file are
only for the message a second run prints.

Multi-process runs (`jax.process_count() > 1`, every process given the same workdir): each
process locks its own file, `train.lock` for process 0 and `train.lock.process<i>` for
process i. A second job on the same workdir then meets a held lock in every process that
the first job also has, and each of those stops at once; had only process 0 locked, the
other processes of the second job would start and wait for process 0 in their first
collective until the coordinator gave up. Process 0's file has the name a single-process run
uses, so a single-process run and a multi-process job exclude each other too.

The file is never deleted: removing it while another process waits to lock it would let two
runs lock two different files of the same name.
"""

import contextlib
import datetime
import errno
import fcntl
import os
import socket
from collections.abc import Iterator

from absl import logging

# Locks of this process, by path: POSIX locks belong to the process, so a second lock of the
# same file from this process would succeed instead of failing, and closing any descriptor of
# the file would release it.
_HELD: set[str] = set()


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir; the message names it and says what to do."""


def lock_path(workdir: str, process_index: int = 0) -> str:
    name = 'train.lock' if process_index == 0 else f'train.lock.process{process_index}'
    return os.path.join(os.path.abspath(workdir), name)


def _holder(descriptor: int) -> str:
    """What the holder wrote into the lock file, read through our own descriptor (closing
    another one would drop a POSIX lock this process held on the file)."""
    try:
        text = os.pread(descriptor, 4096, 0).decode('utf-8', 'replace').strip()
    except OSError:
        text = ''
    return ' '.join(text.split()) or 'a process that has not written its name yet'


@contextlib.contextmanager
def hold(workdir: str, process_index: int = 0) -> Iterator[str]:
    """Holds the workdir's lock for the `with` block; yields the lock file's path.

    `process_index`: this process's index in a multi-process run (`jax.process_index()`).
    Raises WorkdirLockedError at once, without waiting, when another process holds the lock.
    """
    os.makedirs(workdir, exist_ok=True)
    path = lock_path(workdir, process_index)
    if path in _HELD:
        raise WorkdirLockedError(f'this process already runs in {workdir} ({path}): one run '
                                 f'per workdir')
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EAGAIN):
                # A filesystem without locks (e.g. Lustre mounted without `flock`): refusing
                # every run would leave no way to train there.
                logging.warning('Cannot lock %s (%s): nothing stops a second run on this '
                                'workdir.', path, os.strerror(error.errno))
                yield path
                return
            raise WorkdirLockedError(
                f'another run holds {workdir}: {_holder(descriptor)} (lock {path}); wait for '
                f'it to finish or stop it, or use another --workdir') from error
        started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f'host {socket.gethostname()} pid {os.getpid()} started '
                              f'{started}\n'.encode(), 0)
        _HELD.add(path)
        try:
            yield path
        finally:
            _HELD.discard(path)
            fcntl.lockf(descriptor, fcntl.LOCK_UN)
    finally:
        os.close(descriptor)

