"""The mini-reproduction's runs and table: `python -m alignmix_jax.experiments.reproduce` is the
command.

`run_all` trains each (method, seed) as its own run through `train.train_and_evaluate` in
`WORKDIR/<method>/seed<k>`, skips the runs whose `results.json` exists (a killed run resumes
from its checkpoint), shares one loaded dataset between runs with the same dataset config, and
after every run writes `WORKDIR/results.json` (every run and the summary) and
`WORKDIR/results.md`: per method, the mean and standard deviation over seeds of the final test
accuracy, the best test accuracy seen during training beside it, and the wall time per run.
"""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

from absl import logging


def run_directory(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, method, f'seed{seed}')


def run_all(make_config: Callable[[str], object], methods: Sequence[str], seeds: Sequence[int],
            workdir: str, *, command: str = '', on_run_done: Callable | None = None,
            datasets: dict | None = None, write_table: bool = True) -> dict:
    """Trains each (method, seed) not trained yet; returns the summary `write_results` wrote.

    `make_config(method)` gives the run's config (its seed is set here). Runs of methods whose
    dataset configs are equal share one loaded dataset. `on_run_done(method, seed)` is called
    after each run, trained now or before. `datasets`: the loaded datasets by
    `config.dataset.to_json()`, filled here, for a caller that uses them too (the claims
    table's evaluations). `write_table=False`: a caller writes its own WORKDIR/results.*.
    """
    from alignmix_jax import data
    from alignmix_jax.training import train

    if datasets is None:
        datasets = {}  # the dataset config, as a string -> the loaded dataset
    runs = []
    for method in methods:
        for seed in seeds:
            directory = run_directory(workdir, method, seed)
            results_path = os.path.join(directory, 'results.json')
            if os.path.exists(results_path):
                with open(results_path) as results_file:
                    result = json.load(results_file)
                logging.info('%s seed %d: done before (%s), skipped.', method, seed,
                             results_path)
            else:
                config = make_config(method)
                config.seed = seed
                dataset_key = config.dataset.to_json()
                if dataset_key not in datasets:
                    datasets[dataset_key] = data.load_dataset(config.dataset)
                logging.info('%s seed %d: training in %s.', method, seed, directory)
                run_start = time.time()
                result = train.train_and_evaluate(config, directory,
                                                  dataset=datasets[dataset_key])
                # With the training of earlier calls, when this one resumed a killed run.
                result['wall_seconds'] = (time.time() - run_start
                                          + result['train_seconds_before_resume'])
                with open(results_path, 'w') as results_file:
                    json.dump(result, results_file, indent=2)
            # The modes drawn (with 'clean' for a decoder) and alpha, from the method's config.
            config = make_config(method)
            runs.append({'method': method, 'seed': seed, **result,
                         'modes': list(train.training_modes(config)),
                         'alpha': config.mixup.alpha})
            summary = (write_results(workdir, runs, command=command) if write_table
                       else summarize(runs))
            if on_run_done is not None:
                on_run_done(method, seed)
    return summary


def logged_scalars(directory: str, tags: Sequence[str]) -> dict[str, dict[int, float]]:
    """{tag: {step: value}} of the scalars `tags` the run in `directory` logged to its
    metrics.jsonl (`metric_log`; a step logged twice, as after a resume, keeps its last
    value). Needs no TensorFlow, unlike reading the TensorBoard event files."""
    from alignmix_jax.runtime import metric_log
    values = {tag: {} for tag in tags}
    for record in metric_log.read_metrics(directory):
        for tag in tags:
            if tag in record:
                values[tag][int(record['step'])] = float(record[tag])
    return values


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(runs: Sequence[dict]) -> dict:
    """Per method, in order of appearance: accuracies over seeds and wall times."""
    methods = {}
    for run in runs:
        methods.setdefault(run['method'], []).append(run)
    summary = {}
    for method, method_runs in methods.items():
        final = [run['final_test_accuracy'] for run in method_runs]
        best = [run['best_test_accuracy'] for run in method_runs]
        walls = [run['wall_seconds'] for run in method_runs if 'wall_seconds' in run]
        final_mean, final_std = mean_and_spread(final)
        best_mean, best_std = mean_and_spread(best)
        summary[method] = {
            'seeds': [run['seed'] for run in method_runs],
            'final_test_accuracy': final, 'final_mean': final_mean, 'final_std': final_std,
            'best_test_accuracy': best, 'best_mean': best_mean, 'best_std': best_std,
            'wall_seconds_mean': statistics.fmean(walls) if walls else None,
            'modes': method_runs[0].get('modes'), 'alpha': method_runs[0].get('alpha'),
        }
    return summary


def format_markdown(summary: dict, *, command: str, machine: str) -> str:
    lines = [
        '| method | modes (alpha) | final test accuracy, % (mean ± std) | per seed | '
        'best during training, % | wall time per run |',
        '|---|---|---|---|---|---|',
    ]
    for method, figures in summary.items():
        modes = ', '.join(figures['modes'] or ()) or '-'
        alpha = '' if method == 'baseline' else f' ({figures["alpha"]:g})'
        per_seed = ', '.join(f'{100 * value:.2f}' for value in figures['final_test_accuracy'])
        wall = figures['wall_seconds_mean']
        lines.append(
            f'| {method} | {modes}{alpha} | {100 * figures["final_mean"]:.2f} ± '
            f'{100 * figures["final_std"]:.2f} | {per_seed} | {100 * figures["best_mean"]:.2f} ± '
            f'{100 * figures["best_std"]:.2f} | '
            f'{"-" if wall is None else f"{wall / 60:.1f} min"} |')
    num_runs = sum(len(figures['seeds']) for figures in summary.values())
    run_seconds = sum(figures['wall_seconds_mean'] * len(figures['seeds'])
                      for figures in summary.values() if figures['wall_seconds_mean'])
    lines += [
        '',
        f'{num_runs} runs; std: sample standard deviation over seeds. Command: `{command}`. '
        f'Machine: {machine}. Wall time: {run_seconds / 60:.1f} min for the runs together '
        '(each: building the model, compiling, training, evaluating), plus loading the data '
        'once.',
    ]
    return '\n'.join(lines) + '\n'


def machine_description() -> str:
    import jax
    devices = jax.devices()
    return (f'{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), '
            f'{len(devices)} {devices[0].platform} device(s), jax {jax.__version__}')


def write_results(workdir: str, runs: Sequence[dict], *, command: str) -> dict:
    """Writes WORKDIR/results.json and WORKDIR/results.md; returns the summary."""
    summary = summarize(runs)
    machine = machine_description()
    with open(os.path.join(workdir, 'results.json'), 'w') as results_file:
        json.dump({'command': command, 'machine': machine, 'runs': list(runs),
                   'summary': summary}, results_file, indent=2)
    with open(os.path.join(workdir, 'results.md'), 'w') as table_file:
        table_file.write(format_markdown(summary, command=command, machine=machine))
    return summary
