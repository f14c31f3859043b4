"""Bad input is reported as one clear line, not a traceback: the CLI catches LlmpyError."""


class LlmpyError(Exception):
    """An error in the user's input (a file, a flag, a token id), with a one-line message."""
