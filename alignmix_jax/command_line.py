"""What every command (training, evaluation, benchmark) shares at its entry point.

    app.run(main, flags_parser=parse_flags)      a bad config override is one clear line
    logging.get_absl_handler().addFilter(hide_library_info)
"""

import logging as python_logging
import os

from absl import flags

# Where the config files are: the repository's configs/ folder, which is not part of the
# installed package (its files import each other as `configs.<name>`).
CONFIGS_HINT = ('the config files are in the configs/ folder of the alignmix_jax repository, '
                'not in the installed package: run the command from the root of a checkout, '
                'e.g. `python -m alignmix_jax.main --config=configs/demo.py --workdir=DIR`')


def config_paths(argv) -> list[str]:
    """The config files named by `--config=PATH[:VARIANT]` or `--config PATH` in `argv`."""
    paths = []
    for index, argument in enumerate(argv):
        if argument.startswith('--config='):
            paths.append(argument.removeprefix('--config='))
        elif argument == '--config' and index + 1 < len(argv):
            paths.append(argv[index + 1])
    return [path.split(':', 1)[0] for path in paths]


def parse_flags(argv):
    """absl's flag parsing, with one clear line for a bad config override or config file."""
    missing = [path for path in config_paths(argv) if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f'error: no config file {missing[0]} (from {os.getcwd()}); '
                         f'{CONFIGS_HINT}')
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # e.g. a value of the wrong type
        raise SystemExit(f'error: {error}') from None
    except ModuleNotFoundError as error:
        if error.name != 'configs' and not (error.name or '').startswith('configs.'):
            raise
        # A config file found by its path, imported with the repository not on sys.path.
        raise SystemExit(f'error: the config file imports the package {error.name!r}; '
                         f'{CONFIGS_HINT}') from None
    except (AttributeError, KeyError) as error:
        # ml_collections reports a field that does not exist as a KeyError (wrapped in an
        # AttributeError) whose message is the field name plus a "Did you mean" line.
        message = error
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        detail = ' '.join(str(message).split())
        raise SystemExit(f'error: no config field {detail}; the fields are listed in '
                         f'configs/default.py') from None


def hide_library_info(record: python_logging.LogRecord) -> bool:
    """Keeps the console to our progress: orbax logs every save and restore at INFO level."""
    return record.levelno >= python_logging.WARNING or '/orbax/' not in record.pathname
