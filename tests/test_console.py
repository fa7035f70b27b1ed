"""The training command's console: the header, a bar on a terminal and plain lines elsewhere,
the evaluations and the result; the config in the workdir, printed only when asked for; absl's
log on the terminal only with -v, in --log_dir's file otherwise."""

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import time

from alignmix_jax.runtime import console as console_module
from alignmix_jax.runtime.command_line import keep_on_quiet_terminal
from alignmix_jax.runtime.console import Console, duration, header_line
from tests.conftest import ABSL_PREFIX, REPO_ROOT
from tests.test_tensorflow_free import TINY_DEMO

HEADER_PARTS = dict(model='preact_resnet18 (width 0.25)',
                    data='demo (5,000 training images, 10 classes)', num_devices=1,
                    platform='cpu', processes=1, total_steps=585, steps_per_epoch=39,
                    config_path='runs/demo/config.json')


def test_the_header_names_the_model_data_devices_steps_and_config_file():
    assert header_line(start_step=0, **HEADER_PARTS) == (
        'preact_resnet18 (width 0.25) on demo (5,000 training images, 10 classes); 1 cpu '
        'device; 585 steps (15 epochs of 39); config: runs/demo/config.json')
    resumed = header_line(start_step=79, **{**HEADER_PARTS, 'num_devices': 8,
                                            'platform': 'gpu', 'processes': 2})
    assert '; 8 gpu devices in 2 processes; 585 steps (15 epochs of 39) from step 79; ' \
        in resumed
    assert '; all 585 steps trained: evaluating the last checkpoint; ' in \
        header_line(start_step=585, **HEADER_PARTS)


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (0.4, 45, 381.6, 7500)] == \
        ['0 s', '45 s', '6 min 22 s', '2 h 05 min']
    assert [duration(s, whole_minutes=True) for s in (20, 381.6, 3569, 3571, 7500)] == \
        ['0 min', '6 min', '59 min', '1 h 00 min', '2 h 05 min']


def run_console(console: Console, total_steps: int = 20) -> None:
    """A run of `total_steps` steps as the loop drives its console: a report every 5 steps,
    an evaluation at step 10."""
    console.header(start_step=0, **{**HEADER_PARTS, 'total_steps': total_steps,
                                    'steps_per_epoch': 10})
    with console.progress(0, total_steps):
        for step in range(1, total_steps + 1):
            time.sleep(0.01)
            console.step(step)
            if step % 5 == 0:
                console.report(step, 2.0, 2.5 - step / 100)
            if step == 10:
                console.evaluation(1, 10, 0.5, 1.25, 0.5, 1)
    console.result({'final_test_accuracy': 0.568, 'final_test_loss': 1.19474,
                    'best_test_accuracy': 0.571, 'best_epoch': 10, 'steps': total_steps,
                    'train_seconds': 235.2}, 'runs/demo/results.json')


def test_not_a_terminal_gets_plain_lines_with_rate_eta_and_loss():
    stream = io.StringIO()
    console = Console(stream)
    assert not console.interactive
    run_console(console)
    lines = stream.getvalue().splitlines()
    assert '\r' not in stream.getvalue()
    assert lines[1:] == [
        'step 5/20 (25%): 2.00 steps/s, ETA 8 s, loss 2.4500',
        'step 10/20 (50%): 2.00 steps/s, ETA 5 s, loss 2.4000',
        'epoch 1 (step 10): test accuracy 50.00%, test loss 1.2500 (best 50.00% at epoch 1)',
        'step 15/20 (75%): 2.00 steps/s, ETA 2 s, loss 2.3500',
        'step 20/20 (100%): 2.00 steps/s, ETA 0 s, loss 2.3000',
        'final test accuracy 56.80%, test loss 1.1947 (best during training 57.10% at epoch '
        '10); 20 steps, 3 min 55 s of training; runs/demo/results.json']
    assert lines[0].startswith('preact_resnet18 (width 0.25) on demo') and \
        lines[0].endswith('; 20 steps (2 epochs of 10); config: runs/demo/config.json')


def read_terminal(run) -> str:
    """What `run(stream)` writes to a pseudo-terminal of unknown width (as under `script`)."""
    controller, terminal = pty.openpty()
    with os.fdopen(terminal, 'w', buffering=1) as stream:
        run(stream)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal side is closed and everything read
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    return b''.join(chunks).decode().replace('\r\n', '\n')


def test_a_terminal_gets_a_bar_with_rate_eta_and_loss_and_lines_above_it():
    output = read_terminal(lambda stream: run_console(Console(stream)))
    # The bar is redrawn in place: its states are separated by carriage returns.
    states = [state for line in output.split('\n') for state in line.split('\r')]
    bars = [state for state in states if state.startswith('train:')]
    assert re.fullmatch(r'train: 100%\|█+\| 20/20 \[00:0\d<00:00, +[\d.]+ steps/s, '
                        r'loss 2\.3000\]', bars[-1].rstrip()), bars[-1]
    # Redrawn under the evaluation's line, with the loss of the report before it.
    after_evaluation = output.split('(best 50.00% at epoch 1)\n')[1].split('\r')[1]
    assert after_evaluation.startswith('train:  50%|') and ' 10/20 [' in after_evaluation \
        and after_evaluation.endswith(' steps/s, loss 2.4000]'), after_evaluation
    # The evaluation and the result are whole lines; no plain progress lines.
    lines = [line.split('\r')[-1] for line in output.split('\n')]
    assert 'epoch 1 (step 10): test accuracy 50.00%, test loss 1.2500 (best 50.00% at epoch 1)' \
        in lines
    assert lines[-2].startswith('final test accuracy 56.80%') and lines[-1] == ''
    assert 'step 5/20' not in output
    # The last state of the bar stays, on a line of its own, above the result.
    assert output.split('\n')[-3].split('\r')[-1].startswith('train: 100%')


