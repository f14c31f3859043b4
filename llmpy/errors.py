"""Bad input is reported as one clear line, not a traceback: the CLI catches LlmpyError."""
import numpy as np


class LlmpyError(Exception):
    """An error in the user's input (a file, a flag, a token id), with a one-line message."""


def first_line(e):
    """An exception's first line of text, for one-line messages about a library's error."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def require_finite(values, what):
    """One line when an array holds NaN or inf (what: "PATH: the weights"): whatever is computed
    from it is garbage, and no command may print garbage and exit 0."""
    bad = values.size - int(np.isfinite(values).sum())
    if bad:
        raise LlmpyError(f"{what}: {bad:,} of {values.size:,} values are not finite (NaN or inf)")
