"""What the training command shows its user: a header, the progress, the evaluations, the result.

    console = Console(sys.stderr)                 (None: a console that shows nothing)
    console.header(model=..., data=..., ...)      one line: what trains where, for how long
    with console.progress(start_step, total):     the loop:
        console.step(step)                        every step
        console.report(step, steps_per_sec, loss) every log_every_steps
        console.evaluation(epoch, ...)            one line an evaluation
    console.result(result, results_path)          the last line

On a terminal the progress is a bar (steps/s, ETA, the latest loss) redrawn in place, drawn by
tqdm (installed with tensorflow-datasets already, and declared for this); anywhere else (a
pipe, a log file, SLURM's output) it is one plain line per report, since a bar redrawn with
carriage returns is unreadable there.
The full record stays where it was: absl's log (every metric, timestamps, thread ids) goes to
`--log_dir` or, with `-v`, to the terminal (alignmix_jax/runtime/command_line.py), and the
metrics to WORKDIR/metrics.jsonl and TensorBoard (alignmix_jax/runtime/metric_log.py).
"""

import contextlib
import logging as python_logging
import os
import sys


def duration(seconds: float, *, whole_minutes: bool = False) -> str:
    """'45 s', '6 min 21 s', '2 h 05 min': a time to read at a glance; with `whole_minutes`,
    rounded to the minute ('6 min'), for times estimated or averaged over runs."""
    if whole_minutes:
        seconds = 60 * round(seconds / 60)
        if seconds < 3600:
            return f'{seconds // 60} min'
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f'{seconds} s'
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f'{minutes} min {seconds:02d} s'
    hours, minutes = divmod(minutes, 60)
    return f'{hours} h {minutes:02d} min'


def header_line(*, model: str, data: str, num_devices: int, platform: str, processes: int,
                start_step: int, total_steps: int, steps_per_epoch: int,
                config_path: str) -> str:
    """The first line of a run: the model, the data, the devices, the steps, and the file that
    holds the whole resolved config (printed only with --print_config or -v)."""
    devices = f'{num_devices} {platform} device{"s" * (num_devices != 1)}' + (
        f' in {processes} processes' if processes > 1 else '')
    if start_step >= total_steps:
        steps = f'all {total_steps} steps trained: evaluating the last checkpoint'
    else:
        steps = (f'{total_steps} steps ({total_steps // steps_per_epoch} epochs of '
                 f'{steps_per_epoch})' + (f' from step {start_step}' if start_step else ''))
    return f'{model} on {data}; {devices}; {steps}; config: {config_path}'


class Console:
    """The lines of one run on `stream` (process 0's stderr), with a bar if it is a terminal;
    `stream=None` shows nothing (the other processes of a multi-process run, and callers of
    the training function)."""

    def __init__(self, stream=None):
        self.stream = stream
        self.interactive = stream is not None and _is_terminal(stream)
        self._bar = None
        self._total_steps = None

    def line(self, text: str) -> None:
        """One line, above the bar while there is one."""
        if self.stream is None:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def header(self, **parts) -> None:
        """`header_line(**parts)`."""
        self.line(header_line(**parts))

    @contextlib.contextmanager
    def progress(self, start_step: int, total_steps: int):
        """The steps from `start_step` to `total_steps`; on a terminal, a bar that ends (left
        on its own line) when the block does, also on an error, so that an `error:` line or
        the stop on a signal starts a line of its own."""
        self._total_steps = total_steps
        if self.interactive and start_step < total_steps:
            from tqdm import tqdm
            # A terminal of unknown width (0 columns, as under `script`) gets 100.
            width = {} if _columns(self.stream) else {'ncols': 100}
            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream,
                             unit=' steps', desc='train', dynamic_ncols=not width, leave=True,
                             **width)
        try:
            yield self
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def step(self, step: int) -> None:
        """Step `step` has been run: the bar moves on (its rate and ETA are tqdm's)."""
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def report(self, step: int, steps_per_sec: float, loss: float | None) -> None:
        """Every `log_every_steps`: the latest loss on the bar, or a plain line with the rate
        over the steps since the last report and the ETA at that rate."""
        if self.stream is None:
            return
        loss_text = '' if loss is None else f'loss {loss:.4f}'
        if self._bar is not None:
            self._bar.set_postfix_str(loss_text, refresh=False)
            return
        total = self._total_steps
        eta = duration((total - step) / steps_per_sec) if steps_per_sec > 0 else '?'
        self.line(f'step {step}/{total} ({100 * step / total:.0f}%): '
                  f'{steps_per_sec:.2f} steps/s, ETA {eta}' +
                  (f', {loss_text}' if loss_text else ''))

    def evaluation(self, epoch: int, step: int, accuracy: float, loss: float,
                   best_accuracy: float, best_epoch: int) -> None:
        self.line(f'epoch {epoch} (step {step}): test accuracy {100 * accuracy:.2f}%, '
                  f'test loss {loss:.4f} (best {100 * best_accuracy:.2f}% at epoch '
                  f'{best_epoch})')

    def result(self, result: dict, results_path: str) -> None:
        """The run's last line: the final test accuracy and loss, the best one named as such,
        the training time and where the results are."""
        best = result['best_test_accuracy']
        best_text = ('' if best is None else
                     f' (best during training {100 * best:.2f}% at epoch {result["best_epoch"]})')
        self.line(f'final test accuracy {100 * result["final_test_accuracy"]:.2f}%, test loss '
                  f'{result["final_test_loss"]:.4f}{best_text}; {result["steps"]} steps, '
                  f'{duration(result["train_seconds"])} of training; {results_path}')

    def make_room(self, record: python_logging.LogRecord) -> bool:
        """A logging filter that clears the bar before a log line is written to the terminal
        (the bar comes back at the next step); lets every record through."""
        if self._bar is not None:
            self._bar.clear()
        return True


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _columns(stream) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):  # not a file descriptor's terminal
        return 0


def stderr_console(process_index: int, quiet: bool = False) -> Console:
    """Process 0's console on stderr; a silent one for the other processes, or when `quiet`
    (absl's own lines are on the terminal, `-v`, and say it all)."""
    return Console(None if process_index != 0 or quiet else sys.stderr)
