"""The gpu backend's kernels for the Llama/Gemma decoder against torch float64 autograd.

As tests/test_gpu.py: without a GPU the Triton kernels run in Triton's interpreter in float32
and float16 (bf16 on a GPU), every input is drawn and rounded to the dtype under test, and the
reference runs in float64 on those same rounded values, with test_gpu.py's tolerances
(max |got - want| / max |want|). The shared op tests (tests/test_decoder_ops.py) hold these ops
to float32 on every backend; here: the lower precisions, the launch shapes that only the gpu
kernels have (blocks of keys and queries, grouped heads packed into a block, windows against
block edges), in-place calls, and that each gradient is the same, bit for bit, when run again.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from test_gpu import CUDA, DEVICE, Case, case, gpu  # noqa: F401  (case: the dtype fixture)


def leaf(x64):
    return torch.tensor(x64, requires_grad=True)


def rounded(case, x64):
    """x64 as a device tensor in the case's dtype, and the float64 values of that."""
    x = torch.tensor(x64, dtype=case.dtype, device=DEVICE)
    return x, x.double().cpu().numpy()


def test_rmsnorm(case):
    B, T, C, eps = 3, 50, 37, 1e-6      # 150 rows: several backward programs, the last partial
    for offset in (0.0, 1.0):
        x, x64 = case.randn(B, T, C, scale=3.0)
        w, w64 = case.randn(C, scale=0.5)
        dout, dout64 = case.randn(B, T, C)
        tx, tw = leaf(x64), leaf(w64)
        rstd64 = torch.rsqrt((tx * tx).mean(-1) + eps)
        want = tx * rstd64[..., None] * (offset + tw)
        want.backward(torch.tensor(dout64))
        out, rstd = case.zeros(B, T, C), case.zeros(B, T, dtype=torch.float32)
        gpu.rmsnorm_forward(out, rstd, x, w, eps, offset)
        case.check(out, want.detach().numpy(), f"rmsnorm out offset={offset}")
        case.check(rstd, rstd64.detach().numpy(), f"rmsnorm rstd offset={offset}")
        dx, dx64 = case.randn(B, T, C)                  # added into
        dw, dw64 = case.randn(C)
        gpu.rmsnorm_backward(dx, dw, dout, x, w, rstd, offset)
        case.check(dx, dx64 + tx.grad.numpy(), f"rmsnorm dinp offset={offset}")
        case.check(dw, dw64 + tw.grad.numpy(), f"rmsnorm dweight offset={offset}")


def test_rmsnorm_of_heads(case):
    """Gemma 3's QK-norm: the k heads inside packed qkv rows (a view) into a buffer of their
    own, and the backward added into the k heads of a packed gradient."""
    B, T, NH, NKV, hd, eps = 2, 9, 4, 2, 12, 1e-6
    W = (NH + 2 * NKV) * hd
    qkv, qkv64 = case.randn(B, T, W, scale=2.0)
    w, w64 = case.randn(hd, scale=0.5)
    k = lambda buf: buf[..., NH * hd:(NH + NKV) * hd].view(B, T, NKV, hd)   # noqa: E731
    tx, tw = leaf(qkv64[..., NH * hd:(NH + NKV) * hd].reshape(B, T, NKV, hd)), leaf(w64)
    want = tx * torch.rsqrt((tx * tx).mean(-1, keepdim=True) + eps) * (1.0 + tw)
    dout, dout64 = case.randn(B, T, NKV, hd)
    want.backward(torch.tensor(dout64))
    out, rstd = case.zeros(B, T, NKV, hd), case.zeros(B, T, NKV, dtype=torch.float32)
    gpu.rmsnorm_forward(out, rstd, k(qkv), w, eps, 1.0)
    case.check(out, want.detach().numpy(), "rmsnorm of heads out")
    dqkv, dqkv64 = case.randn(B, T, W)                          # added into
    dw, dw64 = case.randn(hd)
    gpu.rmsnorm_backward(k(dqkv), dw, dout, k(qkv), w, rstd, 1.0)
    want_dqkv = dqkv64.copy()
    want_dqkv[..., NH * hd:(NH + NKV) * hd] += tx.grad.numpy().reshape(B, T, -1)
    case.check(dqkv, want_dqkv, "rmsnorm of heads dinp (only the k heads)")
    case.check(dw, dw64 + tw.grad.numpy(), "rmsnorm of heads dweight")


