"""Command-line parsing shared by the entry points: a bad config override is one clear line.

    app.run(main, flags_parser=parse_flags)
"""

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
