"""What every command (training, evaluation, benchmark) shares at its entry point.

    app.run(main, flags_parser=parse_flags)      a bad config override is one clear line
    logging.get_absl_handler().addFilter(hide_library_info)
    route_absl_log(absl_log_on_terminal())      a command with a console of its own (training):
                                                 absl's INFO lines to --log_dir, or to the
                                                 terminal only when asked for (-v)
    with one_line_errors():                      a mistake in the settings or the data is
        ...                                      `error: ...` and exit status 1; a run
                                                 stopped by a signal after saving, one line
                                                 and preemption.EXIT_CODE
"""

import collections
import contextlib
import functools
import importlib
import logging as python_logging
import os
import sys
import traceback

from absl import flags, logging

from alignmix_jax.runtime.output_dirs import describe_os_error

# Where the config files are: the repository's configs/ folder, which is not part of the
# installed package (its files import each other as `configs.<name>`).
# (A top-level package named `configs` in site-packages would clash with any other
# distribution's, and a config is named by its path, which an installed copy cannot give.)
CONFIGS_WHERE = ('the config files are in the configs/ folder of the alignmix_jax repository, '
                 'not in the installed package: run the command from the root of a checkout')
CONFIGS_HINT = (f'{CONFIGS_WHERE}, '
                'e.g. `python -m alignmix_jax.main --config=configs/demo.py --workdir=DIR`')


def repository_configs(name: str):
    """The module `configs.<name>` of the repository's configs/ folder (the commands that
    build their own configs import them when they run, never at import, so that `--help`
    works anywhere). Outside a checkout: SystemExit with one `error:` line saying where the
    folder is, wherever the call happens (inside `one_line_errors()` or not)."""
    try:
        return importlib.import_module(f'configs.{name}')
    except ModuleNotFoundError as error:
        if error.name not in ('configs', f'configs.{name}'):
            raise  # a config module's own import failed: its traceback says which
        raise SystemExit(f'error: cannot import configs.{name} (from {os.getcwd()}); '
                         f'{CONFIGS_WHERE}') from None


def config_arguments(argv) -> list[str]:
    """The values of `--config=PATH[:VARIANT]` or `--config PATH[:VARIANT]` in `argv`."""
    values = []
    for index, argument in enumerate(argv):
        if argument.startswith('--config='):
            values.append(argument.removeprefix('--config='))
        elif argument == '--config' and index + 1 < len(argv):
            values.append(argv[index + 1])
    return values


def config_paths(argv) -> list[str]:
    """The config files named by `--config=PATH[:VARIANT]` or `--config PATH` in `argv`."""
    return [value.split(':', 1)[0] for value in config_arguments(argv)]


def parse_flags(argv):
    """absl's flag parsing, with one clear line for a bad config override or config file."""
    missing = [path for path in config_paths(argv) if not os.path.isfile(path)]
    if missing:
        raise SystemExit(f'error: no config file {missing[0]} (from {os.getcwd()}); '
                         f'{CONFIGS_HINT}')
    try:
        arguments = flags.FLAGS(argv)
        check_tuple_fields_given_once(argv)
        return arguments
    except Exception as error:
        message = config_file_error(error, config_arguments(argv)) or _override_error(error)
        if message is None:
            raise
        raise SystemExit(f'error: {message}') from None


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from or while handling, outermost first."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def config_file_error(error: BaseException, config_values: list[str]) -> str | None:
    """One line for an error of the config file itself (None for any other error): a syntax
    error (its file and line), a failed import, an exception of `get_config` (its message and
    line: the configs' own errors name the valid variants), a variant given to a config that
    takes none. ml_collections wraps get_config's TypeError and ValueError in one whose message
    is the whole traceback; the error it wraps is the one reported."""
    if not config_values:
        return None
    value = config_values[0]
    path, _, variant = value.partition(':')
    chain = _chain(error)
    if isinstance(chain[-1], ModuleNotFoundError) and (
            chain[-1].name == 'configs' or (chain[-1].name or '').startswith('configs.')):
        # A config file found by its path, imported with the repository not on sys.path.
        return f'the config file imports the package {chain[-1].name!r}; {CONFIGS_HINT}'
    syntax = next((cause for cause in chain if isinstance(cause, SyntaxError)), None)
    if syntax is not None:
        return (f'the config file {value} does not load: {syntax.msg} in {syntax.filename}, '
                f'line {syntax.lineno}')
    # Frames in the config file's folder (it may import its neighbours: configs/methods.py).
    folder = os.path.dirname(os.path.realpath(path))
    for cause in reversed(chain):  # the innermost error first
        frames = [frame for frame in traceback.extract_tb(cause.__traceback__)
                  if os.path.dirname(os.path.realpath(frame.filename)) == folder]
        if not frames:
            continue
        where = f'{frames[-1].filename}, line {frames[-1].lineno}'
        reason = ' '.join(str(cause).split()) or type(cause).__name__
        if isinstance(cause, ImportError):
            return (f'the config file {value} does not load: {reason} ({where}); install the '
                    f'package or fix the import')
        return f'the config file {value} failed: {type(cause).__name__}: {reason} ({where})'
    if variant and any(isinstance(cause, TypeError) and 'get_config()' in str(cause)
                       and 'positional argument' in str(cause) for cause in chain):
        return f'the config file {path} takes no :variant (got {variant!r}): leave it out'
    if any(isinstance(cause, AttributeError) and "attribute 'get_config'" in str(cause)
           for cause in chain):
        return (f'{path} is not a config file (it has no get_config()); the config files '
                f'are configs/<dataset>.py, e.g. configs/cifar10.py')
    return None


