"""Where the training loop's metrics go: the console, a plain per-step record, TensorBoard.

`open_writer(workdir, start_step)` gives process 0 a `MetricWriter` that sends every
`write_scalars(step, scalars)` to

- absl's log, one line a call: `[step] name=value, ...` (on the terminal with `-v`; the
  training command's console shows the progress, alignmix_jax/runtime/console.py);
- `WORKDIR/metrics.jsonl`, one JSON object a call: `{"step": ..., "wall_time": ..., name:
  value, ...}`, always (no package needed; readable with `pandas.read_json(path, lines=True)`
  or a loop over `json.loads`). A resumed run first drops the lines of steps after the
  checkpoint it resumes from (their steps are trained again), so every logged step has one
  line;
- TensorBoard, where the `tensorboard` package is importable: an event file
  `WORKDIR/events.out.tfevents.*` with the same scalars, in the form `tf.summary.scalar`
  writes (a float32 tensor for the 'scalars' plugin), and the config as the hparams plugin's
  summary (`write_hparams`). Without the package the run logs once that it writes none.

Why not `clu.metric_writers`: importing it imports TensorFlow (its SummaryWriter is
tf.summary's), which training on in-memory data does not otherwise need and a GPU machine may
not have. tensorboard's own `EventFileWriter` imports TensorFlow too where it is installed
(`tensorboard.compat.tf`), for its file object alone; the records are therefore framed here
with tensorboard's `RecordWriter` (length, masked CRC32C) and its protobuf messages, which
need no TensorFlow. The other processes of a multi-process run get a writer that writes
nothing.

`ProgressReport` is what clu's `ReportProgress` did: every `every_steps` it writes
`steps_per_sec` (over the steps since its last report) and logs the progress and ETA; it
returns the rate, for the console (alignmix_jax/runtime/console.py).
"""

import json
import os
import socket
import time
from collections.abc import Mapping

from absl import logging

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
    """Scalars to the console, `metrics.jsonl` and (where possible) a TensorBoard event file."""

    def __init__(self, workdir: str, start_step: int = 0):
        os.makedirs(workdir, exist_ok=True)
        self.metrics_path = os.path.join(workdir, METRICS_FILE)
        _drop_lines_after(self.metrics_path, start_step)
        self._metrics_file = open(self.metrics_path, 'a')  # noqa: SIM115 (closed in close())
        self._events = _EventFile.create(workdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        values = {name: float(value) for name, value in scalars.items()}
        # Sorted by name, as clu's logging writer printed them (log parsers rely on it).
        logging.info('[%d] %s', step, ', '.join(f'{name}={value:.6g}'
                                                 for name, value in sorted(values.items())))
        record = {'step': int(step), 'wall_time': time.time(), **values}
        self._metrics_file.write(json.dumps(record) + '\n')
        if self._events is not None:
            self._events.write_scalars(step, values)

    def write_hparams(self, hparams: Mapping[str, bool | int | float | str]):
        if self._events is not None:
            self._events.write_hparams(hparams)

    def flush(self):
        self._metrics_file.flush()
        if self._events is not None:
            self._events.flush()

    def close(self):
        self.flush()
        self._metrics_file.close()
        if self._events is not None:
            self._events.close()


class NullWriter:
    """The writer of the processes other than 0: they write nowhere."""

    def write_scalars(self, step, scalars):
        pass

    def write_hparams(self, hparams):
        pass

    def flush(self):
        pass

    def close(self):
        pass


def open_writer(workdir: str, start_step: int, process_index: int) -> MetricWriter | NullWriter:
    """Process 0's `MetricWriter` for `workdir` (resuming at `start_step`), else a
    `NullWriter`."""
    return MetricWriter(workdir, start_step) if process_index == 0 else NullWriter()


def read_metrics(workdir: str) -> list[dict]:
    """The records of `WORKDIR/metrics.jsonl`, in order (empty if there is none)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as metrics_file:
        return [json.loads(line) for line in metrics_file if line.strip()]


def _drop_lines_after(path: str, step: int):
    """Keeps the records of steps <= `step` (those a run resumed at `step` does not redo)."""
    if not os.path.exists(path):
        return
    with open(path) as metrics_file:
        lines = [line for line in metrics_file if line.strip()]
    kept = [line for line in lines if json.loads(line)['step'] <= step]
    if len(kept) < len(lines):
        with open(path, 'w') as metrics_file:
            metrics_file.writelines(kept)


class _EventFile:
    """One TensorBoard event file, written with tensorboard's protos and record framing."""

    _count = 0  # a process's event files get distinct names, as TensorFlow's do

    @classmethod
    def create(cls, logdir: str) -> '_EventFile | None':
        try:
            from tensorboard.compat.proto import event_pb2
            from tensorboard.summary.writer.record_writer import RecordWriter
        except ImportError:
            logging.info('No TensorBoard event file: the tensorboard package is not installed '
                         '(%s has the metrics).', os.path.join(logdir, METRICS_FILE))
            return None
        return cls(logdir, event_pb2, RecordWriter)

    def __init__(self, logdir: str, event_pb2, record_writer_class):
        _EventFile._count += 1
        name = (f'events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.'
                f'{os.getpid()}.{_EventFile._count}')
        self.path = os.path.join(logdir, name)
        self._event_pb2 = event_pb2
        self._records = record_writer_class(open(self.path, 'wb'))  # noqa: SIM115
        self._write(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))
        self.flush()

    def _write(self, event):
        self._records.write(event.SerializeToString())

    def write_scalars(self, step: int, scalars: Mapping[str, float]):
        from tensorboard.compat.proto import (
            summary_pb2,
            tensor_pb2,
            tensor_shape_pb2,
            types_pb2,
        )
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name='scalars'))
        values = [summary_pb2.Summary.Value(
            tag=tag, metadata=metadata,
            tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, float_val=[value],
                                          tensor_shape=tensor_shape_pb2.TensorShapeProto()))
            for tag, value in scalars.items()]
        self._write(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                          summary=summary_pb2.Summary(value=values)))

    def write_hparams(self, hparams: Mapping[str, bool | int | float | str]):
        from tensorboard.plugins.hparams import summary_v2
        self._write(self._event_pb2.Event(wall_time=time.time(), step=0,
                                          summary=summary_v2.hparams_pb(dict(hparams))))

    def flush(self):
        self._records.flush()

    def close(self):
        self._records.close()


class ProgressReport:
    """Every `every_steps` steps: `steps_per_sec` to the writer, progress and ETA to the log.

    The rate is over the steps since the previous report (the first report's, since the first
    call, so the first step's compilation is left out).
    """

    def __init__(self, writer, *, total_steps: int, every_steps: int):
        self.writer, self.total_steps, self.every_steps = writer, total_steps, every_steps
        self._last = None  # (step, time) of the last report, or of the first call

    def __call__(self, step: int) -> float | None:
        """The steps/s it reported at `step`, or None when it reported nothing."""
        now = time.monotonic()
        if self._last is None:
            self._last = (step, now)
            return None
        if step % self.every_steps and step != self.total_steps:
            return None
        last_step, last_time = self._last
        if step <= last_step or now <= last_time:
            return None
        steps_per_sec = (step - last_step) / (now - last_time)
        self._last = (step, now)
        self.writer.write_scalars(step, {'steps_per_sec': steps_per_sec})
        eta_minutes = (self.total_steps - step) / steps_per_sec / 60
        logging.info('Step %d of %d (%.1f%%), %.2f steps/s, ETA %.1f min.', step,
                     self.total_steps, 100 * step / self.total_steps, steps_per_sec,
                     eta_minutes)
        return steps_per_sec
