"""Starts N training processes on this machine, joined like the hosts of a cluster.

    python launch/local.py --num_processes=2 -- --config=configs/demo.py --workdir=runs/demo2

Every process runs `python -m alignmix_jax.main` with the arguments after `--`, plus
--coordinator_address=localhost:PORT --num_processes=N --process_id=I. On a CPU-only machine
each process owns one CPU device and the processes reduce over gloo, JAX's CPU collectives:
the multi-host code path, testable without a cluster. Each line of output is prefixed with its
process index. If a process fails, the others are stopped and its exit code is returned.

Stopping: Ctrl-C reaches every process from the terminal (this launcher ignores it); a SIGTERM
to the launcher is passed on to each process. The processes then agree on a step, save it and
exit with status 75 (alignmix_jax/runtime/preemption.py), which is not a failure: the others are
left to finish their save, and 75 is returned.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(('localhost', 0))
        return probe.getsockname()[1]


def relay(process_index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f'[{process_index}] {line}')
        sys.stdout.flush()


# alignmix_jax.runtime.preemption.EXIT_CODE: a process stopped on a signal after saving (this script
# imports nothing from the package).
PREEMPTED = 75


def launch(num_processes: int, main_args: list[str]) -> int:
    coordinator = f'localhost:{free_port()}'
    repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    processes, relays = [], []
    for process_id in range(num_processes):
        command = [sys.executable, '-m', 'alignmix_jax.main', *main_args,
                   f'--coordinator_address={coordinator}', f'--num_processes={num_processes}',
                   f'--process_id={process_id}']
        process = subprocess.Popen(command, cwd=repository, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True)
        relays.append(threading.Thread(target=relay, args=(process_id, process.stdout)))
        relays[-1].start()
        processes.append(process)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the processes have it from the terminal
    signal.signal(signal.SIGTERM, lambda signum, frame: [
        process.send_signal(signal.SIGTERM) for process in processes if process.poll() is None])
    exit_code = 0
    while any(process.poll() is None for process in processes):
        failed = [process for process in processes
                  if process.poll() not in (None, 0, PREEMPTED)]
        if failed:
            exit_code = failed[0].returncode
            for process in processes:
                if process.poll() is None:
                    process.terminate()
        time.sleep(0.5)
    for thread in relays:
        thread.join()
    return exit_code or next((p.returncode for p in processes if p.returncode), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--num_processes', type=int, default=2)
    parser.add_argument('main_args', nargs=argparse.REMAINDER,
                        help='arguments for alignmix_jax.main, after --')
    args = parser.parse_args()
    main_args = args.main_args[1:] if args.main_args[:1] == ['--'] else args.main_args
    return launch(args.num_processes, main_args)


if __name__ == '__main__':
    sys.exit(main())
