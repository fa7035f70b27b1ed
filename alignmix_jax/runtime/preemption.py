"""Stopping a run cleanly on SIGTERM or SIGINT: finish the step, save it, exit with EXIT_CODE.

SLURM and Kubernetes send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT. The
training loop asks `StopOnSignal.requested(step, manager)` after every step; once it is True
the loop saves that step, waits for the save and raises `Preempted`, which the command prints
as one line and turns into exit status EXIT_CODE (launch/slurm.sh requeues the job on it).

    with preemption.StopOnSignal() as stop:
        for step in ...:
            ...                                  # the step
            if stop.requested(step, manager):    # the same step on every process
                save(step); raise stop.preempted(step, total_steps, directory)

One process: a Python handler sets a flag the loop reads after the step in progress.

Several processes must save the same step. JAX's preemption service (started by
`jax.distributed.initialize` unless `jax_enable_preemption_service` is off) installs its own
SIGTERM handler; on a notice to any process, the processes agree through the coordination
service on a step (the largest step any of them reached, plus one), and orbax's
`CheckpointManager.reached_preemption(step)`, asked at every step, is True at that step on every
process. SIGINT is passed on to it as a SIGTERM. With the service off, a multi-process run
leaves both signals to their defaults (a warning says so): processes deciding on their own
would save different steps.

A second signal once the run is stopping (one process: any time after the first; several:
from the agreed step on) exits at once with status 128 + the signal's number. Orbax writes
each checkpoint into a temporary directory that it renames when complete, so the checkpoints
already complete are intact; the partial one is removed at the next start.
"""

import os
import signal
import threading

import jax
from absl import logging

# EX_TEMPFAIL of sysexits.h ("temporary failure; the user is invited to retry"): the run stopped
# on a signal after saving, and the same command resumes it.
EXIT_CODE = 75
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """The run stopped on a signal after saving its step; the message says how to resume."""

    exit_code = EXIT_CODE


def _jax_preemption_service_running() -> bool:
    """Whether JAX's preemption service holds SIGTERM in this (multi-process) run. The one place
    that reads JAX's settings for it: `jax.distributed.initialize` starts the service (and its
    SIGTERM handler) when the `jax_enable_preemption_service` option is on, its default."""
    return jax.process_count() > 1 and bool(
        getattr(jax.config, 'jax_enable_preemption_service', False))


class StopOnSignal:
    """SIGTERM and SIGINT ask the loop to stop after the step in progress; see the module
    docstring. Handlers are installed for the `with` block (in the main thread only: Python
    runs signal handlers there) and the previous ones restored after it."""

    def __init__(self):
        self.signal_name = None  # set by the first signal (one process)
        self._stopping = False
        self._previous = {}
        self._multi_process = jax.process_count() > 1

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self
        if not self._multi_process:
            self._install({signum: self._on_signal for signum in _SIGNALS})
        elif _jax_preemption_service_running():
            # SIGTERM stays with JAX's handler; Ctrl-C reaches it as a SIGTERM.
            self._install({signal.SIGINT: lambda signum, frame: os.kill(os.getpid(),
                                                                        signal.SIGTERM)})
        else:
            logging.warning('JAX\'s preemption service is off (jax_enable_preemption_service):'
                            ' SIGTERM and SIGINT stop this multi-process run without saving.')
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        return False

    def _install(self, handlers: dict) -> None:
        for signum, handler in handlers.items():
            previous = signal.signal(signum, handler)
            self._previous.setdefault(signum, previous)

    def _on_signal(self, signum, frame):
        if self._stopping or self.signal_name is not None:
            _exit_at_once(signum)
        self.signal_name = signal.Signals(signum).name

    def requested(self, step: int, manager) -> bool:
        """Whether to stop after `step` (asked after every step, on every process). From here
        on, a second signal exits at once."""
        if self._multi_process:
            stop = bool(manager.reached_preemption(step))
        else:
            stop = self.signal_name is not None
        if stop and not self._stopping:
            self._stopping = True
            if threading.current_thread() is threading.main_thread():
                # JAX's handler has done its part; a second signal now exits at once.
                self._install({signum: lambda signum, frame: _exit_at_once(signum)
                               for signum in _SIGNALS})
        return stop

    def preempted(self, step: int, total_steps: int, directory) -> Preempted:
        """The one-line message of a stop after saving `step` in `directory`."""
        cause = (self.signal_name if self.signal_name is not None
                 else 'a preemption notice (SIGTERM or SIGINT to one of the processes)')
        return Preempted(f'stopped by {cause} at step {step} of {total_steps}: saved the '
                         f'checkpoint of step {step} in {directory}; run the same command '
                         f'again to resume from it (exit status {EXIT_CODE})')


def _exit_at_once(signum: int) -> None:
    """A second signal: one line, then exit without Python's cleanup (which would wait for the
    save in flight)."""
    name = signal.Signals(signum).name
    os.write(2, f'error: stopped by a second {name} before the save of the stopping step '
                f'completed; the checkpoints completed before it are intact\n'.encode())
    os._exit(128 + signum)
