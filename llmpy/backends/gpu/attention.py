"""Causal flash attention, forward and backward (FlashAttention-2's algorithm).

The (T,T) scores never reach memory. The forward walks over blocks of keys with an online
softmax (running max m and running sum l per query row) and saves one logsumexp per row. The
backward recomputes each block of probabilities from q, k and that logsumexp:
    P = exp(q k^T * scale - lse),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),
    dQ = dS K * scale,  dK = dS^T Q * scale,  with D = rowsum(dO * O).
The backward is two kernels, each program owning one block: of queries, for D and dQ (three
matmuls per block of keys), then of keys, for dK and dV (four per block of queries). So every
gradient element is written by exactly one program: deterministic, no atomics, where
FlashAttention-2 does five matmuls and adds dQ atomically (in any order; adding it in a fixed
order instead measured slower than these seven). The gradient is written, not added (the
backend's writes_activation_grads): the qkv matmul's backward is its only reader.

Layouts: qkv (B,T,3C) holds q, k, v for all heads, head h at channels h*hs..(h+1)*hs of each;
out (B,T,C); lse (B,NH,T) float32, natural log. The exponentials use exp2, so scores are kept
in log2 units inside the kernels (qk_scale = scale * log2(e)).
"""
import math

import torch
import triton
import triton.language as tl

from .launch import CACHED, configs

LOG2E = tl.constexpr(1.4426950408889634)


def _tuning(small_fp32):
    """Autotuning per (T, head size): short sequences take the last config without comparing, as
    that would only cost compiles. So does float32 on a GPU, which only the tests run there:
    small_fp32, since its large blocks take up to ~30 s each to compile. See CACHED."""
    def prune(candidates, named_args, **kwargs):
        if torch.cuda.is_available() and named_args["qkv"].dtype == torch.float32:
            return [small_fp32]
        return candidates if named_args["T"] >= 512 else candidates[-1:]
    return dict(key=["T", "HS_PAD"], prune_configs_by={"early_config_prune": prune}, **CACHED)


# Candidates around FlashAttention-2's Triton settings for head size 64 (deeper pipelines suit
# Hopper); the first use at each (T, head size) times them all (a few seconds of compiling).
_FWD = configs([(dict(BLOCK_M=128, BLOCK_N=64), 8, 3), (dict(BLOCK_M=128, BLOCK_N=64), 4, 3),
               (dict(BLOCK_M=128, BLOCK_N=64), 4, 4), (dict(BLOCK_M=128, BLOCK_N=128), 8, 3),
               (dict(BLOCK_M=64, BLOCK_N=64), 4, 4), (dict(BLOCK_M=64, BLOCK_N=64), 4, 3)],
               dict(BLOCK_M=16, BLOCK_N=16))
# Candidates for both backward kernels, each timed on its own. BLOCK (the rows a program owns) is
# a multiple of STEP (the rows it walks at a time), as a step must not straddle the diagonal.
_BWD = configs([(dict(BLOCK=128, STEP=32), 8, 3), (dict(BLOCK=128, STEP=64), 8, 2),
               (dict(BLOCK=128, STEP=64), 8, 3), (dict(BLOCK=64, STEP=32), 4, 3),
               (dict(BLOCK=64, STEP=64), 4, 3), (dict(BLOCK=64, STEP=64), 4, 2)],
               dict(BLOCK=16, STEP=16))
_SMALL_FP32 = triton.Config(dict(BLOCK=32, STEP=16), num_warps=4, num_stages=2)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, offs_m, lo, hi, T, row_stride, qk_scale,
               HS: tl.constexpr, HS_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    offs_d = tl.arange(0, HS_PAD)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv = offs_n[:, None] * row_stride + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HS)
        k = tl.load(k_base + kv, mask=kv_mask, other=0.0)       # (BLOCK_N,HS_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale   # (BLOCK_M,BLOCK_N)
        if CAUSAL_MASK:
            qk = tl.where(offs_m[:, None] >= offs_n[None, :], qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + kv, mask=kv_mask, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_FWD, **_tuning(triton.Config(dict(BLOCK_M=32, BLOCK_N=32),
                                                     num_warps=4, num_stages=2)))
