"""The evaluation command: python -m alignmix_jax.evaluation.<kind> --config=... --workdir=DIR.

Restores the checkpoint of WORKDIR (the latest, or --step), runs the kind's evaluator, prints
its table and writes WORKDIR/eval/<kind>.json (<kind>_step<N>.json for --step N,
<kind>_initial.json for --initial; the evaluator's own files named the same way). Bad input,
or a results folder it cannot write (checked before the work), ends with one `error: ...`
line.
"""

import os

import jax
import ml_collections
from absl import app, flags, logging

from alignmix_jax.evaluation import common
from alignmix_jax.runtime import output_dirs
from alignmix_jax.runtime.command_line import (
    absl_log_on_terminal,
    hide_library_info,
    one_line_errors,
    parse_flags,
    route_absl_log,
)


def define_flags() -> None:
    """The command's flags; called by the entry point only, so importing defines none."""
    from ml_collections import config_flags

    flags.DEFINE_string('workdir', None, 'The training workdir: checkpoints are read from '
                        'WORKDIR/checkpoints, results written to WORKDIR/eval.')
    flags.mark_flags_as_required(['workdir'])
    config_flags.DEFINE_config_file('config', None, 'The training config of the run '
                                    '(with the same overrides).', lock_config=True)
    flags.mark_flags_as_required(['config'])
    flags.DEFINE_integer('step', None, 'The checkpoint step to evaluate (default: the latest).')
    flags.DEFINE_bool('initial', False, 'Evaluate the initial model of the config (its seed; '
                      'no checkpoint needed) instead, as an untrained baseline; writes '
                      'WORKDIR/eval/<kind>_initial.json.')


def evaluate_workdir(kind: str, config: ml_collections.ConfigDict, workdir: str,
                     step: int | None = None, *, initial: bool = False,
                     dataset=None) -> tuple[dict, str]:
    """The command's work as a function: (the JSON record written, the printed table).
    `initial`: the config's initial model instead of a checkpoint (step 'initial').
    `dataset`: `config.dataset` already loaded (None: loaded here)."""
    from alignmix_jax import evaluation

    evaluator_class = evaluation.evaluator_class(kind)
    latest = step is None
    if initial:
        if step is not None:
            raise ValueError('--initial evaluates the initial model: leave out --step')
        (context, variables), step = common.initial(config, dataset), 'initial'
    else:
        context, variables, step = common.load(config, workdir, step, dataset)
    if jax.process_index() == 0:  # before the work: a folder it cannot write stops it now
        output_dirs.check_writable(os.path.join(workdir, 'eval'), 'the results folder')
    options = config.evals[kind].to_dict() if kind in config.evals else {}
    evaluator = evaluator_class(context, **options)
    results = evaluator.run(variables)
    table = f'{kind} of {workdir} at step {step}\n{evaluator.table(results)}'
    record = {'kind': kind, 'step': step, 'options': options, 'results': results}
    if jax.process_index() == 0:
        name = common.results_name(kind, step, latest=latest)
        path = common.write_results(workdir, name, kind, step, results, options)
        written = [path, *evaluator.write_files(results, os.path.dirname(path), name)]
        table += '\nwrote ' + ', '.join(written)
    return record, table


def run_command(kind: str) -> None:
    """The `python -m alignmix_jax.evaluation.<kind>` entry point (defines flags, runs)."""
    define_flags()

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
        logging.get_absl_handler().addFilter(hide_library_info)
        with one_line_errors():
            # The table is the console: absl's INFO lines only with -v or in --log_dir.
            route_absl_log(absl_log_on_terminal())
            from alignmix_jax.settings import config_checks
            config_checks.validate(flags.FLAGS.config)
            _, table = evaluate_workdir(kind, flags.FLAGS.config, flags.FLAGS.workdir,
                                        flags.FLAGS.step, initial=flags.FLAGS.initial)
        print(table)

    app.run(main, flags_parser=parse_flags)
