"""The commands' flag parsing: a tuple field given twice is an error, not a silent join."""

import logging
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from alignmix_jax.runtime.command_line import (
    check_tuple_fields_given_once,
    hide_library_info,
    repository_configs,
)
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


def config_error(config_argument, tmp_path):
    """The training command's stderr lines for `--config=config_argument` (stops at once)."""
    result = subprocess.run([sys.executable, '-m', 'alignmix_jax.main',
                             f'--config={config_argument}', f'--workdir={tmp_path / "run"}'],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert not (tmp_path / 'run').exists()
    return result.stderr.strip().splitlines()


def test_a_config_file_that_does_not_load_is_one_line(tmp_path):
    syntax = tmp_path / 'syntax.py'
    syntax.write_text('import ml_collections\n\n\ndef get_config(:\n    pass\n')
    assert config_error(syntax, tmp_path) == [
        f'error: the config file {syntax} does not load: invalid syntax in {syntax}, line 4']
    raises = tmp_path / 'raises.py'
    raises.write_text('def get_config():\n    raise RuntimeError("no such setting")\n')
    assert config_error(raises, tmp_path) == [
        f'error: the config file {raises} failed: RuntimeError: no such setting ({raises}, '
        f'line 2)']
    missing = tmp_path / 'missing.py'
    missing.write_text('import not_a_module_here\n\n\ndef get_config():\n    return None\n')
    assert config_error(missing, tmp_path) == [
        f"error: the config file {missing} does not load: No module named 'not_a_module_here' "
        f'({missing}, line 1); install the package or fix the import']


def test_an_unknown_variant_is_one_line_naming_the_valid_ones(tmp_path):
    assert config_error('configs/demo.py:nonexistent_variant', tmp_path) == [
        "error: the config file configs/demo.py:nonexistent_variant failed: ValueError: "
        "unknown demo variant 'nonexistent_variant'; the variants are \"ae\" and \"ae_flat\" "
        "(configs/demo.py, line 50)"]
    [line] = config_error('configs/cifar10.py:cutmx', tmp_path)
    assert line.startswith("error: the config file configs/cifar10.py:cutmx failed: ValueError: "
                           "unknown config variant 'cutmx'; valid: methods baseline, ")
    assert config_error('configs/imagenet.py:foo', tmp_path) == [
        "error: the config file configs/imagenet.py takes no :variant (got 'foo'): leave it out"]
    assert config_error('configs/methods.py', tmp_path) == [
        'error: configs/methods.py is not a config file (it has no get_config()); the config '
        'files are configs/<dataset>.py, e.g. configs/cifar10.py']


def test_repository_configs_imports_a_config_module_or_says_where_the_folder_is(tmp_path):
    from configs import backbones
    assert repository_configs('backbones') is backbones
    with pytest.raises(SystemExit) as missing:
        repository_configs('no_such_module')
    assert str(missing.value) == (
        f'error: cannot import configs.no_such_module (from {REPO_ROOT}); the config files '
        'are in the configs/ folder of the alignmix_jax repository, not in the installed '
        'package: run the command from the root of a checkout')
    # A config module whose own import fails is its error, not a missing folder.
    (tmp_path / 'broken_config.py').write_text('import no_such_dependency_of_a_config\n')
    import configs
    configs.__path__.append(str(tmp_path))  # a module of the configs package, for this test
    try:
        with pytest.raises(ModuleNotFoundError, match='no_such_dependency_of_a_config'):
            repository_configs('broken_config')
    finally:
        configs.__path__.remove(str(tmp_path))
        sys.modules.pop('configs.broken_config', None)


def _asyncio_record(message: str, raised_in: str) -> logging.LogRecord:
    """An asyncio ERROR record as a gathering future's exception yields: the message names no
    source file; the exception's traceback runs through the file `raised_in`."""
    code = compile('raise ValueError("RESOURCE_EXHAUSTED: No space left on device")',
                   raised_in, 'exec')
    try:
        exec(code)
    except ValueError:
        exc_info = sys.exc_info()
    return logging.LogRecord('asyncio', logging.ERROR, '/usr/lib/asyncio/base_events.py', 1,
                             message, None, exc_info)


def test_a_failed_saves_gathering_future_is_hidden_and_other_asyncio_errors_are_not():
    message = '_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture ...>'
    through_orbax = _asyncio_record(
        message, '/venv/site-packages/orbax/checkpoint/_src/serialization/serialization.py')
    elsewhere = _asyncio_record(message, '/venv/site-packages/other/library.py')
    assert hide_library_info(through_orbax) is False
    assert hide_library_info(elsewhere) is True
    # A task's exception names the task's source in the message itself.
    task = logging.LogRecord('asyncio', logging.ERROR, 'base_events.py', 1,
                             'Task exception was never retrieved\nfuture: <Task coro=<save() '
                             'at /venv/site-packages/orbax/checkpoint/async.py:10>>', None, None)
    assert hide_library_info(task) is False


def test_orbax_notes_on_a_read_only_restore_are_hidden_and_its_other_warnings_are_not():
    def orbax_warning(message, *args):
        return logging.LogRecord('absl', logging.WARNING,
                                 '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py',
                                 1, message, args, None)

    assert hide_library_info(orbax_warning('Given directory is read only=%s', '/w')) is False
    assert hide_library_info(orbax_warning('Checkpoint step 7 is incomplete')) is True
    # The same words from elsewhere are not orbax's notes.
    assert hide_library_info(logging.LogRecord('absl', logging.WARNING, '/repo/ours.py', 1,
                                               'Given directory is read only', None,
                                               None)) is True
