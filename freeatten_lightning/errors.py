"""One exception type for every mistake a user can fix: the CLI prints its message without a traceback."""


class FreeattenError(ValueError):
    """A problem with the user's input (config, data, shapes), with a message that names the fix."""
