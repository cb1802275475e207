"""The one exception type for user mistakes: the CLI prints its one-line message, no traceback."""


class PhiloraError(ValueError):
    """Bad input (config, data, adapter, model choice); the message is one line naming what."""
