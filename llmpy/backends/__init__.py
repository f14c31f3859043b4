"""Backends implement the same <op>_forward/<op>_backward functions; the model receives one."""
import importlib

from ..errors import LlmpyError

BACKENDS = ("numpy", "cpu", "gpu")


def get_backend(name):
    """The backend module called `name`; "auto" is cpu where numba and scipy import, else numpy."""
    if name == "auto":
        try:
            return importlib.import_module(f"{__name__}.cpu")
        except ImportError:
            return importlib.import_module(f"{__name__}.numpy")
    if name not in BACKENDS:
        raise LlmpyError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError as e:
        raise LlmpyError(f"backend {name!r} is not available: {e}") from None
