"""The cpu backend (Numba + BLAS) against the NumPy reference backend on a whole model: logits,
loss, the 16 gradients and 10 AdamW steps; and the `auto` backend choice.

Both sides compute in float32 and sum in different orders (BLAS blocking, float64 accumulators
in the cpu kernels), so they agree to rounding, not bit for bit: 1e-5 of the largest value per
tensor is about 100 ulps (measured: ~1e-6).
"""
import importlib
import sys

import numpy as np
import pytest

from llmpy.backends import baseline_env, get_backend, set_thread_env
from llmpy.model.gpt2 import GPT2, load_params, param_shapes
from llmpy.train.optim import AdamW, AdamWConfig
from test_gpt2 import CFG, batch, random_weights, rel_err

cpu = pytest.importorskip("llmpy.backends.cpu")
ref = get_backend("numpy")
TOL = 1e-5


def pair(flat):
    """The same weights on both backends."""
    models = GPT2(CFG, cpu.make()), GPT2(CFG, ref)
    for m in models:
        load_params(m, flat)
    return models


def test_forward_backward_matches_numpy():
    x, y = batch(CFG, 3, 11)
    fast, slow = pair(random_weights(CFG))
    losses = []
    for m in (fast, slow):
        losses.append(m.forward(x, y))
        m.zero_grad()
        m.backward()
    assert abs(losses[0] - losses[1]) <= TOL * losses[1]
    V = CFG.vocab_size
    assert rel_err(fast.acts.logits[..., :V], slow.acts.logits[..., :V]) <= TOL
    assert rel_err(fast.acts.probs, slow.acts.probs) <= TOL
    for name, _ in param_shapes(CFG):
        assert rel_err(getattr(fast.grads, name), getattr(slow.grads, name)) <= TOL, name


def test_adamw_steps_match_numpy():
    x, y = batch(CFG, 4, 16, seed=3)
    lr = 1e-3
    models = pair(random_weights(CFG, seed=2))
    opts = [AdamW(m, AdamWConfig(lr=lr, weight_decay=0.01)) for m in models]
    for step in range(10):
        losses = []
        for m, opt in zip(models, opts):
            losses.append(m.forward(x, y))
            m.zero_grad()
            m.backward()
            opt.update()
        assert abs(losses[0] - losses[1]) <= TOL * losses[1], f"step {step}"
    # Adam moves every weight by about lr per step whatever its gradient's size, so a wrong
    # update shows as an O(lr) difference, while Adam turns the rounding differences of tiny
    # gradients into differences of up to ~0.01 lr (measured 0.007 lr, in fcw; float32 itself,
    # numpy and torch alike, is ~1e-4 relative off a float64 run here).
    fast, slow = models[0].params, models[1].params
    C = CFG.channels
    for name, _ in param_shapes(CFG):
        a, b = getattr(fast, name), getattr(slow, name)
        if name == "qkvb":
            # The key bias's true gradient is exactly zero (softmax ignores a per-row constant):
            # both sides move it by rounding noise only, which Adam scales to steps of ~lr.
            assert np.abs(a[:, C:2 * C] - b[:, C:2 * C]).max() <= 10 * lr
            a, b = np.delete(a, np.s_[C:2 * C], axis=1), np.delete(b, np.s_[C:2 * C], axis=1)
        assert np.abs(a - b).max() <= lr / 20, name


@pytest.mark.parametrize("with_bias", [True, False])
def test_one_row_matmul_matches_numpy(with_bias):
    """One position (sampling) takes a matrix-vector kernel instead of BLAS."""
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((1, 1, 37), (53, 37), (53,)))
    outs = [np.zeros((1, 1, 53), np.float32) for _ in range(2)]
    for be, out in zip((cpu, ref), outs):
        be.matmul_forward(out, x, w, b if with_bias else None)
    assert rel_err(*outs) <= TOL


def test_auto_is_cpu_and_falls_back_to_numpy(monkeypatch):
    assert get_backend("auto").name == "cpu"
    # without numba the cpu backend cannot import, so it is unavailable and auto means numpy
    monkeypatch.setitem(sys.modules, "numba", None)
    monkeypatch.delitem(sys.modules, "llmpy.backends.cpu")
    with pytest.raises(ImportError):
        importlib.import_module("llmpy.backends.cpu")
    assert get_backend("auto").name == "numpy"


def test_thread_env_keeps_the_users_settings_and_baselines_run_without_ours():
    """set_thread_env adds only what the user left unset (their OMP_WAIT_POLICY stands for the
    spin count), and baseline_env takes back exactly what it added."""
    env = {"PATH": "/bin"}
    set_thread_env(env)
    assert env["GOMP_SPINCOUNT"] == "500" and env["OPENBLAS_THREAD_TIMEOUT"] == "4"
    set_thread_env(env)                                 # a worker of this process: no change
    assert baseline_env(env) == {"PATH": "/bin"}
    env = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "8"}
    set_thread_env(env)
    assert "GOMP_SPINCOUNT" not in env and baseline_env(env) == {
        "OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_THREAD_TIMEOUT": "8"}
