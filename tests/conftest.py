import importlib
import os

import numpy as np
import pytest

from llmpy import backends


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
            out.append(importlib.import_module(f"llmpy.backends.{name}"))
        except ImportError:
            pass
    return out


configure_gpu_backend()
BACKENDS = available_backends()


def backend_dtypes():
    """(backend, dtype) pairs: a backend lists the dtypes its kernels run in `test_dtypes`."""
    return [pytest.param((be, dt), id=f"{be.name}-{np.dtype(dt).name}")
            for be in BACKENDS for dt in getattr(be, "test_dtypes", (np.float32,))]


@pytest.fixture(scope="session")
def gpt2_reference():
    """tiktoken's own GPT-2 (r50k_base) Encoding, offline: tiktoken's constructor, pattern and
    special tokens, with its ranks file read from the bundled copy, whose sha256 must equal the
    one tiktoken expects for the download."""
    import hashlib
    tiktoken = pytest.importorskip("tiktoken")
    import tiktoken_ext.openai_public as openai_public
    from tiktoken.load import load_tiktoken_bpe
    from llmpy.data import bundled_data
    path = bundled_data("gpt2.tiktoken")

    def load_bundled(url, expected_hash):
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected_hash, f"{path} is not {url}"
        return load_tiktoken_bpe(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(openai_public, "load_tiktoken_bpe", load_bundled)
        return tiktoken.Encoding(**openai_public.r50k_base())
