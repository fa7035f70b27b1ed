"""Trains AlignMix: `python -m alignmix_jax.main --config=configs/cifar10.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g. `--config.train.num_epochs=3`.
A run restarted with the same --workdir resumes from its latest checkpoint.

The terminal shows one header line, the progress (a bar on a terminal, a line every
`log_every_steps` elsewhere), a line per evaluation and the result; the resolved config is
written to WORKDIR/config.json (`--print_config` also prints it). absl's log, with every metric,
goes to a file with `--log_dir=DIR`, or to the terminal instead of those lines with `-v 0`
(`-v 1` adds the debug lines).

Several processes (hosts, or GPUs with one process each) train together when started with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or as the tasks of a SLURM
job; see launch/README.md.
"""

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from alignmix_jax.runtime.command_line import (
    absl_log_on_terminal,
    hide_library_info,
    one_line_errors,
    parse_flags,
    route_absl_log,
)

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
flags.mark_flags_as_required(['workdir'])
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0 in a multi-process run (not needed under SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'Index of this process in a multi-process run.')
flags.DEFINE_bool('print_config', False, 'Print the resolved config (as WORKDIR/config.json '
                  'holds it) before training.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.get_absl_handler().addFilter(hide_library_info)
    absl_on_terminal = absl_log_on_terminal()
    with one_line_errors():
        route_absl_log(absl_on_terminal)
        # The settings first, before the devices or the data are touched.
        # No JAX or TensorFlow yet: a bad setting is reported within a second.
        from alignmix_jax import data
        from alignmix_jax.runtime import output_dirs
        from alignmix_jax.settings import config_checks
        config_checks.validate(FLAGS.config)
        # The workdir: created if missing, written to, or one line saying why not.
        output_dirs.check_writable(FLAGS.workdir, '--workdir')
        train_size = data.known_train_size(FLAGS.config.dataset)
        if train_size is not None:
            config_checks.check_training_set(FLAGS.config, train_size)
        # TensorFlow, where a dataset needs it, is imported by that dataset's loader
        # (data.common.import_tensorflow: kept off the accelerators JAX uses).
        import jax

        from alignmix_jax.runtime import run_config, sharding
        from alignmix_jax.runtime.console import stderr_console
        from alignmix_jax.training import train

        sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
        config_text = run_config.as_json(FLAGS.config)
        logging.info('Config:\n%s', config_text)
        # absl's lines on the terminal (-v) say it all; the console's would repeat them.
        console = stderr_console(jax.process_index(), quiet=absl_on_terminal)
        if FLAGS.print_config and jax.process_index() == 0:
            print(config_text, file=sys.stderr, flush=True)
        logging.get_absl_handler().addFilter(console.make_room)
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir, console=console)
        if jax.process_index() == 0:
            results_path = os.path.join(FLAGS.workdir, 'results.json')
            with open(results_path, 'w') as results_file:
                json.dump(result, results_file, indent=2)
            console.result(result, results_path)
    if jax.process_index() == 0:
        print(json.dumps(result))


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
