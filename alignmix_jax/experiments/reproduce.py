"""A small-budget comparison of the paper's Table 1 methods on a CPU, with a results table.

    python -m alignmix_jax.experiments.reproduce --data_dir=../shared/data/cifar10-jpeg \\
        --workdir=runs/mini

Trains every method of configs/methods.py (baseline, input mixup, manifold mixup, CutMix,
AlignMix, AlignMix/AE, AlignMix + CutMix) with each seed, one run after another in this
process, each its own training run through `train.train_and_evaluate` in
`WORKDIR/<method>/seed<k>` with the settings of configs/mini_reproduction.py. A run that is
killed resumes from its checkpoint when the command is started again; a run whose
`results.json` exists is not trained again. The data is decoded once and shared by all runs.
At the end (and after every run, so a partial table is always there) it writes
`WORKDIR/results.json` (every run and the summary) and `WORKDIR/results.md`: per method, the
mean and standard deviation over seeds of the final test accuracy, the best test accuracy
seen during training beside it, and the wall time per run.

`--backbone=vit_small` (or another of configs/backbones.py) trains every run on that network
instead of the quarter-width PreActResNet18:

    python -m alignmix_jax.experiments.reproduce --data_dir=../shared/data/cifar10-jpeg \
        --workdir=runs/mini_vit --backbone=vit_small --methods=baseline,alignmix

`--ablation=alignment` trains instead AlignMix with alignment off, the paper's, converged and
the public code's, behind two heads, and writes WORKDIR/ablation.md
(`alignmix_jax.experiments.alignment_ablation`; `--methods` then names its conditions, e.g.
`paper_bn_relu`).

`--protocol=cpu` trains instead the claims set of configs/cpu_protocol.py (its `METHODS`, or
`--methods`) on that protocol's budget (2,000 training images, 100 epochs), evaluates each
run's final checkpoint for FGSM and PGD accuracy, ECE and OE, and OOD detection of uniform
and Gaussian noise, and writes one row a method to WORKDIR/results.md and results.json (a
second table for OOD detection), followed by the reading of the paper's claims
(`alignmix_jax.experiments.claim_readings`); it prints which runs remain and an estimate of
their time at the start and after each run (`alignmix_jax.experiments.claims_table`).
`--table_only` writes the table and the reading from the runs finished so far and trains
nothing:

    python -m alignmix_jax.experiments.reproduce --protocol=cpu \
        --data_dir=../shared/data/cifar10-jpeg --workdir=runs/cpu [--table_only]

This is not the paper's protocol (2000 epochs on the full training set): it compares the
methods on the same small budget, where the ranking may well differ from the paper's. The
runs and the table are `alignmix_jax.experiments.reproduction_runs`; this module is the command.
"""

import os

from absl import app, flags, logging

from alignmix_jax.runtime.command_line import (
    hide_library_info,
    one_line_errors,
    parse_flags,
    repository_configs,
)

FLAGS = flags.FLAGS
flags.DEFINE_string('data_dir', None, 'The CIFAR-10 image folder (DIR/{train,test}/<class>/).')
flags.DEFINE_string('workdir', None, 'Directory of the runs, results.json and results.md.')
flags.mark_flags_as_required(['data_dir', 'workdir'])
flags.DEFINE_list('methods', None, 'Methods of configs/methods.py to run (default: all).')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Seeds; each method is trained once per seed.')
flags.DEFINE_enum('ablation', None, ['alignment'],
                  'Train the ablation of alignment '
                  '(alignmix_jax/experiments/alignment_ablation.py) instead of the '
                  'methods; --methods then names its conditions.')
flags.DEFINE_string('backbone', 'preact_resnet18',
                    'The network of every run: a backbone of configs/backbones.py.')
flags.DEFINE_enum('protocol', 'mini', ['mini', 'cpu'],
                  "The runs' budget: 'mini', configs/mini_reproduction.py (the fast smoke run); "
                  "'cpu', configs/cpu_protocol.py, each final checkpoint also evaluated for "
                  'FGSM/PGD accuracy and calibration (the claims table).')
