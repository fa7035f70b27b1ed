"""The claims table on the CPU protocol: `python -m alignmix_jax.experiments.reproduce
--protocol=cpu`.

`run_claims` trains each (method, seed) of configs/cpu_protocol.py through
`reproduction_runs.run_all` (a finished run is skipped, a killed one resumes from its
checkpoint) and evaluates each run's final checkpoint with the evaluation commands' own code
(`evaluation.command.evaluate_workdir`, the kinds of EVAL_KINDS: FGSM and PGD accuracy, ECE
and OE, and maximum-softmax OOD detection of uniform and Gaussian noise, the paper's Table 6
noise sets), skipping a kind whose `eval/<kind>.json` already holds the final step;
each evaluation's wall time goes to the run's `eval/wall_seconds.json`. Before the first run
and after each run it trains or evaluates, it reports which runs remain and an estimate of the
time they need, from the finished runs' wall times (none before a run has finished: no figure
is assumed). After each run it writes WORKDIR/results.json (every finished run's figures, the
summary) and WORKDIR/results.md: one row a method, the test accuracy at each evaluation
(mean over seeds, from the run's metrics.jsonl, i.e. the curve), then the final test
accuracy, FGSM and PGD accuracy, ECE and OE as mean ± sample standard deviation over seeds, and
the wall time per run (training and evaluation). Only runs both trained and evaluated enter
the table.

A resumed run's wall time includes its training before the resume, which its checkpoint
records (`train.train_and_evaluate`'s train_seconds_before_resume); the work lost to a kill
after the last checkpoint is not counted.
"""

import glob
import json
import os
import time
from collections.abc import Callable, Sequence

from absl import logging

from alignmix_jax.experiments import claim_readings, reproduction_runs
from alignmix_jax.runtime import console

# The evaluations of each run's final checkpoint (alignmix_jax/evaluation), with their options
# of the run's config (configs/cpu_protocol.py: robustness on 1,000 test images, OOD_SETS).
EVAL_KINDS = ('robustness', 'calibration', 'ood')
# The OOD sets of the OOD table: the paper's noise sets (Table 6), as many as the test images.
OOD_SETS = ('uniform', 'gaussian')
# Each table's figures of a run, each a fraction, in the table's order, with its column.
MAIN_COLUMNS = {'final_test_accuracy': 'final test accuracy, %',
                'fgsm_accuracy': 'FGSM accuracy, %', 'pgd_accuracy': 'PGD accuracy, %',
                'ece': 'ECE, %', 'oe': 'OE, %'}
# The OOD table's figures of each set: name -> (evaluation/ood.py's figure, column).
OOD_FIGURES = {'detection': ('detection_accuracy', 'detection accuracy (t = 0.5)'),
               'auroc': ('auroc', 'AUROC')}


def ood_figure(ood_set: str, figure: str) -> str:
    """A run's name for an OOD figure of one set: 'ood_uniform_auroc'."""
    return f'ood_{ood_set}_{figure}'


OOD_COLUMNS = {ood_figure(name, figure): f'{name.capitalize()} noise: {column}, %'
               for name in OOD_SETS for figure, (_, column) in OOD_FIGURES.items()}
FIGURES = (*MAIN_COLUMNS, *OOD_COLUMNS)
# Where each evaluation's wall time is kept, in the run's eval/ directory.
TIMING_FILE = 'wall_seconds.json'


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as json_file:
        return json.load(json_file)


def _training_result(directory: str) -> dict | None:
    """The run's results.json (written when its training has finished), or None."""
    return _read_json(os.path.join(directory, 'results.json'))


def _evaluation(directory: str, kind: str, step: int) -> dict | None:
    """The record of `kind` at checkpoint `step` in the run's eval/ (None: not evaluated)."""
    record = _read_json(os.path.join(directory, 'eval', f'{kind}.json'))
    return record if record is not None and record['step'] == step else None


def run_status(directory: str) -> str:
    """'train' (no finished training), 'evaluate' (trained, an evaluation of its final
    checkpoint missing) or 'done'."""
    result = _training_result(directory)
    if result is None:
        return 'train'
    return 'done' if _evaluated(directory, result) else 'evaluate'


def _evaluated(directory: str, result: dict) -> bool:
    """Whether every kind of EVAL_KINDS has evaluated the final checkpoint of the trained run
    whose results.json is `result`."""
    return all(_evaluation(directory, kind, result['steps']) is not None for kind in EVAL_KINDS)


