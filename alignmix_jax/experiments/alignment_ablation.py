"""The ablation of alignment (the paper's Table 8, aligned vs unaligned), run by `reproduce
--ablation=alignment`:

    python -m alignmix_jax.experiments.reproduce --ablation=alignment \\
        --data_dir=../shared/data/cifar10-jpeg --workdir=runs/ablation

AlignMix on the mini-reproduction's budget (configs/mini_reproduction.py), each seed, in every
combination of
- the alignment: 'off' (A and A' mixed unaligned, `mixup.align=False`), 'paper' (the paper's
  absolute epsilon), 'converged' (each pair's cost divided by its mean, `mixup.cost_scale=
  'mean'`, so the plans are doubly stochastic) and 'public' (the public code's algorithm, the
  method `alignmix_public` of configs/methods.py, run when that method exists);
- the head f: 'pooled_linear' (the public code's: pooling, then the linear g; alignment is inert
  there, so these runs set `mixup.allow_inert_alignment`) and 'bn_relu' (the default: BatchNorm +
  ReLU, then pooling).
Each condition is a run of `reproduction_runs.run_all` in `WORKDIR/<alignment>_<head>/seed<k>`;
after every run `WORKDIR/ablation.md` (and `ablation.json`) tabulates, per condition, the final
test accuracy (mean ± std, per seed), the mean over the run of `train/alignment_effect` and
`train/marginal_error` (read from the run's TensorBoard summaries) and the wall time.
"""

import json
import os
import statistics
from collections.abc import Sequence

from alignmix_jax.runtime.command_line import repository_configs

ALIGNMENTS = {
    'off': {'mixup.align': False},
    'paper': {},
    'converged': {'mixup.cost_scale': 'mean'},
}
# The parity work's method (configs/methods.py): its condition runs once that method exists.
PUBLIC_METHOD = 'alignmix_public'
HEADS = {
    'pooled_linear': {'model.head_norm': False, 'mixup.allow_inert_alignment': True},
    'bn_relu': {'model.head_norm': True},
}
# The per-step figures averaged over each run (sinkhorn_iterations: the public loop's only).
FIGURES = ('alignment_effect', 'marginal_error', 'sinkhorn_iterations')


def alignments() -> tuple[str, ...]:
    """The alignment variants this checkout can run ('public' once PUBLIC_METHOD exists)."""
    methods = repository_configs('methods')
    return tuple(ALIGNMENTS) + (('public',) if PUBLIC_METHOD in methods.METHODS else ())


def conditions(names: Sequence[str] | None = None) -> list[str]:
    """'<alignment>_<head>' of every combination, or `names` after checking them."""
    every = [f'{alignment}_{head}' for alignment in alignments() for head in HEADS]
    if names is None:
        return every
    unknown = [name for name in names if name not in every]
    if unknown:
        raise ValueError(f'unknown ablation condition {unknown[0]!r}; valid: {", ".join(every)}')
    return list(names)


def make_config(condition: str, *, backbone: str = 'preact_resnet18', data_dir: str | None = None):
    """The run config of `condition` ('<alignment>_<head>') on the mini-reproduction budget."""
    backbones = repository_configs('backbones')
    mini_reproduction = repository_configs('mini_reproduction')
    alignment, head = next((alignment, condition[len(alignment) + 1:])
                           for alignment in alignments() if condition.startswith(alignment + '_'))
    method = PUBLIC_METHOD if alignment == 'public' else 'alignmix'
    config = mini_reproduction.get_config(f'{backbone},{method}')
    backbones.set_fields(config, {**ALIGNMENTS.get(alignment, {}), **HEADS[head]})
    if data_dir is not None:
        config.dataset.data_dir = data_dir
    return config


def run_means(directory: str) -> dict:
    """The mean of each of FIGURES over the logged intervals of the run in `directory`
    (None where it logged none: alignment off)."""
    from alignmix_jax.experiments import reproduction_runs
    logged = reproduction_runs.logged_scalars(directory, [f'train/{figure}' for figure in FIGURES])
    return {figure: (statistics.fmean(logged[f'train/{figure}'].values())
                     if logged[f'train/{figure}'] else None)
            for figure in FIGURES}


def summarize(workdir: str, runs: dict) -> dict:
    """{condition: [(seed, result)]} -> per condition: accuracies and the mean figures."""
    from alignmix_jax.experiments import reproduction_runs
    summary = {}
    for condition, seed_results in runs.items():
        final = [result['final_test_accuracy'] for _, result in seed_results]
        means = [run_means(reproduction_runs.run_directory(workdir, condition, seed))
                 for seed, _ in seed_results]
        walls = [result['wall_seconds'] for _, result in seed_results if 'wall_seconds' in result]
        mean = statistics.fmean(final)
        summary[condition] = {
            'seeds': [seed for seed, _ in seed_results], 'final_test_accuracy': final,
            'final_mean': mean, 'final_std': statistics.stdev(final) if len(final) > 1 else 0.0,
            **{figure: (statistics.fmean(run[figure] for run in means)
                        if all(run[figure] is not None for run in means) else None)
               for figure in FIGURES},
            'wall_seconds_mean': statistics.fmean(walls) if walls else None,
        }
    return summary


def format_markdown(summary: dict, *, command: str) -> str:
    lines = ['| alignment | head | final test accuracy, % (mean ± std) | per seed | '
             + ' | '.join(FIGURES) + ' | wall time per run |',
             '|---|---|---|---|' + '---|' * len(FIGURES) + '---|']
    for condition, figures in summary.items():
        alignment = next(name for name in alignments() if condition.startswith(name + '_'))
        per_seed = ', '.join(f'{100 * value:.2f}' for value in figures['final_test_accuracy'])
        cells = [f'{figures[figure]:.3g}' if figures[figure] is not None else '-'
                 for figure in FIGURES]
        wall = figures['wall_seconds_mean']
        lines.append(f'| {alignment} | {condition[len(alignment) + 1:]} | '
                     f'{100 * figures["final_mean"]:.2f} ± {100 * figures["final_std"]:.2f} | '
                     f'{per_seed} | {" | ".join(cells)} | '
                     f'{"-" if wall is None else f"{wall / 60:.1f} min"} |')
    lines += ['', f'{", ".join(FIGURES)}: means over each run\'s logged intervals, then over '
              f'seeds ("-": not logged: alignment off, or not the public loop). Command: '
              f'`{command}`.']
    return '\n'.join(lines) + '\n'


def run_ablation(make_run_config, names: Sequence[str], seeds: Sequence[int], workdir: str, *,
                 command: str) -> dict:
    """Trains the conditions `names` (see `make_config`; `make_run_config(condition)` gives
    each run's config) and writes WORKDIR/ablation.md and ablation.json; returns the summary."""
    from alignmix_jax.experiments import reproduction_runs
    runs = {}

    def write_table(condition, seed):
        with open(os.path.join(reproduction_runs.run_directory(workdir, condition, seed),
                               'results.json')) as results_file:
            runs.setdefault(condition, []).append((seed, json.load(results_file)))
        summary = summarize(workdir, runs)
        with open(os.path.join(workdir, 'ablation.json'), 'w') as summary_file:
            json.dump({'command': command, 'summary': summary}, summary_file, indent=2)
        with open(os.path.join(workdir, 'ablation.md'), 'w') as table_file:
            table_file.write(format_markdown(summary, command=command))

    reproduction_runs.run_all(make_run_config, names, seeds, workdir, command=command,
                              on_run_done=write_table)
    return summarize(workdir, runs)
