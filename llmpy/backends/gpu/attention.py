"""Causal flash attention, forward and backward (FlashAttention-2's algorithm), with grouped-query
heads (NKV <= NH), a softmax scale, Gemma 2's logit softcap and a sliding window.

The (T,T) scores never reach memory. The forward walks over blocks of keys with an online
softmax (running max m and running sum l per query row) and saves one logsumexp per row. The
backward recomputes each block of probabilities from q, k and that logsumexp:
    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
    dQ = dS K * scale,  dK = dS^T Q * scale,  with D = rowsum(dO * O),
S = scale * q k^T, or softcap * tanh(scale * q k^T / softcap), whose derivative multiplies dS
by 1 - (S / softcap)^2. The backward is two kernels, each program owning one block: of queries,
for D and dQ (three matmuls per block of keys), then of keys, for dK and dV (four per block of
queries). So every gradient element is written by exactly one program: deterministic, no
atomics, where FlashAttention-2 does five matmuls and adds dQ atomically (in any order; adding
it in a fixed order instead measured slower than these seven). The gradient is written, not
added (the backend's writes_activation_grads): the qkv matmul's backward is its only reader.

Grouped-query attention: query head h reads kv head h // G, G = NH // NKV (HF's repeat_kv),
and K, V are never copied out per query head. A forward or dQ program takes HEADS query heads
of one group at once (the largest power of two dividing G, up to 8), as more rows of its block,
position by position: each block of K, V it loads serves them all. A dK, dV program owns a block
of keys of one kv head and walks the G query heads of its group in turn, so the sum over the
group is in a fixed order too.

Masks: query i sees key j for j <= i, and with a window, i - window < j (HF's sliding_window).
Each program splits the blocks it walks into those every one of its rows sees whole (no mask)
and those on the diagonal or the window's edge (masked); blocks wholly outside are never read.
With HEADS = 1, no window and no softcap (GPT-2), the constexprs drop all of it.

Layouts: qkv (B,T,(NH+2*NKV)*hd) holds, per position, the q heads, the k heads, then the v
heads, each hd wide; out (B,T,NH*hd); lse (B,NH,T) float32, natural log. The exponentials use
exp2, so scores are kept in log2 units inside the kernels (qk_scale = scale * log2(e)).
"""
import math

import torch
import triton
import triton.language as tl

from .launch import CACHED, configs
from .softcap import tanh

LOG2E = tl.constexpr(1.4426950408889634)


def _tuning(small_fp32, wide, key):
    """Autotuning per (T, head size, `key`): short sequences take the last candidate without
    comparing, as that would only cost compiles. So does float32 on a GPU, which only the tests
    run there: small_fp32, since its large blocks take up to ~30 s each to compile. Heads over
    128 wide (Gemma's 256) take the candidates in `wide` instead, whose float32 accumulators
    (rows x head size) and tiles in flight fit in registers and shared memory. See CACHED."""
    def prune(candidates, named_args, **kwargs):
        if torch.cuda.is_available() and named_args["qkv"].dtype == torch.float32:
            return [small_fp32]
        if kwargs["HS_PAD"] > 128:
            candidates = wide
        return candidates if named_args["T"] >= 512 else candidates[-1:]
    return dict(key=["T", "HS_PAD", *key], prune_configs_by={"early_config_prune": prune},
                **CACHED)


def _wide(candidates):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in candidates]


# Candidates around FlashAttention-2's Triton settings for head size 64 (deeper pipelines suit
# Hopper); the first use at each (T, head size) times them all (a few seconds of compiling).
_FWD = configs([(dict(BLOCK_M=128, BLOCK_N=64), 8, 3), (dict(BLOCK_M=128, BLOCK_N=64), 4, 3),
               (dict(BLOCK_M=128, BLOCK_N=64), 4, 4), (dict(BLOCK_M=128, BLOCK_N=128), 8, 3),
               (dict(BLOCK_M=64, BLOCK_N=64), 4, 4), (dict(BLOCK_M=64, BLOCK_N=64), 4, 3)],
               dict(BLOCK_M=16, BLOCK_N=16))
