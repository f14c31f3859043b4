"""The decoder's ops (Llama, Mistral, Qwen2, Gemma 1-3), forward and backward, against torch float64
autograd on odd shapes, on every backend; then finite differences on the reference (float64), and
the conventions (window, softcap, scale, RoPE tables) against transformers' own code.

As in test_ops.py, every gradient buffer starts with random values: backward ops add.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import backend_dtypes
from llmpy.backends import numpy as ref
from llmpy.model.rope import rope_tables
from test_gradcheck import gradcheck, randn
from test_ops import TOL, Harness, leaf

B, T, C, NH, hd, Fw = 2, 7, 10, 6, 6, 9   # Fw: the gated MLP's width F
EPS = 1e-5


@pytest.fixture(params=backend_dtypes())
def h(request):
    return Harness(*request.param)


# ----------------------------------------------------------------------------- rmsnorm

@pytest.mark.parametrize("offset", [0.0, 1.0])                 # 1.0: Gemma's x * (1 + w)
@pytest.mark.parametrize("shape", [(B, T, C), (B, T, NH, hd)], ids=["rows", "heads"])  # QK-norm
def test_rmsnorm(h, offset, shape):
    x, w, dout = h.randn(*shape) * 3 + 1, h.randn(shape[-1]), h.randn(*shape)
    dx0, dw0 = h.randn(*shape), h.randn(shape[-1])
    tx, tw = leaf(x), leaf(w)
    want = F.rms_norm(tx, shape[-1:], offset + tw, eps=EPS)
    want.backward(torch.from_numpy(dout))
    out, rstd, dx, dw = h.empty(*shape), h.empty(*shape[:-1]), h.dev(dx0), h.dev(dw0)
    h.be.rmsnorm_forward(out, rstd, h.dev(x), h.dev(w), EPS, offset)
    h.be.rmsnorm_backward(dx, dw, h.dev(dout), h.dev(x), h.dev(w), rstd, offset)
    h.check(out, want, "out")
    h.check(rstd, torch.rsqrt(tx.detach().square().mean(-1) + EPS), "rstd")
    h.check(dx, dx0 + tx.grad.numpy(), "dinp")
    h.check(dw, dw0 + tw.grad.numpy(), "dweight")


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_residual_rmsnorm(h, offset):
    # forward only: its backward is rmsnorm_backward into the residual stream's gradient
    a, b, w = h.randn(B, T, C) * 3, h.randn(B, T, C) + 1, h.randn(C)
    s = torch.tensor(a + b)
    res, out, rstd = h.empty(B, T, C), h.empty(B, T, C), h.empty(B, T)
    h.be.residual_rmsnorm_forward(res, out, rstd, h.dev(a), h.dev(b), h.dev(w), EPS, offset)
    h.check(res, s, "residual")
    h.check(out, F.rms_norm(s, (C,), offset + torch.tensor(w), eps=EPS), "out")
    h.check(rstd, torch.rsqrt(s.square().mean(-1) + EPS), "rstd")


# ----------------------------------------------------------------------------- embedding

@pytest.mark.parametrize("scale", [1.0, math.sqrt(C)])        # sqrt(C): Gemma
def test_embedding(h, scale):
    Vp = 13
    inp = h.rng.integers(0, Vp, (B, T))
    inp[0, :3] = inp[1, 4]                     # repeated ids must accumulate
    wte, dout, dwte0 = h.randn(Vp, C), h.randn(B, T, C), h.randn(Vp, C)
    tw = leaf(wte)
    want = F.embedding(torch.from_numpy(inp), tw) * scale
    want.backward(torch.from_numpy(dout))
    out, dwte = h.empty(B, T, C), h.dev(dwte0)
    h.be.embedding_forward(out, h.dev(inp), h.dev(wte), scale)
    h.be.embedding_backward(dwte, h.dev(dout), h.dev(inp), scale)
    h.check(out, want, "out")
    h.check(dwte, dwte0 + tw.grad.numpy(), "dwte")


# ----------------------------------------------------------------------------- rope

@pytest.mark.parametrize("NKV", [2, 1])
def test_rope(h, NKV):
    """q and k rotated as views of the packed qkv buffer into views of another, as the model
    does; v's columns must be left alone, in the output and in the gradient."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    D = (NH + 2 * NKV) * hd
    qkv, out0, dout, dqkv0 = h.randn(B, T, D), h.randn(B, T, D), h.randn(B, T, D), h.randn(B, T, D)
    # positions 5.. (not 0..): the tables of a later chunk; theta 100 turns every pair visibly
    cos, sin = rope_tables(hd, np.arange(5, 5 + T), 100.0, dtype=np.float64)    # (T,hd/2)
    tq = leaf(qkv)
    q = tq[..., :NH * hd].reshape(B, T, NH, hd)
    k = tq[..., NH * hd:(NH + NKV) * hd].reshape(B, T, NKV, hd)
    full = [torch.from_numpy(np.concatenate([t, t], -1)) for t in (cos, sin)]   # HF's (T,hd)
    want_q, want_k = apply_rotary_pos_emb(q, k, *full, unsqueeze_dim=1)        # (T,1,hd) tables
    torch.autograd.backward([want_q, want_k], [
        torch.from_numpy(dout[..., :NH * hd].reshape(B, T, NH, hd)),
        torch.from_numpy(dout[..., NH * hd:(NH + NKV) * hd].reshape(B, T, NKV, hd))])

    def heads(buf):                            # q, k views of a packed (B,T,D) buffer
        return (buf[..., :NH * hd].reshape(B, T, NH, hd),
                buf[..., NH * hd:(NH + NKV) * hd].reshape(B, T, NKV, hd))

    x, out, d, dx = h.dev(qkv), h.dev(out0), h.dev(dout), h.dev(dqkv0)
    c, s = h.dev(cos), h.dev(sin)
    for xi, oi, di, dxi in zip(heads(x), heads(out), heads(d), heads(dx)):
        h.be.rope_forward(oi, xi, c, s)
        h.be.rope_backward(dxi, di, c, s)
    v = slice((NH + NKV) * hd, None)
    h.check(out[..., :NH * hd], want_q.reshape(B, T, -1), "out q")
    h.check(out[..., NH * hd:v.start], want_k.reshape(B, T, -1), "out k")
    h.check(out[..., v], out0[..., v], "out v (untouched)")
    h.check(dx, dqkv0 + tq.grad.numpy(), "dinp (v untouched)")