flags.DEFINE_bool('table_only', False,
                  'With --protocol=cpu: write the table and the reading of the paper\'s claims '
                  'from the runs already trained and evaluated, train nothing, and print what '
                  'remains.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.get_absl_handler().addFilter(hide_library_info)
    import jax

    backbones = repository_configs('backbones')
    mini_reproduction = repository_configs('mini_reproduction')
    method_configs = repository_configs('methods')

    # The seeds of a method run the same programs: compile them once.
    jax.config.update('jax_compilation_cache_dir',
                      os.path.abspath(os.path.join(FLAGS.workdir, 'jax_cache')))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
    chosen = FLAGS.methods or list(method_configs.METHODS)
    unknown = [method for method in chosen if method not in method_configs.METHODS]
    if unknown and FLAGS.ablation is None:  # before any training
        raise SystemExit(f'error: unknown method {unknown[0]!r}; valid methods: '
                         f'{", ".join(method_configs.METHODS)}')
    if FLAGS.backbone not in backbones.BACKBONES:
        raise SystemExit(f'error: unknown backbone {FLAGS.backbone!r}; valid backbones: '
                         f'{", ".join(backbones.BACKBONES)}')
    try:
        seeds = [int(seed) for seed in FLAGS.seeds]
    except ValueError:
        raise SystemExit(f'error: --seeds must be integers, got {",".join(FLAGS.seeds)}') from None

    if FLAGS.table_only and FLAGS.protocol != 'cpu':
        raise SystemExit('error: --table_only reads the claims table of --protocol=cpu; add '
                         '--protocol=cpu')
    if FLAGS.protocol == 'cpu' and FLAGS.ablation is not None:
        raise SystemExit('error: --ablation runs on the mini-reproduction budget; leave out '
                         '--protocol=cpu (or --ablation)')

    os.makedirs(FLAGS.workdir, exist_ok=True)
    if FLAGS.ablation == 'alignment':
        _alignment_ablation(seeds)
        return
    if FLAGS.protocol == 'cpu':
        _claims_table(seeds)
        return

    def make_config(method):
        config = mini_reproduction.get_config(f'{FLAGS.backbone},{method}')
        config.dataset.data_dir = FLAGS.data_dir
        return config

    command = _command('', chosen)
    from alignmix_jax.experiments.reproduction_runs import run_all
    from alignmix_jax.settings import config_checks
    with one_line_errors():
        for method in chosen:  # every run's settings, before the first run trains
            config_checks.validate(make_config(method), num_devices=jax.device_count())
        run_all(make_config, chosen, seeds, FLAGS.workdir, command=command)
    with open(os.path.join(FLAGS.workdir, 'results.md')) as table_file:
        print(table_file.read())


def _command(options: str, names) -> str:
    """The command line that reproduces this one, for the tables."""
    command = (f'python -m alignmix_jax.experiments.reproduce{options} --data_dir={FLAGS.data_dir} '
               f'--workdir={FLAGS.workdir}')
    if FLAGS.methods:
        command += f' --methods={",".join(names)}'
    if FLAGS.seeds != ['0', '1', '2']:
        command += f' --seeds={",".join(FLAGS.seeds)}'
    if FLAGS.backbone != 'preact_resnet18':
        command += f' --backbone={FLAGS.backbone}'
    return command


def _claims_table(seeds):
    """`--protocol=cpu`: the methods of configs/cpu_protocol.py (or --methods) on its budget,
    trained and evaluated by alignmix_jax.experiments.claims_table."""
    import jax

    from alignmix_jax.experiments import claims_table
    from alignmix_jax.settings import config_checks
    cpu_protocol = repository_configs('cpu_protocol')

    def make_config(method):
        config = cpu_protocol.get_config(f'{FLAGS.backbone},{method}')
        config.dataset.data_dir = FLAGS.data_dir
        return config

    names = FLAGS.methods or list(cpu_protocol.METHODS)
    command = _command(' --protocol=cpu', names)
    with one_line_errors():
        if FLAGS.table_only:
            claims_table.write_finished(names, seeds, FLAGS.workdir, command=command,
                                        num_epochs=make_config(names[0]).train.num_epochs)
        else:
            for name in names:  # every run's settings, before the first run trains
                config_checks.validate(make_config(name), num_devices=jax.device_count())
            claims_table.run_claims(make_config, names, seeds, FLAGS.workdir, command=command)
    with open(os.path.join(FLAGS.workdir, 'results.md')) as table_file:
        print(table_file.read())


def _alignment_ablation(seeds):
    import jax

    from alignmix_jax.experiments import alignment_ablation
    from alignmix_jax.settings import config_checks

    def make_config(condition):
        return alignment_ablation.make_config(condition, backbone=FLAGS.backbone,
                                              data_dir=FLAGS.data_dir)

    with one_line_errors():
        names = alignment_ablation.conditions(FLAGS.methods)
        command = _command(' --ablation=alignment', names)
        for name in names:  # every run's settings, before the first run trains
            config_checks.validate(make_config(name), num_devices=jax.device_count())
        alignment_ablation.run_ablation(make_config, names, seeds, FLAGS.workdir,
                                        command=command)
    with open(os.path.join(FLAGS.workdir, 'ablation.md')) as table_file:
        print(table_file.read())


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