def test_a_log_line_clears_the_bar_first():
    record = logging.LogRecord('absl', logging.WARNING, __file__, 1, 'a warning', None, None)

    def run(stream):
        console = Console(stream)
        with console.progress(0, 4):
            console.step(1)
            assert console.make_room(record) is True
            stream.write('a warning\n')
            console.step(2)

    output = read_terminal(run)
    # The bar's line is blanked and the cursor back at its start before the log line.
    assert re.search(r'train: +\d+%[^\n]*\r +\ra warning\n', output), repr(output)


def test_other_processes_and_callers_without_a_stream_show_nothing(capsys):
    run_console(console_module.stderr_console(process_index=1))
    run_console(console_module.stderr_console(process_index=0, quiet=True))
    assert capsys.readouterr() == ('', '')


def test_the_quiet_terminal_keeps_warnings_and_hides_info_and_matplotlibs_start_up():
    def record(name, level):
        return logging.LogRecord(name, level, __file__, 1, 'message', None, None)

    ours_info, ours_warning = record('absl', logging.INFO), record('absl', logging.WARNING)
    font_cache = record('matplotlib.font_manager', logging.WARNING)
    matplotlib_error = record('matplotlib', logging.ERROR)

    def kept(on_terminal, to_file):
        return [keep_on_quiet_terminal(r, on_terminal=on_terminal, to_file=to_file)
                for r in (ours_info, ours_warning, font_cache, matplotlib_error)]

    assert kept(on_terminal=False, to_file=False) == [False, True, False, True]
    assert kept(on_terminal=False, to_file=True) == [True, True, False, True]  # the log file
    assert kept(on_terminal=True, to_file=False) == [True, True, True, True]  # -v


def train(*arguments):
    return subprocess.run([sys.executable, '-m', 'alignmix_jax.main', *TINY_DEMO, *arguments],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def test_the_command_shows_a_header_progress_and_result_and_prints_the_config_when_asked(
        tmp_path):
    workdir = tmp_path / 'run'
    first = train(f'--workdir={workdir}')
    assert first.returncode == 0, first.stderr[-3000:]
    lines = first.stderr.splitlines()
    assert lines[0] == (f'preact_resnet18 (width 0.125) on demo (64 training images, 10 '
                        f'classes); 1 cpu device; 8 steps (2 epochs of 4); config: '
                        f'{workdir}/config.json')
    assert [line.split(':')[0] for line in lines[1:-1]] == [
        'step 2/8 (25%)', 'step 4/8 (50%)', 'epoch 1 (step 4)', 'step 6/8 (75%)',
        'step 8/8 (100%)', 'epoch 2 (step 8)']
    result = json.loads(first.stdout.strip().splitlines()[-1])
    assert lines[-1].startswith(f'final test accuracy {100 * result["final_test_accuracy"]:.2f}%'
                                f', test loss {result["final_test_loss"]:.4f}')
    assert lines[-1].endswith(f'; {workdir}/results.json')
    # Not printed: the config (in the workdir), absl's lines.
    config_text = (workdir / 'config.json').read_text()
    assert json.loads(config_text)['model']['width'] == 0.125
    assert '"width"' not in first.stderr and 'Config' not in first.stderr
    assert not ABSL_PREFIX.search(first.stderr)

    # --print_config prints it, as the workdir holds it; --log_dir takes absl's log.
    logs = tmp_path / 'logs'
    logs.mkdir()
    printed = train(f'--workdir={workdir}', '--print_config', f'--log_dir={logs}')
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert config_text.strip() in printed.stderr
    assert f'Resumed from {workdir}/checkpoints at step 8.' in printed.stderr.splitlines()
    assert 'all 8 steps trained: evaluating the last checkpoint' in printed.stderr
    assert not ABSL_PREFIX.search(printed.stderr)
    [log_file] = [path for path in logs.iterdir() if not path.is_symlink()]
    log = log_file.read_text()
    assert ABSL_PREFIX.search(log) and 'Config:\n' + config_text.strip() in log
    assert f'Resumed from {workdir}/checkpoints at step 8.' in log

    # -v: absl's lines on the terminal, the config among them, and no console lines.
    verbose = train(f'--workdir={workdir}', '-v', '0')
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert 'Config:\n' + config_text.strip() in verbose.stderr
    assert re.search(r'^I\d{4} .*\] Resumed from .* at step 8\.$', verbose.stderr,
                     re.MULTILINE)
    assert 'final test accuracy' not in verbose.stderr and 'config: ' not in verbose.stderr