# Candidates for both backward kernels, each timed on its own. BLOCK (the rows a program owns) is
# a multiple of STEP (the rows it walks at a time), as a dK, dV step must not straddle the
# diagonal.
_BWD = configs([(dict(BLOCK=128, STEP=32), 8, 3), (dict(BLOCK=128, STEP=64), 8, 2),
               (dict(BLOCK=128, STEP=64), 8, 3), (dict(BLOCK=64, STEP=32), 4, 3),
               (dict(BLOCK=64, STEP=64), 4, 3), (dict(BLOCK=64, STEP=64), 4, 2)],
               dict(BLOCK=16, STEP=16))
_SMALL_FP32 = triton.Config(dict(BLOCK=32, STEP=16), num_warps=4, num_stages=2)
# For heads of 256: configs that tests/gpu_compile.py finds within an H100's shared memory, with
# few registers spilled (the dK, dV kernel's two accumulators make that hardest: its last
# candidate spills least)
_FWD_WIDE = _wide([(dict(BLOCK_M=64, BLOCK_N=64), 8, 2), (dict(BLOCK_M=64, BLOCK_N=32), 8, 3),
                   (dict(BLOCK_M=32, BLOCK_N=64), 4, 2), (dict(BLOCK_M=64, BLOCK_N=32), 8, 2)])
_BWD_WIDE = _wide([(dict(BLOCK=64, STEP=32), 8, 2), (dict(BLOCK=64, STEP=16), 8, 2),
                   (dict(BLOCK=32, STEP=32), 8, 2), (dict(BLOCK=32, STEP=16), 8, 2)])
# the constexprs other than blocks that pick a compiled variant
_VARIANT = ["SOFTCAP", "WINDOW"]


@triton.jit
def _scores(x, qk_scale, cap2, SOFTCAP: tl.constexpr):
    """Scores in log2 units from the products q.k (x): x * scale * log2(e), or under SOFTCAP
    softcap * tanh(x * scale / softcap) * log2(e) (qk_scale = scale / softcap, cap2 = softcap *
    log2(e))."""
    if SOFTCAP:
        return tanh(x * qk_scale) * cap2
    return x * qk_scale


@triton.jit
def _visible(i, j, window, WINDOW: tl.constexpr):
    """Whether query position i sees key position j (broadcast against each other)."""
    if WINDOW:
        return (j <= i) & (j > i - window)
    return j <= i


@triton.jit
def _softcap_grad(ds, s, cap2, SOFTCAP: tl.constexpr):
    """dS through the cap, from the capped scores s in log2 units: tanh = s / cap2."""
    if SOFTCAP:
        return ds * (1.0 - (s / cap2) * (s / cap2))
    return ds


@triton.jit
def _key_blocks(start, P, window, N: tl.constexpr, WINDOW: tl.constexpr):
    """For the query positions start..start+P, the key blocks (N wide) to walk: [lo, mid) on the
    window's edge (masked; empty without a window), [mid, diag) seen whole by every row, and
    [diag, start + P) on the diagonal (masked)."""
    diag = start // N * N
    if WINDOW:
        lo = tl.maximum(start - window + 1, 0) // N * N
        # the first block that the last row's window holds whole
        mid = (tl.maximum(start + P - window, 0) + N - 1) // N * N
        return lo, tl.minimum(tl.maximum(mid, lo), diag), diag
    return 0, 0, diag