def evaluate_run(config, directory: str, step: int, dataset=None) -> None:
    """Evaluates the final checkpoint `step` of the finished run in `directory` with each kind
    not evaluated at that step yet and records each one's wall time in eval/wall_seconds.json.
    `evaluation.command.evaluate_workdir` reads the latest checkpoint (the final one: a
    finished run keeps it last) and writes eval/<kind>.json, whose step is checked."""
    from alignmix_jax.evaluation import command

    timing_path = os.path.join(directory, 'eval', TIMING_FILE)
    for kind in EVAL_KINDS:
        if _evaluation(directory, kind, step) is not None:
            continue
        start = time.time()
        record, table = command.evaluate_workdir(kind, config, directory, dataset=dataset)
        if record['step'] != step:
            raise ValueError(f'{directory}: the latest checkpoint is step {record["step"]}, '
                             f'not the final step {step} of its results.json')
        seconds = time.time() - start
        timing = _read_json(timing_path) or {}  # evaluate_workdir made eval/
        timing[kind] = seconds
        with open(timing_path, 'w') as timing_file:
            json.dump(timing, timing_file, indent=2)
        logging.info('%s (%.0f s)', table, seconds)


def run_figures(directory: str, method: str, seed: int, num_epochs: int) -> dict:
    """The tables' figures of a run that is trained and evaluated (every kind of EVAL_KINDS)."""
    result = _training_result(directory)
    steps = result['steps']
    robustness = _evaluation(directory, 'robustness', steps)['results']
    calibration = _evaluation(directory, 'calibration', steps)['results']
    ood = _evaluation(directory, 'ood', steps)['results']
    timing = _read_json(os.path.join(directory, 'eval', TIMING_FILE)) or {}
    accuracy = reproduction_runs.logged_scalars(directory, ['test/accuracy'])['test/accuracy']
    eval_seconds = sum(timing.values())
    return {
        'method': method, 'seed': seed,
        'final_test_accuracy': result['final_test_accuracy'],
        'final_test_loss': result['final_test_loss'],
        # {epoch: test accuracy} at each evaluation during training.
        'curve': {str(step * num_epochs // steps): value
                  for step, value in sorted(accuracy.items())},
        'fgsm_accuracy': 1 - robustness['fgsm_top1_error'],
        'pgd_accuracy': 1 - robustness['pgd_top1_error'],
        'robustness_clean_accuracy': 1 - robustness['clean_top1_error'],
        'robustness_examples': robustness['num_examples'],
        'robustness_options': {name: robustness[name] for name in (
            'fgsm_epsilon', 'pgd_epsilon', 'pgd_step_size', 'pgd_steps', 'pgd_random_start')},
        'ece': calibration['ece'], 'oe': calibration['oe'],
        'calibration_examples': calibration['num_examples'],
        'calibration_bins': len(calibration['bin_counts']),
        **{ood_figure(name, figure): ood[name][key] for name in OOD_SETS
           for figure, (key, _) in OOD_FIGURES.items()},
        'ood_examples': ood[OOD_SETS[0]]['num_out'],
        'train_seconds': result.get('wall_seconds'), 'eval_seconds': eval_seconds,
        'wall_seconds': (result['wall_seconds'] + eval_seconds
                         if 'wall_seconds' in result else None),
    }


def summarize(runs: Sequence[dict]) -> dict:
    """Per method, in order of appearance: each figure over the seeds (values, mean, sample
    std), the mean curve and the mean wall time."""
    methods = {}
    for run in runs:
        methods.setdefault(run['method'], []).append(run)
    summary = {}
    for method, method_runs in methods.items():
        figures = {'seeds': [run['seed'] for run in method_runs]}
        for figure in FIGURES:
            values = [run[figure] for run in method_runs]
            mean, std = reproduction_runs.mean_and_spread(values)
            figures[figure] = {'values': values, 'mean': mean, 'std': std}
        epochs = sorted(set.intersection(*(set(run['curve']) for run in method_runs)), key=int)
        figures['curve'] = {epoch: reproduction_runs.mean_and_spread(
            [run['curve'][epoch] for run in method_runs])[0] for epoch in epochs}
        walls = [run['wall_seconds'] for run in method_runs if run['wall_seconds'] is not None]
        figures['wall_seconds_mean'] = (reproduction_runs.mean_and_spread(walls)[0]
                                        if walls else None)
        summary[method] = figures
    return summary


def duration(seconds: float) -> str:
    """'42 min', '3 h 05 min': run times, averaged or estimated, to the minute."""
    return console.duration(seconds, whole_minutes=True)


def _finished_times(workdir: str) -> tuple[dict, dict]:
    """{method: [seconds]} of training and of evaluation, over every run directory in the
    workdir (<workdir>/<method>/seed<N>) that has finished that part."""
    train_times, eval_times = {}, {}
    for directory in sorted(glob.glob(os.path.join(workdir, '*', 'seed[0-9]*'))):
        method = os.path.basename(os.path.dirname(directory))
        result = _training_result(directory)  # read once: training, then evaluation
        if result is None:
            continue
        if 'wall_seconds' in result:
            train_times.setdefault(method, []).append(result['wall_seconds'])
        if _evaluated(directory, result):
            timing = _read_json(os.path.join(directory, 'eval', TIMING_FILE))
            if timing is not None and set(EVAL_KINDS) <= set(timing):
                eval_times.setdefault(method, []).append(sum(timing.values()))
    return train_times, eval_times


def remaining_report(workdir: str, methods: Sequence[str], seeds: Sequence[int]) -> str:
    """Which runs remain (to train and evaluate, or to evaluate) and the time they need,
    estimated from the finished runs: per remaining run, the mean training (evaluation) time
    of its method's finished runs, or of all finished runs for a method without one. Every
    run in the workdir counts, also those of methods and seeds not asked for now, so that
    runs started one seed at a time are estimated from the seeds before them."""
    remaining = []
    for method in methods:
        for seed in seeds:
            status = run_status(reproduction_runs.run_directory(workdir, method, seed))
            if status != 'done':
                remaining.append((method, seed, status))
    train_times, eval_times = _finished_times(workdir)
    total = len(methods) * len(seeds)
    if not remaining:
        return f'All {total} runs are trained and evaluated.'
    by_method = {}  # method -> {status: seeds}
    for method, seed, status in remaining:
        by_method.setdefault(method, {}).setdefault(status, []).append(seed)

    def seeds_text(seeds):
        return f'seed{"s" if len(seeds) > 1 else ""} {", ".join(map(str, seeds))}'

    listed = '; '.join(
        method + ' ' + ', '.join(seeds_text(statuses[status]) + suffix
                                 for status, suffix in (('train', ''),
                                                        ('evaluate', ' (evaluation only)'))
                                 if status in statuses)
        for method, statuses in by_method.items())
    line = f'{len(remaining)} of {total} runs remain: {listed}.'

    def estimate(times: dict, method: str) -> float | None:
        own = times.get(method) or [seconds for values in times.values() for seconds in values]
        return sum(own) / len(own) if own else None

    to_train = [method for method, _, status in remaining if status == 'train']
    if to_train and not train_times:
        return line + ' No time estimate yet: no run has finished training.'
    training = sum(estimate(train_times, method) for method in to_train)
    if not eval_times:
        if not to_train:
            return line + ' No time estimate yet: no run has been evaluated.'
        return line + (f' Estimated training time: {duration(training)}; no estimate of the '
                       'evaluations yet: no run has been evaluated.')
    evaluating = sum(estimate(eval_times, method) for method, _, _ in remaining)
    return (line + f' Estimated time: {duration(training + evaluating)} ({duration(training)} '
            f'training, {duration(evaluating)} evaluation; per run its method\'s mean over '
            'finished runs, else the mean over all of them).')


def _describe_robustness(runs: Sequence[dict]) -> str:
    options = runs[0]['robustness_options']
    return (f'FGSM (eps {255 * options["fgsm_epsilon"]:g}/255) and PGD (eps '
            f'{255 * options["pgd_epsilon"]:g}/255, {options["pgd_steps"]} steps of '
            f'{255 * options["pgd_step_size"]:g}/255, '
            f'{"random" if options["pgd_random_start"] else "clean"} start) accuracy on '
            f'{runs[0]["robustness_examples"]} test images (a fixed class-balanced subset '
            f'when fewer than the split)')


def format_markdown(summary: dict, runs: Sequence[dict], *, command: str, machine: str,
                    remaining: str) -> str:
    """The main table (one row a method), what it was measured on, then the OOD table."""
    if not runs:
        return f'No run is trained and evaluated yet. {remaining}\n'
    epochs = list(next(iter(summary.values()))['curve'])
    curve_header = (f'test accuracy at epoch {" / ".join(epochs)}, % (mean)' if epochs
                    else 'test accuracy during training (not logged)')

    def cells(figures, columns):
        return ' | '.join(f'{100 * figures[name]["mean"]:.2f} ± {100 * figures[name]["std"]:.2f}'
                          for name in columns)

    lines = [f'| method | seeds | {curve_header} | {" | ".join(MAIN_COLUMNS.values())} | '
             'wall time per run (training + evaluation) |',
             '|---' * (len(MAIN_COLUMNS) + 4) + '|']
    for method, figures in summary.items():
        curve = ' / '.join(f'{100 * figures["curve"][epoch]:.2f}' if epoch in figures['curve']
                           else '-' for epoch in epochs) or '-'
        wall = figures['wall_seconds_mean']
        lines.append(f'| {method} | {", ".join(map(str, figures["seeds"]))} | {curve} | '
                     f'{cells(figures, MAIN_COLUMNS)} | '
                     f'{"-" if wall is None else duration(wall)} |')
    ood_lines = [f'| method | {" | ".join(OOD_COLUMNS.values())} |',
                 '|---' * (len(OOD_COLUMNS) + 1) + '|']
    ood_lines += [f'| {method} | {cells(figures, OOD_COLUMNS)} |'
                  for method, figures in summary.items()]
    total_seconds = sum(run['wall_seconds'] for run in runs if run['wall_seconds'] is not None)
    lines += [
        '',
        f'{len(runs)} runs trained and evaluated; mean ± sample standard deviation over seeds. '
        f'Test accuracy, ECE and OE ({runs[0]["calibration_bins"]} confidence bins) on the '
        f'{runs[0]["calibration_examples"]} test images; {_describe_robustness(runs)}. '
        f'Command: `{command}`. Machine: {machine}. Wall time: {duration(total_seconds)} '
        f'for these runs together. {remaining}',
        '',
        'Out-of-distribution detection by the maximum softmax probability (Table 6\'s noise '
        f'sets, {runs[0]["ood_examples"]} images each, against the test images):',
        '',
        *ood_lines,
    ]
    return '\n'.join(lines) + '\n'


def write_results(workdir: str, runs: Sequence[dict], *, command: str, remaining: str) -> dict:
    """Writes WORKDIR/results.json and WORKDIR/results.md (the table, then the reading of the
    paper's claims, `claim_readings`); returns the summary."""
    summary = summarize(runs)
    machine = reproduction_runs.machine_description()
    readings = claim_readings.read_claims(summary)
    separation = claim_readings.separation(summary)
    with open(os.path.join(workdir, 'results.json'), 'w') as results_file:
        json.dump({'command': command, 'machine': machine, 'remaining': remaining,
                   'runs': list(runs), 'summary': summary, 'claims': readings,
                   'separation': separation}, results_file, indent=2)
    with open(os.path.join(workdir, 'results.md'), 'w') as table_file:
        table_file.write(format_markdown(summary, runs, command=command, machine=machine,
                                         remaining=remaining))
        if runs:
            table_file.write('\n' + claim_readings.format_markdown(readings, separation))
    return summary


def write_finished(methods: Sequence[str], seeds: Sequence[int], workdir: str, *,
                   num_epochs: int, command: str = '') -> str:
    """Writes the table and the reading of the runs already trained and evaluated, training
    and evaluating nothing (`reproduce --protocol=cpu --table_only`); returns what remains."""
    runs = [run_figures(reproduction_runs.run_directory(workdir, method, seed), method, seed,
                        num_epochs)
            for method in methods for seed in seeds
            if run_status(reproduction_runs.run_directory(workdir, method, seed)) == 'done']
    remaining = remaining_report(workdir, methods, seeds)
    write_results(workdir, runs, command=command, remaining=remaining)
    return remaining


def run_claims(make_config: Callable[[str], object], methods: Sequence[str],
               seeds: Sequence[int], workdir: str, *, command: str = '',
               report: Callable[[str], None] = print) -> dict:
    """Trains and evaluates each (method, seed) not done yet, reporting what remains; writes
    the table after each run and returns its summary. `make_config(method)`: a run's config
    (its seed is set here)."""
    from alignmix_jax import data

    if not methods or not seeds:
        raise ValueError('the claims table needs at least one method and one seed')
    datasets = {}  # shared with run_all: the data is decoded once
    runs = []
    started_done = {(method, seed) for method in methods for seed in seeds
                    if run_status(reproduction_runs.run_directory(workdir, method, seed))
                    == 'done'}
    report(remaining_report(workdir, methods, seeds))

    def after_run(method, seed):
        directory = reproduction_runs.run_directory(workdir, method, seed)
        config = make_config(method)
        config.seed = seed
        if run_status(directory) == 'evaluate':
            key = config.dataset.to_json()
            if key not in datasets:  # every run was trained before this call
                datasets[key] = data.load_dataset(config.dataset)
            evaluate_run(config, directory, _training_result(directory)['steps'],
                         datasets[key])
        runs.append(run_figures(directory, method, seed, config.train.num_epochs))
        remaining = remaining_report(workdir, methods, seeds)
        write_results(workdir, runs, command=command, remaining=remaining)
        if (method, seed) not in started_done:
            report(remaining)

    reproduction_runs.run_all(make_config, methods, seeds, workdir, command=command,
                              on_run_done=after_run, datasets=datasets, write_table=False)
    return summarize(runs)
