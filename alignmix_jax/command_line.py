"""What every command (training, evaluation, benchmark) shares at its entry point.

    app.run(main, flags_parser=parse_flags)      a bad config override is one clear line
    logging.get_absl_handler().addFilter(hide_library_info)
"""

import logging as python_logging

from absl import flags


def parse_flags(argv):
    """absl's flag parsing, with one clear line for a bad config override."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # e.g. a value of the wrong type
        raise SystemExit(f'error: {error}') from None
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
