"""Backends implement the same <op>_forward/<op>_backward functions (base.OPS); the model
receives a Backend object that get_backend makes. Importing a backend changes nothing in the
process: the environment it wants is set where a process starts (set_thread_env)."""
import importlib
import os

from ..errors import LlmpyError
from .base import Backend, Capabilities  # noqa: F401  (the contract, for callers)

BACKENDS = ("numpy", "cpu", "gpu")


THREAD_ENV = "LLMPY_THREAD_ENV"      # the names of the variables set_thread_env set


def set_thread_env(environ=os.environ):
    """For the cpu backend, before numba and scipy load (they read it then), unless the user set
    them: Numba's OpenMP threads and OpenBLAS's take turns on the same cores a hundred times a
    step, and by default each pool spins for a long while after its work, on the core the other
    pool needs next (bench/RESULTS.md has what that cost a GEMM and a kernel).
    GOMP_SPINCOUNT=500 (libgomp's default is 300000): Numba's threads spin that long after a
    kernel, enough to catch the next kernel of a sampling step, and then sleep. A long spin
    makes sampling several times slower as soon as another process wants a core (a spinning
    thread holds the core that the thread it waits for needs); no spin at all loses a quarter
    of a sampling step on an idle machine, where a sleeping thread takes tens of microseconds to
    wake (bench/RESULTS.md, "Threads that wait"). OPENBLAS_THREAD_TIMEOUT=4 (2^4 cycles) lets
    OpenBLAS's threads sleep at once.
    Called by the CLI's main, the benchmark workers and the tests' conftest; if scipy's BLAS
    was loaded earlier, its timeout keeps its default and only speed differs. The names it set
    go into LLMPY_THREAD_ENV, so that a baseline's process can run without them
    (baseline_env)."""
    wanted = {"OPENBLAS_THREAD_TIMEOUT": "4"}
    if "OMP_WAIT_POLICY" not in environ:         # a GOMP_SPINCOUNT would override the user's
        wanted["GOMP_SPINCOUNT"] = "500"
    added = [k for k in wanted if k not in environ]
    for k in added:
        environ[k] = wanted[k]
    if added:
        environ[THREAD_ENV] = ",".join(added)


def baseline_env(environ=os.environ):
    """A copy of environ without what set_thread_env added: PyTorch's threads in a benchmark's
    baseline run as they would for its user."""
    env = dict(environ)
    for k in env.pop(THREAD_ENV, "").split(","):
        env.pop(k, None)
    return env


def host_ops(backend):
    """The backend whose ops a decoder on the host runs: `backend` where its arrays are NumPy
    arrays (caps.host_arrays), else the fastest CPU backend."""
    return backend if backend.caps.host_arrays else get_backend("auto")


def get_backend(name, **options):
    """A new Backend: `name` is numpy, cpu, gpu, or auto (cpu where numba and scipy import,
    else numpy). options go to the backend's make(), e.g. get_backend("gpu", dtype="float32")."""
    if name == "auto":
        try:
            module = importlib.import_module(f"{__name__}.cpu")
        except ImportError:
            module = importlib.import_module(f"{__name__}.numpy")
        return module.make(**options)
    if name not in BACKENDS:
        raise LlmpyError(f"unknown backend {name!r} (choose from auto, {', '.join(BACKENDS)})")
    try:
        return importlib.import_module(f"{__name__}.{name}").make(**options)
    except ImportError as e:
        raise LlmpyError(f"backend {name!r} is not available: {e}") from None
