"""The one exception type that the CLI turns into a one-line message, and how other errors become one line."""


class UserError(Exception):
    """Bad input or environment: shown to the user as one line, without a traceback."""


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
