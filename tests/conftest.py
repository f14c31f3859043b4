import importlib

import numpy as np
import pytest


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the large (124M) checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="large check: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def available_backends():
    """Every backend whose dependencies import here; each runs the same op tests."""
    out = []
    for name in ("numpy", "cpu", "gpu"):
        try:
            out.append(importlib.import_module(f"llmpy.backends.{name}"))
        except ImportError:
            pass
    return out


BACKENDS = available_backends()


def backend_dtypes():
    """(backend, dtype) pairs: a backend lists the dtypes its kernels run in `test_dtypes`."""
    return [pytest.param((be, dt), id=f"{be.name}-{np.dtype(dt).name}")
            for be in BACKENDS for dt in getattr(be, "test_dtypes", (np.float32,))]
