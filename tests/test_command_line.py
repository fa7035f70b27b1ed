"""The commands' flag parsing: a tuple field given twice is an error, not a silent join."""

import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from alignmix_jax.command_line import check_tuple_fields_given_once
from tests.conftest import REPO_ROOT

MODES_TWICE = ["--config.mixup.modes=('input','input','feature','feature_prime')",
               "--config.mixup.modes=('none',)"]
REPEATED_MESSAGE = ('--config.mixup.modes is given 2 times; give a tuple field once, whole: '
                    "--config.mixup.modes=\"('a','b')\" (repeated, its values would be joined "
                    'into one tuple)')


def parsed(*overrides):
    argv = ['prog', '--config=configs/demo.py', *overrides]
    flag_values = flags.FlagValues()
    # sys_argv: where ml_collections looks for the overrides it defines flags for.
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=flag_values,
                                    lock_config=True, sys_argv=argv)
    flag_values(argv)
    return argv, flag_values


def test_ml_collections_joins_a_repeated_tuple_field():
    """The cause: ml_collections makes tuple fields absl MultiFlags, which append."""
    _, flag_values = parsed(*MODES_TWICE)
    assert flag_values.config.mixup.modes == ('input', 'input', 'feature', 'feature_prime',
                                              'none')
    assert isinstance(flag_values['config.mixup.modes'], flags.MultiFlag)


def test_a_repeated_tuple_field_is_an_error():
    argv, flag_values = parsed(*MODES_TWICE)
    with pytest.raises(ValueError) as raised:
        check_tuple_fields_given_once(argv, flag_values)
    assert str(raised.value) == REPEATED_MESSAGE
    argv, flag_values = parsed('--config.mixup.modes', 'input', '--config.mixup.modes=none')
    with pytest.raises(ValueError, match='given 2 times'):  # the space-separated form too
        check_tuple_fields_given_once(argv, flag_values)


def test_once_each_and_repeated_scalars_are_fine():
    # A scalar flag repeated keeps its last value, as absl does for every flag.
    argv, flag_values = parsed("--config.mixup.modes=('none',)", '--config.mixup.alpha=1.0',
                               '--config.mixup.alpha=0.5', "--config.train.evals=()")
    check_tuple_fields_given_once(argv, flag_values)
    assert flag_values.config.mixup.modes == ('none',)
    assert flag_values.config.mixup.alpha == 0.5


def test_the_training_command_stops_on_a_repeated_tuple_field(tmp_path):
    result = subprocess.run([sys.executable, '-m', 'alignmix_jax.main',
                             '--config=configs/demo.py', f'--workdir={tmp_path}', *MODES_TWICE],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f'error: {REPEATED_MESSAGE}']
    assert list(tmp_path.iterdir()) == []