def test_residual_rmsnorm(case):
    B, T, C, eps = 2, 9, 37, 1e-5
    x, x64 = case.randn(B, T, C, scale=3.0)
    y, y64 = case.randn(B, T, C)
    w, w64 = case.randn(C)
    res, out, rstd = case.zeros(B, T, C), case.zeros(B, T, C), \
        case.zeros(B, T, dtype=torch.float32)
    gpu.residual_rmsnorm_forward(res, out, rstd, x, y, w, eps, 1.0)
    # the kernel normalises the sum as rounded into residual, as the backward reads it back
    r64 = res.double().cpu().numpy()
    rstd64 = 1 / np.sqrt((r64 * r64).mean(-1) + eps)
    case.check(res, x64 + y64, "residual+rmsnorm residual")
    case.check(out, r64 * rstd64[..., None] * (1.0 + w64), "residual+rmsnorm out")
    case.check(rstd, rstd64, "residual+rmsnorm rstd")


def test_embedding(case):
    B, T, C, Vp = 3, 7, 20, 40
    scale = float(torch.tensor(math.sqrt(C), dtype=case.dtype))   # Gemma's, as the model rounds it
    inp = case.rng.integers(0, Vp, (B, T))
    inp[:, :6] = 17                   # a frequent token: 18 rows, more than one kernel step (16)
    wte, wte64 = case.randn(Vp, C)
    dout, dout64 = case.randn(B, T, C)
    ids = torch.tensor(inp, device=DEVICE)
    out = case.zeros(B, T, C)
    gpu.embedding_forward(out, ids, wte, scale)
    case.check(out, wte64[inp] * scale, "embedding out")
    dwte, dwte64 = case.randn(Vp, C)
    start = dwte.clone()
    tw = leaf(wte64)
    (tw[torch.tensor(inp)] * scale).backward(torch.tensor(dout64))
    gpu.embedding_backward(dwte, dout, ids, scale)
    case.check(dwte, dwte64 + tw.grad.numpy(), "embedding dwte")
    gpu.embedding_backward(start, dout, ids, scale)
    assert torch.equal(start, dwte), "the wte gradient must be the same, bit for bit, every run"


def rotate(x, cos, sin):
    # x: (B,T,H,hd) float64 tensor, cos, sin: (T,hd/2): HF's apply_rotary_pos_emb
    half = x.shape[-1] // 2
    cos, sin = (torch.cat([t, t], -1)[None, :, None, :] for t in (cos, sin))
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