@triton.jit
def _attention_forward_kernel(out, lse, qkv, T, NH, C, qk_scale, HS: tl.constexpr,
                              HS_PAD: tl.constexpr, PREC: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b, h = (bh // NH).to(tl.int64), bh % NH
    q_base = qkv + b * T * 3 * C + h * HS
    o_base = out + b * T * C + h * HS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HS_PAD)
    q_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HS)
    q = tl.load(q_base + offs_m[:, None] * 3 * C + offs_d[None, :], mask=q_mask, other=0.0)
    acc = tl.zeros([BLOCK_M, HS_PAD], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -float("inf"), dtype=tl.float32)
    # key blocks wholly below the diagonal need no mask; the diagonal block does
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_base + C, q_base + 2 * C, offs_m, 0, start_m,
                               T, 3 * C, qk_scale, HS, HS_PAD, BLOCK_N, False, PREC)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, q_base + C, q_base + 2 * C, offs_m, start_m,
                               start_m + BLOCK_M, T, 3 * C, qk_scale, HS, HS_PAD, BLOCK_N, True,
                               PREC)
    acc = acc / l_i[:, None]
    tl.store(o_base + offs_m[:, None] * C + offs_d[None, :], acc.to(out.dtype.element_ty),
             mask=q_mask)
    tl.store(lse + bh * T + offs_m, (m_i + tl.math.log2(l_i)) / LOG2E,
             mask=offs_m < T)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs_n, lo, hi, T, C,
                qk_scale, HS: tl.constexpr, HS_PAD: tl.constexpr, STEP: tl.constexpr,
                CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    # one block of keys against the query blocks lo..hi; works transposed: (keys, queries)
    offs_d = tl.arange(0, HS_PAD)
    for start_m in range(lo, hi, STEP):
        offs_m = start_m + tl.arange(0, STEP)
        m_mask = (offs_m[:, None] < T) & (offs_d[None, :] < HS)
        q = tl.load(q_base + offs_m[:, None] * 3 * C + offs_d[None, :], mask=m_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * C + offs_d[None, :], mask=m_mask, other=0.0)
        # rows past T: lse = +inf makes their probabilities 0
        lse2 = tl.load(lse_base + offs_m, mask=offs_m < T, other=float("inf")) * LOG2E
        Di = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        pT = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse2[None, :])
        if CAUSAL_MASK:
            pT = tl.where(offs_m[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - Di[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
    return dk, dv


@triton.jit
def _dq_inner(dq, q, do, lse2, Di, k_base, v_base, offs_m, lo, hi, T, C, qk_scale,
              HS: tl.constexpr, HS_PAD: tl.constexpr, STEP: tl.constexpr,
              CAUSAL_MASK: tl.constexpr, PREC: tl.constexpr):
    # one block of queries against the key blocks lo..hi
    offs_d = tl.arange(0, HS_PAD)
    for start_n in range(lo, hi, STEP):
        offs_n = start_n + tl.arange(0, STEP)
        kv = offs_n[:, None] * 3 * C + offs_d[None, :]
        kv_mask = (offs_n[:, None] < T) & (offs_d[None, :] < HS)
        k = tl.load(k_base + kv, mask=kv_mask, other=0.0)
        v = tl.load(v_base + kv, mask=kv_mask, other=0.0)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse2[:, None])
        if CAUSAL_MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - Di[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
    return dq


@triton.jit
def _block(qkv, dinp, lse, delta, T, NH, C, HS: tl.constexpr, HS_PAD: tl.constexpr,
           BLOCK: tl.constexpr):
    """This program's first row, its head's bases in qkv and dinp (B,T,3C), its head's offset in
    (B,T,C), its lse and delta rows (T,), its rows offs (BLOCK,), their offsets from the head's
    base in (B,T,3C) and in (B,T,C), and their mask, each (BLOCK,HS_PAD)."""
    start = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    b, h = (bh // NH).to(tl.int64), bh % NH
    q_base = qkv + b * T * 3 * C + h * HS                       # k at +C, v at +2C
    dinp_base = dinp + b * T * 3 * C + h * HS
    offs = start + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HS_PAD)
    mask = (offs[:, None] < T) & (offs_d[None, :] < HS)
    return (start, q_base, dinp_base, b * T * C + h * HS, lse + bh * T, delta + bh * T, offs,
            offs[:, None] * 3 * C + offs_d[None, :], offs[:, None] * C + offs_d[None, :], mask)


@triton.autotune(configs=_BWD, **_tuning(_SMALL_FP32))
@triton.jit
def _attention_dq_kernel(dinp, delta, dout, qkv, out, lse, T, NH, C, qk_scale, scale,
                         HS: tl.constexpr, HS_PAD: tl.constexpr, PREC: tl.constexpr,
                         BLOCK: tl.constexpr, STEP: tl.constexpr):
    # D = rowsum(dO * O) and dQ for the queries start..start+BLOCK: the key blocks below the
    # diagonal, then the diagonal; D is kept for the dK, dV kernel
    start, q_base, dinp_base, head, lse_base, delta_base, offs, qkv_offs, o_offs, mask = _block(
        qkv, dinp, lse, delta, T, NH, C, HS, HS_PAD, BLOCK)
    do = tl.load(dout + head + o_offs, mask=mask, other=0.0)            # (BLOCK,HS_PAD)
    o = tl.load(out + head + o_offs, mask=mask, other=0.0)              # (BLOCK,HS_PAD)
    Di = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)          # (BLOCK,)
    tl.store(delta_base + offs, Di, mask=offs < T)
    q = tl.load(q_base + qkv_offs, mask=mask, other=0.0)                # (BLOCK,HS_PAD)
    lse2 = tl.load(lse_base + offs, mask=offs < T, other=float("inf")) * LOG2E
    dq = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, Di, q_base + C, q_base + 2 * C, offs, 0, start, T, C,
                   qk_scale, HS, HS_PAD, STEP, False, PREC)
    dq = _dq_inner(dq, q, do, lse2, Di, q_base + C, q_base + 2 * C, offs, start, start + BLOCK,
                   T, C, qk_scale, HS, HS_PAD, STEP, True, PREC)
    tl.store(dinp_base + qkv_offs, (dq * scale).to(dinp.dtype.element_ty), mask=mask)


@triton.autotune(configs=_BWD, **_tuning(_SMALL_FP32))
@triton.jit
def _attention_dkdv_kernel(dinp, dout, qkv, lse, delta, T, NH, C, qk_scale, scale,
                           HS: tl.constexpr, HS_PAD: tl.constexpr, PREC: tl.constexpr,
                           BLOCK: tl.constexpr, STEP: tl.constexpr):
    # dK, dV for the keys start..start+BLOCK: the diagonal query blocks (masked), then the rest
    start, q_base, dinp_base, head, lse_base, delta_base, offs, qkv_offs, _, mask = _block(
        qkv, dinp, lse, delta, T, NH, C, HS, HS_PAD, BLOCK)
    do_base = dout + head
    k = tl.load(q_base + C + qkv_offs, mask=mask, other=0.0)            # (BLOCK,HS_PAD)
    v = tl.load(q_base + 2 * C + qkv_offs, mask=mask, other=0.0)        # (BLOCK,HS_PAD)
    dk = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK, HS_PAD], dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs, start,
                         start + BLOCK, T, C, qk_scale, HS, HS_PAD, STEP, True, PREC)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, offs,
                         start + BLOCK, T, T, C, qk_scale, HS, HS_PAD, STEP, False, PREC)
    ty = dinp.dtype.element_ty
    tl.store(dinp_base + C + qkv_offs, (dk * scale).to(ty), mask=mask)
    tl.store(dinp_base + 2 * C + qkv_offs, dv.to(ty), mask=mask)


