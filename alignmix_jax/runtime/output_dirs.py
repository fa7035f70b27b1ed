"""Checks that a command can write where it will write, before it loads or computes anything.

    output_dirs.check_writable(workdir, '--workdir')     creates it if missing

A workdir that is a file, an empty name (an unset shell variable), a name longer than the file
system allows, a read-only or full file system or a missing permission would otherwise show as
a traceback after seconds of imports, or after the whole evaluation. Each raises
`OutputDirError`, one line with the path and the reason, which the commands print as
`error: ...` (alignmix_jax/runtime/command_line.py; any other OSError reaching a command's top level
is one line too, `describe_os_error`).
"""

import errno
import os
import tempfile


class OutputDirError(ValueError):
    """A folder a command must write to cannot be written; the message says which and why."""


def describe_os_error(error: OSError) -> str:
    """'<reason> (<ERRNO>): <path>' of an OSError, e.g. 'Read-only file system (EROFS): /w'."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.errno in errno.errorcode:
        reason += f' ({errno.errorcode[error.errno]})'
    paths = [path for path in (error.filename, error.filename2) if path is not None]
    return f'{reason}: {" -> ".join(map(str, paths))}' if paths else reason


def check_writable(directory: str, what: str) -> None:
    """Creates `directory` if needed and writes (and removes) a file in it; OutputDirError
    naming `what` (e.g. '--workdir') and the path otherwise."""
    if not directory:
        raise OutputDirError(f'{what} is empty (an unset variable?): give the folder to write '
                             f'to')
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise OutputDirError(f'{what} {directory} is a file, not a folder: give a folder (it '
                             f'is created if missing)')
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory, prefix='.write_check'):
            pass
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            longest = max(os.path.abspath(directory).split(os.sep), key=len)
            raise OutputDirError(
                f'{what} {directory}: a name in it is too long for the file system '
                f'({len(longest.encode())} bytes, {longest[:40]}...); give a shorter '
                f'one') from None
        raise OutputDirError(f'{what} {directory} cannot be written: '
                             f'{describe_os_error(error)}') from None
