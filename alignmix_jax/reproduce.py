"""A small-budget comparison of the paper's Table 1 methods on a CPU, with a results table.

    python -m alignmix_jax.reproduce --data_dir=../shared/data/cifar10-jpeg --workdir=runs/mini

Trains every method of configs/methods.py (baseline, input mixup, manifold mixup, CutMix,
AlignMix, AlignMix/AE) with each seed, one run after another in this process, each its own
training run through `train.train_and_evaluate` in `WORKDIR/<method>/seed<k>` with the settings
of configs/mini_reproduction.py. A run that is killed resumes from its checkpoint when the
command is started again; a run whose `results.json` exists is not trained again. The data is
decoded once and shared by all runs. At the end (and after every run, so a partial table is
always there) it writes `WORKDIR/results.json` (every run and the summary) and
`WORKDIR/results.md`: per method, the mean and standard deviation over seeds of the final test
accuracy, the best test accuracy seen during training beside it, and the wall time per run.

This is not the paper's protocol (2000 epochs on the full training set): it compares the
methods on the same small budget, where the ranking may well differ from the paper's.
"""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

from absl import app, flags, logging

from alignmix_jax.command_line import hide_library_info, parse_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'The CIFAR-10 image folder (DIR/{train,test}/<class>/).')
flags.DEFINE_string('workdir', None, 'Directory of the runs, results.json and results.md.')
flags.mark_flags_as_required(['data_dir', 'workdir'])
flags.DEFINE_list('methods', None, 'Methods of configs/methods.py to run (default: all).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; each method is trained once per seed.')


def run_directory(workdir: str, method: str, seed: int) -> str:
    return os.path.join(workdir, method, f'seed{seed}')


def run_all(make_config: Callable[[str], object], methods: Sequence[str], seeds: Sequence[int],
            workdir: str, *, command: str = '', on_run_done: Callable | None = None) -> dict:
    """Trains each (method, seed) not trained yet; returns the summary `write_results` wrote.

    `make_config(method)` gives the run's config (its seed is set here). Runs of methods whose
    dataset configs are equal share one loaded dataset.
    """
    from alignmix_jax import input_pipeline, train

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
                    datasets[dataset_key] = input_pipeline.load_dataset(config.dataset)
                logging.info('%s seed %d: training in %s.', method, seed, directory)
                run_start = time.time()
                result = train.train_and_evaluate(config, directory,
                                                  dataset=datasets[dataset_key])
                result['wall_seconds'] = time.time() - run_start
                with open(results_path, 'w') as results_file:
                    json.dump(result, results_file, indent=2)
            # The modes drawn (with 'clean' for a decoder) and alpha, from the method's config.
            config = make_config(method)
            runs.append({'method': method, 'seed': seed, **result,
                         'modes': list(train.training_modes(config)),
                         'alpha': config.mixup.alpha})
            summary = write_results(workdir, runs, command=command)
            if on_run_done is not None:
                on_run_done(method, seed)
    return summary


def _mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
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
        final_mean, final_std = _mean_and_spread(final)
        best_mean, best_std = _mean_and_spread(best)
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


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.get_absl_handler().addFilter(hide_library_info)
    import tensorflow as tf
    tf.config.set_visible_devices([], 'GPU')  # TensorFlow only reads data
    import jax

    from configs import methods as method_configs
    from configs import mini_reproduction

    # The seeds of a method run the same programs: compile them once.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(FLAGS.workdir, 'jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    chosen = FLAGS.methods or list(method_configs.METHODS)
    unknown = [method for method in chosen if method not in method_configs.METHODS]
    if unknown:  # before any training
        raise SystemExit(f'error: unknown method {unknown[0]!r}; valid methods: '
                         f'{", ".join(method_configs.METHODS)}')
    try:
        seeds = [int(seed) for seed in FLAGS.seeds]
    except ValueError:
        raise SystemExit(f'error: --seeds must be integers, got {",".join(FLAGS.seeds)}') from None

    os.makedirs(FLAGS.workdir, exist_ok=True)

    def make_config(method):
        config = mini_reproduction.get_config(method)
        config.dataset.data_dir = FLAGS.data_dir
        return config

    command = (f'python -m alignmix_jax.reproduce --data_dir={FLAGS.data_dir} '
               f'--workdir={FLAGS.workdir}')
    if FLAGS.methods:
        command += f' --methods={",".join(chosen)}'
    if FLAGS.seeds != ['0', '1', '2']:
        command += f' --seeds={",".join(FLAGS.seeds)}'
    from alignmix_jax.checkpointing import CheckpointError
    from alignmix_jax.input_pipeline import DatasetError
    try:
        run_all(make_config, chosen, seeds, FLAGS.workdir, command=command)
    except (CheckpointError, DatasetError, FloatingPointError) as error:
        # One clear line, as the training command gives: each of these says what to do.
        raise SystemExit(f'error: {error}') from None
    with open(os.path.join(FLAGS.workdir, 'results.md')) as table_file:
        print(table_file.read())


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