def _shapes(inp, lse):
    """B, NH, T, C, the softmax scale, and the constexprs every kernel here takes."""
    B, NH, T = lse.shape
    C = inp.shape[-1] // 3
    hs = C // NH
    # fp32 operands: exact fp32 products (tl.dot would round them to tf32 by default)
    meta = dict(HS=hs, HS_PAD=max(16, triton.next_power_of_2(hs)),
                PREC="ieee" if inp.dtype == torch.float32 else "tf32")
    return B, NH, T, C, 1.0 / math.sqrt(hs), meta


def attention_forward(out, lse, inp):
    # out: (B,T,C), lse: (B,NH,T) float32, inp: (B,T,3C) holding q,k,v
    B, NH, T, C, scale, meta = _shapes(inp, lse)
    grid = lambda m: (triton.cdiv(T, m["BLOCK_M"]), B * NH)  # noqa: E731
    _attention_forward_kernel[grid](out, lse, inp, T, NH, C, scale * math.log2(math.e), **meta)


def attention_backward(dinp, dout, inp, out, lse):
    # dinp: (B,T,3C), dout: (B,T,C), inp: (B,T,3C), out: (B,T,C) the forward's output,
    # lse: (B,NH,T) float32 the forward's logsumexp
    B, NH, T, C, scale, meta = _shapes(inp, lse)
    delta = torch.empty((B, NH, T), dtype=torch.float32, device=inp.device)   # D, per row
    grid = lambda m: (triton.cdiv(T, m["BLOCK"]), B * NH)  # noqa: E731
    qk_scale = scale * math.log2(math.e)
    _attention_dq_kernel[grid](dinp, delta, dout, inp, out, lse, T, NH, C, qk_scale, scale,
                               **meta)
    _attention_dkdv_kernel[grid](dinp, dout, inp, lse, delta, T, NH, C, qk_scale, scale, **meta)