# ----------------------------------------------------------------------------- gated MLP

@pytest.mark.parametrize("op,act", [("swiglu", F.silu),
                                    ("geglu", lambda g: F.gelu(g, approximate="tanh"))])
def test_gated_mlp(h, op, act):
    x, dout, dx0 = h.randn(B, T, 2 * Fw) * 2, h.randn(B, T, Fw), h.randn(B, T, 2 * Fw)
    x[0, 0, Fw:Fw + 2] = [-30.0, 30.0]         # the sigmoid's saturated ends
    tx = leaf(x)
    want = tx[..., :Fw] * act(tx[..., Fw:])    # [up | gate]
    want.backward(torch.from_numpy(dout))
    out, dx = h.empty(B, T, Fw), h.dev(dx0)
    getattr(h.be, f"{op}_forward")(out, h.dev(x))
    getattr(h.be, f"{op}_backward")(dx, h.dev(dout), h.dev(x))
    h.check(out, want, "out")
    h.check(dx, dx0 + tx.grad.numpy(), "dinp")


# ----------------------------------------------------------------------------- softcap

@pytest.mark.parametrize("in_place", [False, True])
def test_softcap(h, in_place):
    cap = 3.0
    x, dout, dx0 = h.randn(B, T, 11) * 4, h.randn(B, T, 11), h.randn(B, T, 11)
    tx = leaf(x)
    want = cap * torch.tanh(tx / cap)
    want.backward(torch.from_numpy(dout))
    inp, dx = h.dev(x), h.dev(dx0)
    out = inp if in_place else h.empty(B, T, 11)
    h.be.softcap_forward(out, inp, cap)
    h.be.softcap_backward(dx, h.dev(dout), out, cap)
    h.check(out, want, "out")
    h.check(dx, dx0 + tx.grad.numpy(), "dinp")


# ----------------------------------------------------------------------------- attention

def allowed_keys(window):
    # (T,T) bool, written out: query i sees key j when j <= i and, with a window, i - j < window
    return torch.tensor([[j <= i and (window == 0 or i - j < window) for j in range(T)]
                         for i in range(T)])