def test_rope(case):
    """q and k heads turned inside a packed qkv buffer (views), into another buffer and in
    place; the backward added into the q and k heads of a packed gradient."""
    B, T, NH, NKV, hd = 2, 11, 4, 2, 12
    H, W = NH + NKV, (NH + 2 * NKV) * hd
    ang = np.arange(T)[:, None] * 10000.0 ** (-np.arange(hd // 2) / (hd // 2))
    cos, cos64 = rounded(case, np.cos(ang))
    sin, sin64 = rounded(case, np.sin(ang))
    qkv, qkv64 = case.randn(B, T, W)
    x64 = qkv64[..., :H * hd].reshape(B, T, H, hd)
    tx = leaf(x64)
    want = rotate(tx, torch.tensor(cos64), torch.tensor(sin64))
    dout, dout64 = case.randn(B, T, H, hd)
    want.backward(torch.tensor(dout64))
    out = case.zeros(B, T, W)
    heads = lambda buf: buf[..., :H * hd].view(B, T, H, hd)    # noqa: E731
    gpu.rope_forward(heads(out), heads(qkv), cos, sin)
    case.check(heads(out), want.detach().numpy(), "rope out")
    assert not out[..., H * hd:].any(), "rope wrote past the q and k heads"
    gpu.rope_forward(heads(qkv), heads(qkv), cos, sin)
    assert torch.equal(qkv[..., :H * hd], out[..., :H * hd]), "rope in place"
    dqkv, dqkv64 = case.randn(B, T, W)                          # added into
    gpu.rope_backward(heads(dqkv), dout, cos, sin)
    case.check(heads(dqkv), dqkv64[..., :H * hd].reshape(B, T, H, hd) + tx.grad.numpy(),
               "rope dinp")
    assert torch.equal(dqkv[..., H * hd:], torch.tensor(dqkv64[..., H * hd:], dtype=case.dtype)), \
        "rope's backward wrote past the q and k heads"


@pytest.mark.parametrize("act", ["swiglu", "geglu"])
def test_glu(case, act):
    # 2F = 2*1100 channels: several column blocks, the last one partial; 15 rows
    B, T, F_ = 3, 5, 1100
    x, x64 = case.randn(B, T, 2 * F_, scale=2.0)
    tx = leaf(x64)
    up, gate = tx[..., :F_], tx[..., F_:]
    want = up * (F.silu(gate) if act == "swiglu" else F.gelu(gate, approximate="tanh"))
    dout, dout64 = case.randn(B, T, F_)
    want.backward(torch.tensor(dout64))
    out = case.zeros(B, T, F_)
    getattr(gpu, f"{act}_forward")(out, x)
    case.check(out, want.detach().numpy(), f"{act} out")
    dx, dx64 = case.randn(B, T, 2 * F_)             # added into
    getattr(gpu, f"{act}_backward")(dx, dout, x)
    case.check(dx, dx64 + tx.grad.numpy(), f"{act} dinp")


def test_softcap(case):
    cap = 3.0
    x, x64 = case.randn(3, 5, 700, scale=6.0)           # well into tanh's flat ends
    tx = leaf(x64)
    want = cap * torch.tanh(tx / cap)
    dout, dout64 = case.randn(3, 5, 700)
    want.backward(torch.tensor(dout64))
    out = case.zeros(3, 5, 700)
    gpu.softcap_forward(out, x, cap)
    case.check(out, want.detach().numpy(), "softcap out")
    dx, dx64 = case.randn(3, 5, 700)                    # added into
    gpu.softcap_backward(dx, dout, out, cap)
    case.check(dx, dx64 + tx.grad.numpy(), "softcap dinp")
    gpu.softcap_forward(x, x, cap)
    assert torch.equal(x, out), "softcap in place"


@pytest.mark.parametrize("V,Vp", [(9000, 9216), (40000, 40064)])
def test_classifier_softcap(case, V, Vp):
    """The fused classifier with Gemma 2's final-logit cap, against the cap then cross-entropy
    in float64; V spans blocks of every tuned width."""
    B, T, cap = 1, 3, 30.0
    logits, logits64 = case.randn(B, T, Vp, scale=20.0)
    targets = case.rng.integers(0, V, (B, T))
    tgt = torch.tensor(targets, device=DEVICE)
    tz = leaf(logits64)
    capped = cap * torch.tanh(tz[..., :V] / cap)
    want = F.cross_entropy(capped.reshape(-1, V), torch.tensor(targets).reshape(-1),
                           reduction="none").reshape(B, T)
    dlosses, dlosses64 = case.randn(B, T, dtype=torch.float32)
    want.backward(torch.tensor(dlosses64))
    losses, lse = case.zeros(B, T, dtype=torch.float32), case.zeros(B, T, dtype=torch.float32)
    gpu.crossentropy_forward(losses, lse, logits, tgt, V, softcap=cap)
    case.check(losses, want.detach().numpy(), "classifier+softcap losses")
    case.check(lse, torch.logsumexp(capped, -1).detach().numpy(), "classifier+softcap lse")
    gpu.crossentropy_backward(logits, dlosses, logits, lse, tgt, V, softcap=cap)   # in place
    case.check(logits, tz.grad.numpy(), "classifier+softcap dlogits")


# ----------------------------------------------------------------------------- attention

def torch_attention(qkv, NH, NKV, scale=None, softcap=0.0, window=0):
    """qkv: (B,T,(NH+2*NKV)*hd) float64 tensor -> out (B,T,NH*hd) and lse (B,NH,T), as HF's
    eager attention: K, V repeated per query head (repeat_kv), scores capped, then masked."""
    B, T, _ = qkv.shape
    hd = qkv.shape[-1] // (NH + 2 * NKV)
    q, k, v = (t.reshape(B, T, -1, hd).transpose(1, 2)
               for t in qkv.split([NH * hd, NKV * hd, NKV * hd], dim=-1))
    k, v = (t.repeat_interleave(NH // NKV, dim=1) for t in (k, v))
    s = q @ k.transpose(-1, -2) * (hd ** -0.5 if scale is None else scale)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    seen = (j <= i) & ((j > i - window) if window > 0 else True)
    s = s.masked_fill(~seen, float("-inf"))
    out = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, NH * hd)
    return out, s.logsumexp(-1)


def check_attention(case, B, T, NH, NKV, hd, scale=None, softcap=0.0, window=0, qscale=1.0):
    W = (NH + 2 * NKV) * hd
    qkv, qkv64 = case.randn(B, T, W, scale=qscale)
    tq = leaf(qkv64)
    want, want_lse = torch_attention(tq, NH, NKV, scale, softcap, window)
    dout, dout64 = case.randn(B, T, NH * hd)
    want.backward(torch.tensor(dout64))
    kw = dict(scale=scale, softcap=softcap, window=window)
    what = f"attention NH={NH} NKV={NKV} hd={hd} {kw}"
    out, lse = case.zeros(B, T, NH * hd), case.zeros(B, NH, T, dtype=torch.float32)
    gpu.attention_forward(out, lse, qkv, **kw)
    case.check(out, want.detach().numpy(), f"{what} out")
    case.check(lse, want_lse.detach().numpy(), f"{what} lse")
    dqkv, _ = case.randn(B, T, W)               # written over, not added to
    gpu.attention_backward(dqkv, dout, qkv, out, lse, **kw)
    case.check(dqkv, tq.grad.numpy(), f"{what} dinp")
    again = case.zeros(B, T, W)         # dK, dV summed over each group in a fixed order
    gpu.attention_backward(again, dout, qkv, out, lse, **kw)
    assert torch.equal(again, dqkv), "the attention gradient must be the same every run"


# (B, T, NH, NKV, hd, options): T over several blocks with a ragged last one; groups of 2 and 4
# (packed into one program's rows), of 3 (not a power of two: one head a program), one kv head
# (MQA); head sizes that are not powers of two; windows narrower than a block and wider, and
# as wide as T (no window); scores big enough for the cap to bend them
ATTENTION_CASES = [
    (2, 37, 4, 2, 8, {}),
    (1, 37, 6, 2, 6, dict(scale=0.3)),
    (1, 40, 4, 1, 16, dict(softcap=2.0, qscale=2.0)),
    (1, 37, 4, 2, 8, dict(window=5)),
    (1, 45, 8, 2, 8, dict(window=20, softcap=3.0, qscale=2.0)),
    (1, 37, 2, 2, 12, dict(window=37)),
]


@pytest.mark.parametrize("shape", ATTENTION_CASES,
                         ids=lambda s: "B{}T{}NH{}NKV{}hd{}".format(*s[:5]) + "".join(
                             f"-{k}{v}" for k, v in s[5].items()))
def test_attention(case, shape):
    *dims, options = shape
    check_attention(case, *dims, **options)


def test_attention_gpt2_path():
    """NKV == NH with no window and no softcap is GPT-2's attention: the defaults, and a window
    as long as the sequence (which hides nothing, so takes the same path), give the same bits."""
    case = Case(torch.float32)
    B, T, NH, hd = 1, 21, 2, 8
    qkv, _ = case.randn(B, T, 3 * NH * hd)
    dout, _ = case.randn(B, T, NH * hd)
    results = []
    for kw in ({}, dict(scale=hd ** -0.5, softcap=0.0, window=0), dict(window=T)):
        out, lse = case.zeros(B, T, NH * hd), case.zeros(B, NH, T, dtype=torch.float32)
        dqkv = case.zeros(B, T, 3 * NH * hd)
        gpu.attention_forward(out, lse, qkv, **kw)
        gpu.attention_backward(dqkv, dout, qkv, out, lse, **kw)
        results.append((out, lse, dqkv))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.skipif(CUDA, reason="a GPU compiles every config (gpu_compile.py) and runs the one "
                                   "autotuning chose, in the tests above")
@pytest.mark.parametrize("fwd,dq,dkdv", [((32, 16), (32, 16), (32, 16)),
                                         ((64, 32), (64, 32), (32, 16)),
                                         ((32, 32), (32, 16), (64, 32))])
def test_attention_blocks(fwd, dq, dkdv, monkeypatch):
    """The interpreter's one config takes 16-row blocks. Here, larger blocks and steps under a
    block: four query heads packed into a block of 32 or 64 rows (8 or 16 positions, against
    key blocks of 16 or 32), windows cut by block edges on both sides, and a ragged last block."""
    import triton
    from llmpy.backends.gpu import attention
    monkeypatch.setattr(attention._attention_forward_kernel, "configs",
                        [triton.Config(dict(BLOCK_M=fwd[0], BLOCK_N=fwd[1]))])
    for kernel, (block, step) in ((attention._attention_dq_kernel, dq),
                                  (attention._attention_dkdv_kernel, dkdv)):
        monkeypatch.setattr(kernel, "configs", [triton.Config(dict(BLOCK=block, STEP=step))])
    case = Case(torch.float32)
    for window in (0, 2, 9, 31, 47):
        check_attention(case, 1, 70, 4, 1, 8, window=window)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_every_tuned_config(monkeypatch):
    """As test_gpu.py's: autotuning compares configs only at large shapes, so on a GPU each
    config of each tuned row-wise or elementwise kernel here runs the tests above in bf16 (RMSNorm's
    narrow-row configs too, at every width)."""
    from llmpy.backends.gpu import glu, rmsnorm
    every = {rmsnorm._rmsnorm_forward_kernel: rmsnorm._rmsnorm_forward_kernel.configs
             + rmsnorm.NARROW_CONFIGS,
             rmsnorm._rmsnorm_backward_kernel: rmsnorm._rmsnorm_backward_kernel.configs
             + rmsnorm.NARROW_CONFIGS,
             glu._glu_forward_kernel: glu._glu_forward_kernel.configs,
             glu._glu_backward_kernel: glu._glu_backward_kernel.configs}
    for i in range(max(map(len, every.values()))):
        for kernel, configs in every.items():
            monkeypatch.setattr(kernel, "configs", [configs[min(i, len(configs) - 1)]])
        case = Case(torch.bfloat16)
        for test in (test_rmsnorm, test_rmsnorm_of_heads, test_residual_rmsnorm):
            test(case)
        for act in ("swiglu", "geglu"):
            test_glu(case, act)
