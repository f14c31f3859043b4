"""Finite differences in float64 on tiny odd shapes: each backward is the derivative of its forward.

For an op y = f(x) and a fixed random R, the scalar s = sum(y * R) has ds/dx = backward(dout=R).
Central differences of s approximate that to ~1e-9 in float64.
"""
import numpy as np
import pytest

from llmpy.backends import numpy as ref

B, T, C, NH, V, Vp, maxT = 2, 3, 6, 2, 5, 8, 4
rng = np.random.default_rng(0)


def numeric_grad(loss, x, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + h
        up = loss()
        x[i] = old - h
        down = loss()
        x[i] = old
        g[i] = (up - down) / (2 * h)
    return g


def gradcheck(forward, backward, inputs, out_shape):
    """forward(out, **inputs); backward(dout, grads) adds d(sum(out*dout))/d(input) into grads."""
    R = rng.standard_normal(out_shape)
    out = np.zeros(out_shape)

    def loss():
        forward(out, **inputs)
        return float((out * R).sum())

    loss()                                     # forward state (e.g. saved stats) for backward
    grads = {k: np.zeros_like(v) for k, v in inputs.items() if v.dtype == np.float64}
    backward(R, grads)
    for name, g in grads.items():
        num = numeric_grad(loss, inputs[name])
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8, err_msg=name)


def randn(*shape):
    return rng.standard_normal(shape)


def test_encoder():
    inp = np.array([[1, 4, 1], [0, 4, 2]])
    p = dict(wte=randn(Vp, C), wpe=randn(maxT, C))
    gradcheck(lambda out, wte, wpe: ref.encoder_forward(out, inp, wte, wpe),
              lambda d, g: ref.encoder_backward(g["wte"], g["wpe"], d, inp), p, (B, T, C))


def test_layernorm():
    p = dict(inp=randn(B, T, C), weight=randn(C), bias=randn(C))
    mean, rstd = np.zeros((B, T)), np.zeros((B, T))
    gradcheck(lambda out, inp, weight, bias: ref.layernorm_forward(out, mean, rstd, inp, weight, bias),
              lambda d, g: ref.layernorm_backward(g["inp"], g["weight"], g["bias"], d, p["inp"],
                                                  p["weight"], mean, rstd), p, (B, T, C))


def test_matmul():
    p = dict(inp=randn(B, T, C), weight=randn(5, C), bias=randn(5))
    gradcheck(ref.matmul_forward,
              lambda d, g: ref.matmul_backward(g["inp"], g["weight"], g["bias"], d, p["inp"],
                                               p["weight"]), p, (B, T, 5))


def test_attention():
    p = dict(inp=randn(B, T, 3 * C))
    pre, att = np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
    gradcheck(lambda out, inp: ref.attention_forward(out, pre, att, inp),
              lambda d, g: ref.attention_backward(g["inp"], np.zeros_like(pre), np.zeros_like(att),
                                                  d, p["inp"], att), p, (B, T, C))


def test_gelu():
    p = dict(inp=randn(B, T, C) * 2)
    gradcheck(ref.gelu_forward, lambda d, g: ref.gelu_backward(g["inp"], p["inp"], d), p, (B, T, C))


def test_crossentropy():
    targets = np.array([[0, 4, 2], [3, 3, 1]])
    p = dict(logits=randn(B, T, Vp))
    probs = np.zeros((B, T, Vp))
    gradcheck(lambda out, logits: ref.crossentropy_forward(out, probs, logits, targets, V),
              lambda d, g: ref.crossentropy_backward(g["logits"], d, probs, targets, V),
              p, (B, T))


@pytest.mark.parametrize("seed", [0, 1])
def test_whole_model_float64(seed):
    """The whole orchestration (model.py) in float64: d(loss)/d(param) by finite differences for
    a sample of parameters from every one of the 16 tensors."""
    from llmpy.model.layout import GPT2Config
    from llmpy.model.gpt2 import GPT2, init_weights

    from llmpy.backends import Backend

    def zeros(n, dtype=None):                  # float64 also where the model asks >= float32
        return np.zeros(n, dtype=np.float64)

    # the reference backend, allocating float64
    f64 = Backend("numpy-float64", ref, zeros=zeros, to_device=ref.to_device, to_host=ref.to_host)
    cfg = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp, num_layers=2,
                     num_heads=NH, channels=C)
    model = GPT2(cfg, f64)
    init_weights(model, seed)
    r = np.random.default_rng(seed)
    model.params.buf += r.normal(0, 0.1, len(model.params))   # LN/bias params away from 1 and 0
    x, y = r.integers(0, V, (B, T)), r.integers(0, V, (B, T))
    model.forward(x, y)
    model.zero_grad()
    model.backward()
    for name, p in model.params.items():
        g = getattr(model.grads, name).ravel()
        flat = p.reshape(-1)
        for i in r.choice(flat.size, size=min(4, flat.size), replace=False):
            if name == "wte" and i >= V * C:
                continue                       # padded rows: no gradient by construction
            old = flat[i]
            flat[i] = old + 1e-6
            up = model.forward(x, y)
            flat[i] = old - 1e-6
            down = model.forward(x, y)
            flat[i] = old
            np.testing.assert_allclose(g[i], (up - down) / 2e-6, rtol=1e-5, atol=1e-8,
                                       err_msg=f"{name}[{i}]")
        if name == "wte":
            assert not g[V * C:].any(), "padded wte rows must get no gradient"