@triton.jit
def _query_blocks(start, T, window, BLOCK: tl.constexpr, STEP: tl.constexpr,
                  WINDOW: tl.constexpr):
    """For the key positions start..start+BLOCK, the query blocks (STEP wide) to walk after the
    diagonal ones [start, start + BLOCK): [start + BLOCK, mid) see every key whole, [mid, hi)
    are on the window's edge (masked; empty without a window)."""
    if WINDOW:
        hi = tl.minimum(start + BLOCK - 1 + window, T)          # past the last key's window
        mid = tl.minimum(tl.maximum((start + window) // STEP * STEP, start + BLOCK), hi)
        return mid, hi
    return T, T


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos, lo, hi, T, W, qk_scale, cap2, window,
               HS: tl.constexpr, HS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
               PREC: tl.constexpr):
    offs_d = tl.arange(0, HS_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv = offs_n[:, None] * W + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HS)
        k = tl.load(k_base + kv, mask=kv_mask, other=0.0)       # (BLOCK_N,HS_PAD)
        qk = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap2,
                     SOFTCAP)                                   # (BLOCK_M,BLOCK_N)
        if MASK:
            qk = tl.where(_visible(pos[:, None], offs_n[None, :], window, WINDOW), qk,
                          -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_ref = m_new
        if WINDOW:
            # a row may have seen no key yet (all masked): exp2(-inf - -inf) would be nan
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + kv, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _rows(T, NH, NKV, HS: tl.constexpr, HS_PAD: tl.constexpr, HEADS: tl.constexpr,
          BLOCK: tl.constexpr):
    """A forward or dQ program's rows: HEADS query heads of one group at each of BLOCK / HEADS
    positions from start. Returns start, the row stride W of qkv, the batch b, the rows'
    positions and heads (BLOCK,), the offsets from the batch's base of their q in
    (B,T,W) and of their output in (B,T,NH*HS), their mask (BLOCK,HS_PAD), and the offset of
    their group's k (v at + NKV*HS)."""
    start = tl.program_id(0) * (BLOCK // HEADS)
    b = (tl.program_id(1) // (NH // HEADS)).to(tl.int64)
    h0 = tl.program_id(1) % (NH // HEADS) * HEADS
    W = (NH + 2 * NKV) * HS
    r = tl.arange(0, BLOCK)
    pos, head = start + r // HEADS, h0 + r % HEADS
    offs_d = tl.arange(0, HS_PAD)
    mask = (pos[:, None] < T) & (offs_d[None, :] < HS)
    q_offs = pos[:, None] * W + head[:, None] * HS + offs_d[None, :]
    o_offs = pos[:, None] * (NH * HS) + head[:, None] * HS + offs_d[None, :]
    return start, W, b, pos, head, q_offs, o_offs, mask, (NH + h0 // (NH // NKV)) * HS


@triton.autotune(configs=_FWD, **_tuning(triton.Config(dict(BLOCK_M=32, BLOCK_N=32),
                                                     num_warps=4, num_stages=2),
                                        _FWD_WIDE, ["HEADS", *_VARIANT]))
@triton.jit
def _attention_forward_kernel(out, lse, qkv, T, NH, NKV, qk_scale, cap2, window,
                              HS: tl.constexpr, HS_PAD: tl.constexpr, HEADS: tl.constexpr,
                              SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start, W, b, pos, head, q_offs, o_offs, mask, k_off = _rows(T, NH, NKV, HS, HS_PAD,
                                                                HEADS, BLOCK_M)
    P = BLOCK_M // HEADS                                        # positions
    base = qkv + b * T * W
    q = tl.load(base + q_offs, mask=mask, other=0.0)
    k_base, v_base = base + k_off, base + k_off + NKV * HS
    acc = tl.zeros([BLOCK_M, HS_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    lo, mid, diag = _key_blocks(start, P, window, BLOCK_N, WINDOW)
    if WINDOW:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos, lo, mid, T, W,
                                   qk_scale, cap2, window, HS, HS_PAD, BLOCK_N, True, SOFTCAP,
                                   WINDOW, PREC)
    # key blocks wholly inside every row's view need no mask; the diagonal ones do
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos, mid, diag, T, W,
                               qk_scale, cap2, window, HS, HS_PAD, BLOCK_N, False, SOFTCAP,
                               WINDOW, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos, diag, start + P, T, W,
                               qk_scale, cap2, window, HS, HS_PAD, BLOCK_N, True, SOFTCAP,
                               WINDOW, PREC)
    acc = acc / l_i[:, None]
    tl.store(out + b * T * NH * HS + o_offs, acc.to(out.dtype.element_ty), mask=mask)
    tl.store(lse + b * NH * T + head * T + pos, (m_i + tl.math.log2(l_i)) / LOG2E,
             mask=pos < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, T, W, C,
                qk_scale, cap2, window, HS: tl.constexpr, HS_PAD: tl.constexpr,
                STEP: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                WINDOW: tl.constexpr, PREC: tl.constexpr):
    # one block of keys against the query blocks lo..hi of one head; works transposed:
    # (keys, queries)
    offs_d = tl.arange(0, HS_PAD)
    for start_m in range(lo, hi, STEP):
        offs_m = start_m + tl.arange(0, STEP)
        m_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HS)
        q = tl.load(q_base + offs_m[:, None] * W + offs_d[None, :], mask=m_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * C + offs_d[None, :], mask=m_mask, other=0.0)
        # rows past T: lse = +inf makes their probabilities 0
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf")) * LOG2E
        Di = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        sT = _scores(tl.dot(k, tl.trans(q), input_precision=PREC), qk_scale, cap2, SOFTCAP)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASK:
            pT = tl.where(_visible(offs_m[None, :], offs_n[:, None], window, WINDOW), pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = _softcap_grad(pT * (dpT - Di[None, :]), sT, cap2, SOFTCAP)
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse2, Di, k_base, v_base, pos, lo, hi, T, W, qk_scale, cap2, window,
              HS: tl.constexpr, HS_PAD: tl.constexpr, STEP: tl.constexpr, MASK: tl.constexpr,
              SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr):
    # one block of queries against the key blocks lo..hi
    offs_d = tl.arange(0, HS_PAD)
    for start_n in range(lo, hi, STEP):
        offs_n = start_n + tl.arange(0, STEP)
        kv = offs_n[:, None] * W + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HS)
        k = tl.load(k_base + kv, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv, mask=kv_mask, other=0.0)
        s = _scores(tl.dot(q, tl.trans(k), input_precision=PREC), qk_scale, cap2, SOFTCAP)
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_visible(pos[:, None], offs_n[None, :], window, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = _softcap_grad(p * (dp - Di[:, None]), s, cap2, SOFTCAP)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.autotune(configs=_BWD, **_tuning(_SMALL_FP32, _BWD_WIDE, ["HEADS", *_VARIANT]))
@triton.jit
def _attention_dq_kernel(dinp, delta, dout, qkv, out, lse, T, NH, NKV, qk_scale, cap2, scale,
                         window, HS: tl.constexpr, HS_PAD: tl.constexpr, HEADS: tl.constexpr,
                         SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PREC: tl.constexpr,
                         BLOCK: tl.constexpr, STEP: tl.constexpr):
    # D = rowsum(dO * O) and dQ for HEADS heads at BLOCK / HEADS query positions: the key
    # blocks on the window's edge, those seen whole, then the diagonal; D is kept for the
    # dK, dV kernel
    start, W, b, pos, head, q_offs, o_offs, mask, k_off = _rows(T, NH, NKV, HS, HS_PAD,
                                                                HEADS, BLOCK)
    P = BLOCK // HEADS                                          # positions
    base, o_base = qkv + b * T * W, b * T * NH * HS
    do = tl.load(dout + o_base + o_offs, mask=mask, other=0.0)         # (BLOCK,HS_PAD)
    o = tl.load(out + o_base + o_offs, mask=mask, other=0.0)           # (BLOCK,HS_PAD)
    Di = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)         # (BLOCK,)
    stats, rows = b * NH * T, head * T + pos                  # in (B,NH,T): lse, delta
    tl.store(delta + stats + rows, Di, mask=pos < T)
    q = tl.load(base + q_offs, mask=mask, other=0.0)                   # (BLOCK,HS_PAD)
    lse2 = tl.load(lse + stats + rows, mask=pos < T, other=float("inf")) * LOG2E
    k_base, v_base = base + k_off, base + k_off + NKV * HS
    dq = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    lo, mid, diag = _key_blocks(start, P, window, STEP, WINDOW)
    if WINDOW:
        dq = _dq_inner(dq, q, do, lse2, Di, k_base, v_base, pos, lo, mid, T, W, qk_scale, cap2,
                       window, HS, HS_PAD, STEP, True, SOFTCAP, WINDOW, PREC)
    dq = _dq_inner(dq, q, do, lse2, Di, k_base, v_base, pos, mid, diag, T, W, qk_scale, cap2,
                   window, HS, HS_PAD, STEP, False, SOFTCAP, WINDOW, PREC)
    dq = _dq_inner(dq, q, do, lse2, Di, k_base, v_base, pos, diag, start + P, T, W, qk_scale,
                   cap2, window, HS, HS_PAD, STEP, True, SOFTCAP, WINDOW, PREC)
    tl.store(dinp + b * T * W + q_offs, (dq * scale).to(dinp.dtype.element_ty), mask=mask)


@triton.jit
def _dkdv_head(dk, dv, k, v, qkv, dout, lse, delta, b, h, offs, start, mid, hi, T, NH, W,
               qk_scale, cap2, window, HS: tl.constexpr, HS_PAD: tl.constexpr,
               BLOCK: tl.constexpr, STEP: tl.constexpr, SOFTCAP: tl.constexpr,
               WINDOW: tl.constexpr, PREC: tl.constexpr):
    # a block of keys against query head h: the diagonal query blocks (masked), those that see
    # every key whole, then those on the window's edge (masked)
    q_base = qkv + b * T * W + h * HS
    do_base = dout + b * T * NH * HS + h * HS
    rows = (b * NH + h) * T
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse + rows, delta + rows, offs, start,
                         start + BLOCK, T, W, NH * HS, qk_scale, cap2, window, HS, HS_PAD, STEP,
                         True, SOFTCAP, WINDOW, PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse + rows, delta + rows, offs,
                         start + BLOCK, mid, T, W, NH * HS, qk_scale, cap2, window, HS, HS_PAD,
                         STEP, False, SOFTCAP, WINDOW, PREC)
    if WINDOW:
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse + rows, delta + rows, offs, mid,
                             hi, T, W, NH * HS, qk_scale, cap2, window, HS, HS_PAD, STEP, True,
                             SOFTCAP, WINDOW, PREC)
    return dk, dv


@triton.autotune(configs=_BWD, **_tuning(_SMALL_FP32, _BWD_WIDE, ["GROUPED", *_VARIANT]))
@triton.jit
def _attention_dkdv_kernel(dinp, dout, qkv, lse, delta, T, NH, NKV, qk_scale, cap2, scale,
                           window, HS: tl.constexpr, HS_PAD: tl.constexpr,
                           GROUPED: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr,
                           PREC: tl.constexpr, BLOCK: tl.constexpr, STEP: tl.constexpr):
    # dK, dV for the keys start..start+BLOCK of one kv head, summed over its group's query
    # heads in turn (GROUPED: more than one)
    tl.static_assert(BLOCK % STEP == 0)        # else a step straddles the diagonal unmasked
    start = tl.program_id(0) * BLOCK
    b = (tl.program_id(1) // NKV).to(tl.int64)
    kvh = tl.program_id(1) % NKV
    G = NH // NKV
    W = (NH + 2 * NKV) * HS
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HS_PAD)
    mask = (offs[:, None] < T) & (offs_d[None, :] < HS)
    k_base = b * T * W + (NH + kvh) * HS                        # v at + NKV * HS
    kv_offs = offs[:, None] * W + offs_d[None, :]
    k = tl.load(qkv + k_base + kv_offs, mask=mask, other=0.0)          # (BLOCK,HS_PAD)
    v = tl.load(qkv + k_base + NKV * HS + kv_offs, mask=mask, other=0.0)   # (BLOCK,HS_PAD)
    dk = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    mid, hi = _query_blocks(start, T, window, BLOCK, STEP, WINDOW)
    if GROUPED:
        for h in range(kvh * G, kvh * G + G):
            dk, dv = _dkdv_head(dk, dv, k, v, qkv, dout, lse, delta, b, h, offs, start, mid, hi,
                                T, NH, W, qk_scale, cap2, window, HS, HS_PAD, BLOCK, STEP,
                                SOFTCAP, WINDOW, PREC)
    else:
        # one query head (GPT-2): no loop around the inner ones, which an outer loop would
        # cost registers
        dk, dv = _dkdv_head(dk, dv, k, v, qkv, dout, lse, delta, b, kvh, offs, start, mid, hi,
                            T, NH, W, qk_scale, cap2, window, HS, HS_PAD, BLOCK, STEP, SOFTCAP,
                            WINDOW, PREC)
    ty = dinp.dtype.element_ty
    tl.store(dinp + k_base + kv_offs, (dk * scale).to(ty), mask=mask)
    tl.store(dinp + k_base + NKV * HS + kv_offs, dv.to(ty), mask=mask)


def _shapes(inp, out, lse, scale, softcap, window):
    """B, NH, NKV, T, the softmax scale, the scores' constants (qk_scale, cap2), the query heads
    that a forward or dQ program takes, and the constexprs every kernel here takes."""
    B, NH, T = lse.shape
    hd = out.shape[-1] // NH
    NKV = (inp.shape[-1] // hd - NH) // 2
    assert NKV >= 1 and NH % NKV == 0 and inp.shape[-1] == (NH + 2 * NKV) * hd, \
        "attention: qkv must hold NH query heads and NH/G key and value heads"
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    qk_scale = scale / softcap if softcap > 0 else scale * math.log2(math.e)
    G = NH // NKV
    meta = dict(HS=hd, HS_PAD=max(16, triton.next_power_of_2(hd)), SOFTCAP=softcap > 0,
                WINDOW=0 < window < T,          # a window of T or more hides nothing
                # fp32 operands: exact fp32 products (tl.dot would round them to tf32 by default)
                PREC="ieee" if inp.dtype == torch.float32 else "tf32")
    return (B, NH, NKV, T, scale, qk_scale, softcap * math.log2(math.e), min(G & -G, 8), meta)


def attention_forward(out, lse, inp, scale=None, softcap=0.0, window=0):
    # out: (B,T,NH*hd), lse: (B,NH,T) float32, inp: (B,T,(NH+2*NKV)*hd) holding q, k, v heads;
    # scale: None for 1/sqrt(hd); softcap > 0: capped scores; window > 0: i - window < j <= i
    B, NH, NKV, T, scale, qk_scale, cap2, heads, meta = _shapes(inp, out, lse, scale, softcap,
                                                                window)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"] // heads), B * NH // heads)  # noqa: E731
    _attention_forward_kernel[grid](out, lse, inp, T, NH, NKV, qk_scale, cap2, window,
                                    HEADS=heads, **meta)


def attention_backward(dinp, dout, inp, out, lse, scale=None, softcap=0.0, window=0):
    # dinp: (B,T,(NH+2*NKV)*hd) written, dout: (B,T,NH*hd), inp: as the forward's, out:
    # (B,T,NH*hd) the forward's output, lse: (B,NH,T) float32 the forward's logsumexp;
    # scale, softcap, window: as the forward's
    B, NH, NKV, T, scale, qk_scale, cap2, heads, meta = _shapes(inp, out, lse, scale, softcap,
                                                                window)
    delta = torch.empty((B, NH, T), dtype=torch.float32, device=inp.device)   # D, per row
    _attention_dq_kernel[lambda m: (triton.cdiv(T, m["BLOCK"] // heads), B * NH // heads)](
        dinp, delta, dout, inp, out, lse, T, NH, NKV, qk_scale, cap2, scale, window,
        HEADS=heads, **meta)
    _attention_dkdv_kernel[lambda m: (triton.cdiv(T, m["BLOCK"]), B * NKV)](
        dinp, dout, inp, lse, delta, T, NH, NKV, qk_scale, cap2, scale, window,
        GROUPED=NH > NKV, **meta)