def torch_attention(qkv, NKV, scale=None, softcap=0.0, window=0):
    # qkv: (B,T,(NH+2*NKV)*hd) -> y (B,T,NH*hd), att (B,NH,T,T), lse (B,NH,T)
    q, k, v = qkv.split([NH * hd, NKV * hd, NKV * hd], dim=-1)
    q = q.reshape(B, T, NH, hd).transpose(1, 2)
    # each kv head copied for its NH // NKV query heads, as HF's repeat_kv
    k, v = (t.reshape(B, T, NKV, hd).transpose(1, 2).repeat_interleave(NH // NKV, dim=1)
            for t in (k, v))
    pre = (q @ k.transpose(-1, -2)) * (hd ** -0.5 if scale is None else scale)
    if softcap > 0:
        pre = softcap * torch.tanh(pre / softcap)
    pre = pre.masked_fill(~allowed_keys(window), float("-inf"))
    att = pre.softmax(-1)
    return (att @ v).transpose(1, 2).reshape(B, T, NH * hd), att, pre.logsumexp(-1)


ATTENTION_CASES = {                            # window < T except "window=T" (= causal)
    "plain": {}, "scale": dict(scale=0.3), "softcap": dict(softcap=2.0),
    "window3": dict(window=3), "window1": dict(window=1), "windowT": dict(window=T),
    "all": dict(scale=0.3, softcap=2.0, window=4),
}


@pytest.mark.parametrize("NKV", [NH, 2, 1])
@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention(h, NKV, case):
    kw = ATTENTION_CASES[case]
    D = (NH + 2 * NKV) * hd
    qkv, dout, dqkv0 = h.randn(B, T, D), h.randn(B, T, NH * hd), h.randn(B, T, D)
    tq = leaf(qkv)
    want, want_att, want_lse = torch_attention(tq, NKV, **kw)
    want.backward(torch.from_numpy(dout))
    out, dqkv = h.empty(B, T, NH * hd), h.dev(dqkv0)
    if h.be.caps.fused:   # flash attention keeps a logsumexp per row, no (T,T)
        lse = h.empty(B, NH, T)
        h.be.attention_forward(out, lse, h.dev(qkv), **kw)
        h.be.attention_backward(dqkv, h.dev(dout), h.dev(qkv), out, lse, **kw)
        h.check(lse, want_lse, "lse")
    else:
        preatt, att = h.empty(B, NH, T, T), h.empty(B, NH, T, T)
        dpreatt, datt = h.empty(B, NH, T, T), h.empty(B, NH, T, T)
        h.be.attention_forward(out, preatt, att, h.dev(qkv), **kw)
        h.be.attention_backward(dqkv, dpreatt, datt, h.dev(dout), h.dev(qkv), att, **kw)
        h.check(att, want_att, "att")
    h.check(out, want, "out")
    h.check(dqkv, h.start(dqkv0) + tq.grad.numpy(), "dinp")


def test_attention_matches_transformers():
    """window, softcap, scale and the kv grouping as transformers runs them: Gemma 2's eager
    attention (softcap, then the mask added) with the mask transformers builds for a sliding
    layer. Float32 tolerance: that attention takes its softmax in float32."""
    from transformers import Gemma2Config
    from transformers.masking_utils import create_sliding_window_causal_mask
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
    NKV, window, softcap, scale = 2, 3, 2.0, 0.3
    cfg = Gemma2Config(hidden_size=NH * hd, num_attention_heads=NH, num_key_value_heads=NKV,
                       head_dim=hd, sliding_window=window, attn_implementation="eager")
    mask = create_sliding_window_causal_mask(
        config=cfg, inputs_embeds=torch.zeros(B, T, NH * hd, dtype=torch.float64),
        attention_mask=None, cache=None, position_ids=torch.arange(T)[None])   # (B,1,T,T)
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.head_dim = NH // NKV, hd
    qkv = np.random.default_rng(0).standard_normal((B, T, (NH + 2 * NKV) * hd))
    q, k, v = (torch.from_numpy(t).reshape(B, T, -1, hd).transpose(1, 2)
               for t in np.split(qkv, [NH * hd, (NH + NKV) * hd], axis=-1))
    want, want_att = eager_attention_forward(module, q, k, v, mask, scaling=scale, softcap=softcap)
    out, preatt, att = np.zeros((B, T, NH * hd)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
    ref.attention_forward(out, preatt, att, qkv, scale=scale, softcap=softcap, window=window)
    np.testing.assert_allclose(att, want_att.numpy(), rtol=0, atol=TOL[np.float32])
    np.testing.assert_allclose(out, want.reshape(B, T, -1).numpy(), rtol=0,
                               atol=TOL[np.float32] * np.abs(out).max())
    assert (att[0, 0] > 0).sum(-1).tolist() == [1, 2, 3, 3, 3, 3, 3]   # the window is binding


# ----------------------------------------------------------------------------- RoPE tables

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=300)


@pytest.mark.parametrize("scaling", [None, LLAMA3], ids=["default", "llama3"])
def test_rope_tables(scaling):
    """rope_tables against transformers' rotary embedding (its rope init functions): the float32
    tables to a few ulps at positions up to 20000 (the same angles; NumPy's and torch's float32
    cos round differently), the float64 ones to float32's rounding of transformers' (which
    builds them in float32) where the angles are small."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    dim, theta = 32, 500000.0
    params = dict(rope_theta=theta, **(scaling or dict(rope_type="default")))
    cfg = LlamaConfig(hidden_size=2 * dim, num_attention_heads=2, head_dim=dim,
                      rope_parameters=params)
    if scaling:     # every band of the llama3 rule: kept, blended and divided by the factor
        default = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
        ratio = (ROPE_INIT_FUNCTIONS["llama3"](cfg)[0] / default).numpy()
        assert ratio.max() == 1.0 and ratio.min() == 1 / 8.0
        assert ((ratio < 1.0) & (ratio > 1 / 8.0)).any()
    rotary = LlamaRotaryEmbedding(cfg)
    for dtype, positions, atol in [(np.float32, np.arange(0, 20000, 7), 3e-7),
                                   (np.float64, np.arange(0, 9), 1e-6)]:
        want = rotary(torch.zeros(1), torch.from_numpy(positions)[None])     # each (1,T,dim)
        got = rope_tables(dim, positions, theta, scaling, dtype=dtype)
        for g, w in zip(got, want):
            assert g.dtype == dtype and g.shape == (len(positions), dim // 2)
            np.testing.assert_allclose(g, w[0].numpy()[:, :dim // 2], rtol=0, atol=atol)
            np.testing.assert_array_equal(w[0, :, :dim // 2], w[0, :, dim // 2:])   # rotate-half


# ----------------------------------------------------------------------------- finite differences

Bg, Tg, Cg, NHg, hdg, Fg = 2, 5, 6, 4, 4, 3


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_gradcheck_rmsnorm(offset):
    p = dict(inp=randn(Bg, Tg, Cg), weight=randn(Cg))
    rstd = np.zeros((Bg, Tg))
    gradcheck(lambda out, inp, weight: ref.rmsnorm_forward(out, rstd, inp, weight, EPS, offset),
              lambda d, g: ref.rmsnorm_backward(g["inp"], g["weight"], d, p["inp"], p["weight"],
                                                rstd, offset), p, (Bg, Tg, Cg))


def test_gradcheck_embedding():
    inp = np.array([[1, 4, 1, 0, 2], [0, 4, 2, 2, 3]])
    p = dict(wte=randn(7, Cg))
    gradcheck(lambda out, wte: ref.embedding_forward(out, inp, wte, 2.5),
              lambda d, g: ref.embedding_backward(g["wte"], d, inp, 2.5), p, (Bg, Tg, Cg))


def test_gradcheck_rope():
    cos, sin = rope_tables(hdg, np.arange(Tg), 10.0, dtype=np.float64)
    p = dict(inp=randn(Bg, Tg, NHg, hdg))
    gradcheck(lambda out, inp: ref.rope_forward(out, inp, cos, sin),
              lambda d, g: ref.rope_backward(g["inp"], d, cos, sin), p, (Bg, Tg, NHg, hdg))


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
def test_gradcheck_gated_mlp(op):
    p = dict(inp=randn(Bg, Tg, 2 * Fg) * 2)
    backward = getattr(ref, f"{op}_backward")
    gradcheck(getattr(ref, f"{op}_forward"), lambda d, g: backward(g["inp"], d, p["inp"]),
              p, (Bg, Tg, Fg))


def test_gradcheck_softcap():
    p = dict(inp=randn(Bg, Tg, Cg) * 4)
    out = np.zeros((Bg, Tg, Cg))
    # the backward reads the output of a forward on the unperturbed input
    gradcheck(lambda o, inp: ref.softcap_forward(o, inp, 3.0),
              lambda d, g: (ref.softcap_forward(out, p["inp"], 3.0),
                            ref.softcap_backward(g["inp"], d, out, 3.0)), p, (Bg, Tg, Cg))


@pytest.mark.parametrize("NKV,kw", [(2, {}), (1, dict(scale=0.4, softcap=1.5, window=2))],
                         ids=["gqa", "mqa-scale-softcap-window"])
def test_gradcheck_attention(NKV, kw):
    p = dict(inp=randn(Bg, Tg, (NHg + 2 * NKV) * hdg))
    pre, att = np.zeros((Bg, NHg, Tg, Tg)), np.zeros((Bg, NHg, Tg, Tg))
    gradcheck(lambda out, inp: ref.attention_forward(out, pre, att, inp, **kw),
              lambda d, g: ref.attention_backward(g["inp"], np.zeros_like(pre), np.zeros_like(att),
                                                  d, p["inp"], att, **kw),
              p, (Bg, Tg, NHg * hdg))