def _override_error(error: BaseException) -> str | None:
    """The line for a bad override on the command line, or None for any other error."""
    if isinstance(error, (flags.Error, ValueError)):  # e.g. a value of the wrong type
        return str(error)
    if isinstance(error, (AttributeError, KeyError)):
        # ml_collections reports a field that does not exist as a KeyError (wrapped in an
        # AttributeError) whose message is the field name plus a "Did you mean" line.
        message = error
        while isinstance(message, BaseException) and message.args:
            message = message.args[0]
        detail = ' '.join(str(message).split())
        return f'no config field {detail}; the fields are listed in configs/default.py'
    return None


def check_tuple_fields_given_once(argv, flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """ValueError when a tuple field of the config is given more than once.

    ml_collections makes each tuple field an absl MultiFlag (so that `--f=1 --f=2` builds
    (1, 2)): every occurrence is appended to the ones before, and
    `--f="('a','b')" --f="('c',)"` silently gives ('a', 'b', 'c'). Every other flag keeps
    its last value; rather than guess which of the two a repetition means, it is an error.
    """
    names = []
    for argument in argv[1:]:
        if argument == '--':  # the rest are positional arguments
            break
        if argument.startswith('-'):
            names.append(argument.lstrip('-').split('=', 1)[0])
    for name, count in collections.Counter(names).items():
        if count > 1 and '.' in name and name in flag_values and \
                isinstance(flag_values[name], flags.MultiFlag):
            raise ValueError(f'--{name} is given {count} times; give a tuple field once, '
                             f'whole: --{name}="(\'a\',\'b\')" (repeated, its values would '
                             f'be joined into one tuple)')


# orbax's warning that says nothing is wrong: that the evaluation's manager is read-only, as
# asked.
_ORBAX_NOTES = ('Given directory is read only',)


def hide_library_info(record: python_logging.LogRecord) -> bool:
    """Keeps the console to our progress: orbax logs every save and restore at INFO level, and
    a failed save as a traceback from each of its threads (and asyncio one per task it left
    behind), which the command reports as one `error:` line instead (the tracebacks are at
    debug level, `--verbosity=1`); its _ORBAX_NOTES are hidden too."""
    from_orbax = '/orbax/' in record.pathname
    if (from_orbax and record.exc_info) or (record.name == 'asyncio' and (
            '/orbax/' in _message(record) or _raised_in_orbax(record))):
        return False
    if from_orbax and _message(record).startswith(_ORBAX_NOTES):
        return False
    return record.levelno >= python_logging.WARNING or not from_orbax


def _raised_in_orbax(record: python_logging.LogRecord) -> bool:
    """Whether the record's exception passed through orbax's code: asyncio reports a task's
    exception with the task's source in the message, but a gathering future's (the writes of
    one save) only with the exception, whose traceback runs through orbax."""
    if not record.exc_info or record.exc_info[2] is None:
        return False
    return any('/orbax/' in frame.filename
               for frame in traceback.extract_tb(record.exc_info[2]))


def absl_log_on_terminal(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
    """Whether absl's INFO lines were asked for on the terminal: `--logtostderr`,
    `--alsologtostderr`, or `-v`/`--verbosity` without a `--log_dir` to take them."""
    return bool(flag_values['logtostderr'].value or flag_values['alsologtostderr'].value
                or (flag_values['verbosity'].present and not flag_values['log_dir'].value))


def route_absl_log(on_terminal: bool) -> None:
    """Where absl's log goes in a command that shows its progress on a console of its own
    (alignmix_jax/runtime/console.py): its INFO lines (every metric, each prefixed with a
    timestamp and a thread id) to a file in `--log_dir` when one is given (absl's own
    `INFO.<time>.<pid>` files; warnings and errors also on the terminal), else to the terminal
    only when `on_terminal` (`absl_log_on_terminal`). Warnings and errors always reach the
    terminal, except matplotlib's start-up warnings (a font cache being built, a temporary
    config folder: it is imported by ott-jax, and draws nothing in training), shown with -v."""
    handler = logging.get_absl_handler()
    to_file = bool(flags.FLAGS.log_dir) and not flags.FLAGS.logtostderr
    if to_file:
        if not flags.FLAGS['stderrthreshold'].present:
            flags.FLAGS.stderrthreshold = 'warning'
        handler.use_absl_log_file()
    handler.addFilter(functools.partial(keep_on_quiet_terminal, on_terminal=on_terminal,
                                        to_file=to_file))


def keep_on_quiet_terminal(record: python_logging.LogRecord, *, on_terminal: bool,
                           to_file: bool) -> bool:
    """`route_absl_log`'s filter: whether absl's handler writes `record` (to its file, and to
    the terminal as absl's --stderrthreshold says)."""
    if on_terminal:
        return True
    if record.name == 'matplotlib' or record.name.startswith('matplotlib.'):
        return record.levelno >= python_logging.ERROR
    return to_file or record.levelno >= python_logging.WARNING


def _message(record: python_logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # a malformed record is not ours to judge
        return ''


# The user-error classes beside ValueError: (module, class name).
_USER_ERROR_CLASSES = (('alignmix_jax.runtime.checkpointing', 'CheckpointError'),
                       ('alignmix_jax.data.common', 'DatasetError'),
                       ('alignmix_jax.runtime.workdir_lock', 'WorkdirLockedError'))


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors a user causes through the config, the data or the workdir, each raised with
    a message that says what to do. ValueError is every setting (config_checks) and every
    data-dependent size check; WorkdirLockedError, another run in the workdir. The other
    classes are taken only from modules already imported (an error of a module never imported
    cannot have been raised), so a bad setting is reported without importing JAX or TensorFlow,
    which those modules import."""
    return (ValueError, FloatingPointError) + tuple(
        getattr(sys.modules[module], name) for module, name in _USER_ERROR_CLASSES
        if module in sys.modules)


@contextlib.contextmanager
def one_line_errors():
    """Turns the user's errors, and any OSError (a file system's: full, read-only, a missing
    share), into one `error: <message>` line on stderr and exit status 1.

    The traceback is still logged at debug level (`--verbosity=1` shows it), for the rare
    ValueError that is a bug rather than a bad setting.
    """
    previous_hook = sys.unraisablehook
    sys.unraisablehook = functools.partial(_hide_closed_event_loops, previous_hook)
    try:
        yield
    except Exception as error:
        preempted = getattr(sys.modules.get('alignmix_jax.runtime.preemption'), 'Preempted', ())
        if preempted and isinstance(error, preempted):  # saved; the same command resumes
            print(error, file=sys.stderr)
            raise SystemExit(error.exit_code) from None
        if isinstance(error, _user_errors()):
            message = str(error)
        elif isinstance(error, OSError):  # a file system's refusal: the path and the reason
            message = describe_os_error(error)
        else:
            raise
        logging.debug('the error above, with its traceback', exc_info=True)
        raise SystemExit(f'error: {message}') from None
    finally:
        sys.unraisablehook = previous_hook


def _hide_closed_event_loops(previous_hook, unraisable) -> None:
    """After a failed save, TensorStore still calls back into the asyncio loop orbax ran it
    in and has closed: each callback's 'Event loop is closed' would print a traceback, while
    the failure itself is reported as one line. Those go to the debug log; anything else
    to the previous hook."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == 'Event loop is closed':
        logging.debug('a callback into a closed event loop: %r', error)
        return
    previous_hook(unraisable)
