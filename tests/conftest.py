import os

import numpy as np
import pytest

from llmpy import backends
from llmpy.errors import LlmpyError


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run the large (124M) checks")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="large check: opt in with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def configure_gpu_backend():
    """Where there is no GPU, the gpu backend's Triton kernels run in Triton's CPU interpreter,
    which must be chosen before triton is imported. The shared tests hold every backend to
    float32 tolerances, so the gpu backend computes in float32 here; test_gpu.py checks bf16."""
    try:
        import torch
    except ImportError:
        return
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("LLMPY_GPU_DTYPE", "float32")


def available_backends():
    """Every backend whose dependencies import here; each runs the same op tests."""
    out = []
    for name in backends.BACKENDS:
        try:
            out.append(backends.get_backend(name))
        except LlmpyError:
            pass
    return out


# The process starts here: the environment the backends want, before any of them loads.
backends.set_thread_env()
configure_gpu_backend()
BACKENDS = available_backends()
# The dtypes each backend's kernels are tested in: the reference also runs the float64 checks.
# The shared op tests compare with float64 at float32 tolerance; tests/test_gpu.py checks
# float16 (interpreter) and bf16 (GPU) with their own tolerances.
TEST_DTYPES = {"numpy": (np.float64, np.float32)}


def backend_dtypes():
    """(backend, dtype) pairs: every backend in float32, and in TEST_DTYPES's other dtypes."""
    return [pytest.param((be, dt), id=f"{be.name}-{np.dtype(dt).name}")
            for be in BACKENDS for dt in TEST_DTYPES.get(be.name, (np.float32,))]


@pytest.fixture(scope="session")
def gpt2_reference():
    """tiktoken's own GPT-2 (r50k_base) Encoding, offline: tiktoken's constructor, pattern and
    special tokens, with its ranks file read from the bundled copy, whose sha256 must equal the
    one tiktoken expects for the download."""
    import hashlib
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import load_tiktoken_bpe
    from llmpy.data.loader import bundled_data
    path = bundled_data("gpt2.tiktoken")

    def load_bundled(url, expected_hash):
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected_hash, f"{path} is not {url}"
        return load_tiktoken_bpe(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", load_bundled)
        return tiktoken.Encoding(**openai_public.r50k_base())
