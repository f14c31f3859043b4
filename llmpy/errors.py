"""Bad input is reported as one clear line, not a traceback: the CLI catches LlmpyError."""


class LlmpyError(Exception):
    """An error in the user's input (a file, a flag, a token id), with a one-line message."""


def first_line(e):
    """An exception's first line of text, for one-line messages about a library's error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
