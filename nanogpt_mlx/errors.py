"""The one exception type that the CLI turns into a one-line message."""


class UserError(Exception):
    """Bad input or environment: shown to the user as one line, without a traceback."""
