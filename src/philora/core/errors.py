"""The one exception type for user mistakes: the CLI prints its one-line message, no traceback."""


class PhiloraError(ValueError):
    """Bad input (config, data, adapter, model choice); the message is one line naming what."""


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none):
    library errors often carry pages of context that would bury our one-line message."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
