"""Every op, forward and backward, against torch float64 autograd on odd shapes, on every backend.

Backward ops must ADD into gradients, so every gradient buffer starts with random values and the
expected result is that start plus torch's gradient. A backend with writes_activation_grads (the
gpu backend, as llm.c's CUDA trainer) writes the gradients of matmul's, GELU's and attention's
inputs and the logits instead: there the expected result is torch's gradient alone.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_dtypes

B, T, C, NH, OC, V, Vp, maxT = 2, 5, 12, 3, 7, 23, 32, 9
TOL = {np.float64: 1e-10, np.float32: 1e-5}   # max |error| / max |reference|


class Harness:
    def __init__(self, be, dtype):
        self.be, self.dtype = be, dtype
        self.rng = np.random.default_rng(0)

    def randn(self, *shape):
        return self.rng.standard_normal(shape)

    def dev(self, x):
        """numpy -> backend array, in the test dtype (ints stay int64)."""
        x = np.asarray(x)
        return self.be.to_device(np.ascontiguousarray(
            x.astype(np.int64) if x.dtype.kind == "i" else x.astype(self.dtype)))

    def empty(self, *shape):
        return self.dev(np.zeros(shape))

    def start(self, x0):
        """What an activation gradient must still hold of its starting values x0 after a backward
        op: all of them (added into), or none on a backend that writes those gradients."""
        return 0 if self.be.caps.writes_activation_grads else x0

    def check(self, got, want, what):
        got = np.asarray(self.be.to_host(got), dtype=np.float64)
        want = want.detach().numpy() if isinstance(want, torch.Tensor) else np.asarray(want)
        err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
        assert err <= TOL[self.dtype], f"{what}: relative error {err:.3g}"


def leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


@pytest.fixture(params=backend_dtypes())
def h(request):
    return Harness(*request.param)


def test_encoder(h):
    inp = h.rng.integers(0, V, (B, T))
    inp[0, :2] = inp[1, 3]                     # repeated ids must accumulate
    wte, wpe, dout = h.randn(Vp, C), h.randn(maxT, C), h.randn(B, T, C)
    dwte0, dwpe0 = h.randn(Vp, C), h.randn(maxT, C)
    tw, tp = leaf(wte), leaf(wpe)
    ref = tw[torch.from_numpy(inp)] + tp[:T]
    ref.backward(torch.from_numpy(dout))
    out, dwte, dwpe = h.empty(B, T, C), h.dev(dwte0), h.dev(dwpe0)
    h.be.encoder_forward(out, h.dev(inp), h.dev(wte), h.dev(wpe))
    h.be.encoder_backward(dwte, dwpe, h.dev(dout), h.dev(inp))
    h.check(out, ref, "out")
    h.check(dwte, dwte0 + tw.grad.numpy(), "dwte")
    h.check(dwpe, dwpe0 + tp.grad.numpy(), "dwpe")


def test_layernorm(h):
    x, w, b, dout = h.randn(B, T, C) * 3 + 1, h.randn(C), h.randn(C), h.randn(B, T, C)
    dx0, dw0, db0 = h.randn(B, T, C), h.randn(C), h.randn(C)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ref = F.layer_norm(tx, (C,), tw, tb, eps=1e-5)
    ref.backward(torch.from_numpy(dout))
    var, mu = torch.var_mean(tx.detach(), dim=-1, unbiased=False)
    out, mean, rstd = h.empty(B, T, C), h.empty(B, T), h.empty(B, T)
    dx, dw, db = h.dev(dx0), h.dev(dw0), h.dev(db0)
    h.be.layernorm_forward(out, mean, rstd, h.dev(x), h.dev(w), h.dev(b))
    h.be.layernorm_backward(dx, dw, db, h.dev(dout), h.dev(x), h.dev(w), mean, rstd)
    h.check(out, ref, "out")
    h.check(mean, mu, "mean")
    h.check(rstd, 1 / torch.sqrt(var + 1e-5), "rstd")
    h.check(dx, dx0 + tx.grad.numpy(), "dinp")
    h.check(dw, dw0 + tw.grad.numpy(), "dweight")
    h.check(db, db0 + tb.grad.numpy(), "dbias")


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("B,T", [(B, T), (1, 3)], ids=["rows10", "rows3"])  # 3: sampling's few
def test_matmul(h, with_bias, B, T):
    x, w, b, dout = h.randn(B, T, C), h.randn(OC, C), h.randn(OC), h.randn(B, T, OC)
    dx0, dw0, db0 = h.randn(B, T, C), h.randn(OC, C), h.randn(OC)
    tx, tw, tb = leaf(x), leaf(w), leaf(b)
    ref = F.linear(tx, tw, tb if with_bias else None)
    ref.backward(torch.from_numpy(dout))
    out, dx, dw, db = h.empty(B, T, OC), h.dev(dx0), h.dev(dw0), h.dev(db0)
    h.be.matmul_forward(out, h.dev(x), h.dev(w), h.dev(b) if with_bias else None)
    h.be.matmul_backward(dx, dw, db if with_bias else None, h.dev(dout), h.dev(x), h.dev(w))
    h.check(out, ref, "out")
    h.check(dx, h.start(dx0) + tx.grad.numpy(), "dinp")
    h.check(dw, dw0 + tw.grad.numpy(), "dweight")
    h.check(db, db0 + (tb.grad.numpy() if with_bias else 0), "dbias")


def torch_attention(qkv):
    # qkv: (B,T,3C) -> y (B,T,C), att (B,NH,T,T), lse (B,NH,T) the logsumexp of each score row
    q, k, v = (t.reshape(B, T, NH, C // NH).transpose(1, 2) for t in qkv.split(C, dim=-1))
    pre = (q @ k.transpose(-1, -2)) / np.sqrt(C // NH)
    pre = pre.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    att = pre.softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, C), att, pre.logsumexp(-1)


def test_attention(h):
    qkv, dout, dqkv0 = h.randn(B, T, 3 * C), h.randn(B, T, C), h.randn(B, T, 3 * C)
    tq = leaf(qkv)
    ref, ref_att, ref_lse = torch_attention(tq)
    ref.backward(torch.from_numpy(dout))
    out, dqkv = h.empty(B, T, C), h.dev(dqkv0)
    if h.be.caps.fused:   # flash attention keeps a logsumexp per row, no (T,T)
        lse = h.empty(B, NH, T)
        h.be.attention_forward(out, lse, h.dev(qkv))
        h.be.attention_backward(dqkv, h.dev(dout), h.dev(qkv), out, lse)
        h.check(lse, ref_lse, "lse")
    else:
        preatt, att = h.empty(B, NH, T, T), h.empty(B, NH, T, T)
        dpreatt, datt = h.empty(B, NH, T, T), h.empty(B, NH, T, T)
        h.be.attention_forward(out, preatt, att, h.dev(qkv))
        h.be.attention_backward(dqkv, dpreatt, datt, h.dev(dout), h.dev(qkv), att)
        h.check(att, ref_att, "att")
    h.check(out, ref, "out")
    h.check(dqkv, h.start(dqkv0) + tq.grad.numpy(), "dinp")


def test_gelu(h):
    x, dout, dx0 = h.randn(B, T, 4 * C) * 2, h.randn(B, T, 4 * C), h.randn(B, T, 4 * C)
    tx = leaf(x)
    ref = F.gelu(tx, approximate="tanh")
    ref.backward(torch.from_numpy(dout))
    out, dx = h.empty(B, T, 4 * C), h.dev(dx0)
    h.be.gelu_forward(out, h.dev(x))
    h.be.gelu_backward(dx, h.dev(x), h.dev(dout))
    h.check(out, ref, "out")
    h.check(dx, h.start(dx0) + tx.grad.numpy(), "dinp")


def test_residual(h):
    """The reference's residual add, which its fused residual_layernorm_forward calls (the
    models call only the fused ops, so the other backends have none)."""
    if h.be.name != "numpy":
        pytest.skip("only the NumPy reference has a residual_forward")
    from llmpy.backends.numpy import residual_forward
    a, b = h.randn(B, T, C), h.randn(B, T, C)
    out = h.empty(B, T, C)
    residual_forward(out, h.dev(a), h.dev(b))
    h.check(out, a + b, "out")


def test_residual_layernorm(h):
    # forward only: its backward is layernorm_backward into the residual stream's gradient
    a, b, w, bias = h.randn(B, T, C) * 3, h.randn(B, T, C) + 1, h.randn(C), h.randn(C)
    s = torch.tensor(a + b)
    var, mu = torch.var_mean(s, dim=-1, unbiased=False)
    res, out, mean, rstd = h.empty(B, T, C), h.empty(B, T, C), h.empty(B, T), h.empty(B, T)
    h.be.residual_layernorm_forward(res, out, mean, rstd, h.dev(a), h.dev(b), h.dev(w),
                                    h.dev(bias))
    h.check(res, s, "residual")
    h.check(out, F.layer_norm(s, (C,), torch.tensor(w), torch.tensor(bias), eps=1e-5), "out")
    h.check(mean, mu, "mean")
    h.check(rstd, 1 / torch.sqrt(var + 1e-5), "rstd")


def test_crossentropy(h):
    logits, targets = h.randn(B, T, Vp) * 3, h.rng.integers(0, V, (B, T))
    dlosses, dlogits0 = h.randn(B, T), h.randn(B, T, Vp)
    tl = leaf(logits)
    ref = F.cross_entropy(tl[..., :V].reshape(-1, V), torch.from_numpy(targets).reshape(-1),
                          reduction="none").reshape(B, T)
    ref.backward(torch.from_numpy(dlosses))
    losses, dlogits = h.empty(B, T), h.dev(dlogits0)
    if h.be.caps.fused:   # the fused classifier keeps a logsumexp per row
        lse = h.empty(B, T)
        h.be.crossentropy_forward(losses, lse, h.dev(logits), h.dev(targets), V)
        h.be.crossentropy_backward(dlogits, h.dev(dlosses), h.dev(logits), lse, h.dev(targets), V)
        h.check(lse, tl[..., :V].logsumexp(-1), "lse")
    else:
        probs = h.empty(B, T, Vp)
        h.be.crossentropy_forward(losses, probs, h.dev(logits), h.dev(targets), V)
        h.be.crossentropy_backward(dlogits, h.dev(dlosses), probs, h.dev(targets), V)
        h.check(probs[..., :V], tl[..., :V].softmax(-1), "probs")
    h.check(losses, ref, "losses")
    # the padded logits take no part: their gradient is 0 where written, else left as it was
    h.check(dlogits, h.start(dlogits0) + tl.grad.numpy(), "dlogits")


@pytest.mark.parametrize("grad_scale", [1.0, 0.37])    # 0.37: clipping, fused into the update
def test_adamw(h, grad_scale):
    n, kw = 37, dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    p0 = h.randn(n)
    tp = leaf(p0)
    opt = torch.optim.AdamW([tp], **kw)
    p, g, m, v = h.dev(p0), h.empty(n), h.empty(n), h.empty(n)
    for step in range(1, 4):
        grad = h.randn(n)
        # gradients of ~1e-9, whose sqrt(v) is below eps = 1e-8: there eps sets the step
        # (~lr/10, not ~lr), so a backend that drops or misplaces eps is off by ~lr
        grad[:5] *= 1e-9
        tp.grad = torch.tensor(grad) * grad_scale
        opt.step()
        g = h.dev(grad)
        h.be.adamw_update(p, g, m, v, step, kw["lr"], *kw["betas"], kw["eps"], kw["weight_decay"],
                          grad_scale)
        h.check(p, tp, f"params after step {step}")
        # Adam's step hardly depends on a constant gradient scale: the moments show it
        h.check(m, opt.state[tp]["exp_avg"], f"m after step {step}")
        h.check(v, opt.state[tp]["exp_avg_sq"], f"v after step {step}")
        h.check(g, grad, "grads (left unscaled)")


def test_sum_squares(h):
    x = h.randn(1001)
    assert abs(h.be.sum_squares(h.dev(x)) / (x @ x) - 1) <= TOL[h.dtype]


def test_zero_fill(h):
    x = h.dev(h.randn(1001))
    h.be.zero_fill(x)
    assert not np.asarray(h.be.to_host(x)).any()
