"""Trains AlignMix: `python -m alignmix_jax.main --config=configs/cifar10.py --workdir=DIR`.

Any config field can be overridden on the command line, e.g. `--config.train.num_epochs=3`.
A run restarted with the same --workdir resumes from its latest checkpoint.

Several processes (hosts, or GPUs with one process each) train together when started with
--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or as the tasks of a SLURM
job; see launch/README.md.
"""

import json
import os

from absl import app, flags, logging
from ml_collections import config_flags

from alignmix_jax.runtime.command_line import hide_library_info, one_line_errors, parse_flags

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, TensorBoard logs and results.')
flags.mark_flags_as_required(['workdir'])
config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
flags.mark_flags_as_required(['config'])
flags.DEFINE_string('coordinator_address', None,
                    'HOST:PORT of process 0 in a multi-process run (not needed under SLURM).')
flags.DEFINE_integer('num_processes', None, 'Number of processes in a multi-process run.')
flags.DEFINE_integer('process_id', None, 'Index of this process in a multi-process run.')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    logging.get_absl_handler().addFilter(hide_library_info)
    with one_line_errors():
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

        from alignmix_jax.runtime import sharding
        from alignmix_jax.training import train

        sharding.initialize_processes(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
        logging.info('Config:\n%s', FLAGS.config)
        result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
        if jax.process_index() == 0:
            with open(os.path.join(FLAGS.workdir, 'results.json'), 'w') as results_file:
                json.dump(result, results_file, indent=2)
    if jax.process_index() == 0:
        print(json.dumps(result))


if __name__ == '__main__':
    app.run(main, flags_parser=parse_flags)
