"""The fast CPU backend: the NumPy reference's ops and signatures, as Numba kernels and BLAS.

- Matmuls are single-precision BLAS calls (scipy's sgemm) on the arrays in place: a C-contiguous
  (M,K) array is the Fortran-contiguous transpose of itself, so passing `.T` views with the
  right transpose flags reaches BLAS with no copy, and beta=1 makes the backward's `+=`
  part of the GEMM instead of a temporary plus an addition.
- Everything else is one fused Numba loop per op, writing into the preallocated outputs. The
  big ones (attention, GELU, cross-entropy, AdamW) split their rows or elements over all cores;
  ops on a (B,T,C) tensor take microseconds, less than waking the threads would cost.
- Element-wise math runs in float32 like the reference (constants are float32, so nothing is
  promoted). The long sums accumulate in float64: layernorm statistics, the classifier's softmax
  over the vocabulary, and the parameter gradients' sums over the B*T rows; the short ones (a
  head's dot products, an attention row's softmax, dwpe's sum over B) in float32, as BLAS does.
Without numba or scipy the import fails and the backend is simply unavailable.

Threads: llmpy.backends.set_thread_env, called where a process starts, shortens the spin of
Numba's OpenMP threads and OpenBLAS's, which take turns on the same cores (see there).
"""
import math
import sys

import numpy as np
from numba import njit, prange
from scipy.linalg.blas import sgemm

from ..base import Backend
from ..numpy import sum_squares, to_device, to_host, zeros  # noqa: F401  (as the reference)


def make():
    """This module's ops as a Backend (backends/base.py)."""
    return Backend("cpu", sys.modules[__name__], zeros=zeros, to_device=to_device,
                   to_host=to_host)


# reassoc lets LLVM vectorise sums; contract lets it use FMAs. No nnan/ninf: -inf and NaN
# behave as in the reference. error_model="numpy": x/0 gives inf like NumPy instead of a
# Python exception (the check would also block vectorisation).
_JIT = dict(cache=True, fastmath={"reassoc", "contract"}, error_model="numpy")
kernel = njit(**_JIT)
threaded = njit(parallel=True, **_JIT)

ZERO, ONE, TWO = np.float32(0.0), np.float32(1.0), np.float32(2.0)
NEG_INF = np.float32(-np.inf)
# matmul_forward streams the weights past up to this many rows (sampling, or a tiny batch):
# sgemm's fixed cost (packing the weights) loses up to about 12 rows at GPT-2's shapes here,
# and wins from 16; 8 stays clear of that crossover, which moves with the machine
FEW_ROWS = 8
GELU_SCALE = np.float32(math.sqrt(2.0 / math.pi))
GELU_CUBE = np.float32(0.044715)


# ----------------------------------------------------------------------------- encoder

@kernel
def encoder_forward(out, inp, wte, wpe):
    # out: (B,T,C), inp: (B,T) int, wte: (Vp,C), wpe: (maxT,C)
    B, T, C = out.shape
    for b in range(B):
        for t in range(T):
            tok = inp[b, t]
            for c in range(C):
                out[b, t, c] = wte[tok, c] + wpe[t, c]


@kernel
def encoder_backward(dwte, dwpe, dout, inp):
    # dwte: (Vp,C), dwpe: (maxT,C), dout: (B,T,C), inp: (B,T) int
    B, T, C = dout.shape
    for b in range(B):                          # in order: repeated ids accumulate
        for t in range(T):
            tok = inp[b, t]
            for c in range(C):
                dwte[tok, c] += dout[b, t, c]
    for t in range(T):
        for c in range(C):
            s = ZERO
            for b in range(B):
                s += dout[b, t, c]
            dwpe[t, c] += s


# ----------------------------------------------------------------------------- layernorm

@kernel
def _layernorm_row(out, mean, rstd, i, x, weight, bias, eps):
    # row i: out[i]: (C,) the layernorm of x: (C,), and its mean[i], rstd[i]
    C = x.shape[0]
    s = 0.0
    for c in range(C):
        s += x[c]
    m = s / C
    var = 0.0
    for c in range(C):
        d = x[c] - m
        var += d * d
    mean[i] = m
    rstd[i] = 1.0 / math.sqrt(var / C + eps)                   # biased variance, as torch
    m32, r32 = mean[i], rstd[i]
    for c in range(C):
        out[i, c] = (x[c] - m32) * r32 * weight[c] + bias[c]


@kernel
def _layernorm_forward(out, mean, rstd, inp, weight, bias, eps):
    # out: (N,C), mean: (N,), rstd: (N,), inp: (N,C), weight: (C,), bias: (C,)
    for i in range(inp.shape[0]):
        _layernorm_row(out, mean, rstd, i, inp[i], weight, bias, eps)


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=1e-5):
    # out: (B,T,C), mean: (B,T), rstd: (B,T), inp: (B,T,C), weight: (C,), bias: (C,)
    C = inp.shape[-1]
    _layernorm_forward(out.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1),
                       inp.reshape(-1, C), weight, bias, eps)


@kernel
def _residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias, eps):
    # residual, out, inp1, inp2: (N,C), mean, rstd: (N,), weight, bias: (C,)
    N, C = inp1.shape
    for i in range(N):
        for c in range(C):
            residual[i, c] = inp1[i, c] + inp2[i, c]
        _layernorm_row(out, mean, rstd, i, residual[i], weight, bias, eps)


def residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias,
                               eps=1e-5):
    # residual: (B,T,C) = inp1 + inp2; out: (B,T,C), mean, rstd: (B,T) its layernorm with
    # weight, bias: (C,). One pass over the rows: each is normalised while still in cache.
    C = inp1.shape[-1]
    _residual_layernorm_forward(residual.reshape(-1, C), out.reshape(-1, C), mean.reshape(-1),
                                rstd.reshape(-1), inp1.reshape(-1, C), inp2.reshape(-1, C),
                                weight, bias, eps)


@kernel
def _layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    # dinp: (N,C), dweight: (C,), dbias: (C,), dout: (N,C), inp: (N,C), weight: (C,),
    # mean: (N,), rstd: (N,). See doc/layernorm.md for the derivation.
    N, C = inp.shape
    dw = np.zeros(C)                            # (C,) float64 sums over the rows
    db = np.zeros(C)
    for i in range(N):
        m, r = mean[i], rstd[i]
        dnorm_mean = 0.0
        dnorm_norm_mean = 0.0
        for c in range(C):
            dnorm = dout[i, c] * weight[c]
            dnorm_mean += dnorm
            dnorm_norm_mean += dnorm * ((inp[i, c] - m) * r)
        a = np.float32(dnorm_mean / C)
        b = np.float32(dnorm_norm_mean / C)
        for c in range(C):
            norm = (inp[i, c] - m) * r
            db[c] += dout[i, c]
            dw[c] += dout[i, c] * norm
            dinp[i, c] += (dout[i, c] * weight[c] - a - norm * b) * r
    dweight += dw
    dbias += db


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    # dinp: (B,T,C), dweight: (C,), dbias: (C,), dout: (B,T,C), inp: (B,T,C), weight: (C,),
    # mean: (B,T), rstd: (B,T)
    C = inp.shape[-1]
    _layernorm_backward(dinp.reshape(-1, C), dweight, dbias, dout.reshape(-1, C),
                        inp.reshape(-1, C), weight, mean.reshape(-1), rstd.reshape(-1))


# ----------------------------------------------------------------------------- matmul

def _gemm(c, a, b, trans_a, trans_b, beta):
    """c = op(a) @ op(b) + beta * c for C-contiguous float32 2-D arrays, in place.
    Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T, and each array's .T is its
    Fortran-contiguous transpose, so BLAS reads and writes all three where they are."""
    ct = c.T
    res = sgemm(1.0, b.T, a.T, beta=beta, c=ct, trans_a=trans_b, trans_b=trans_a, overwrite_c=1)
    if res is not ct:       # sgemm copied c (wrong dtype or layout), so c was not written
        raise ValueError("matmul outputs must be C-contiguous float32 arrays")


@kernel
def _add_column_sums(dst, x):
    # dst: (N,) += the sum over the rows of x: (M,N), summed in float64, as dst += x.sum(0)
    acc = np.zeros(x.shape[1])                                  # (N,) float64
    for i in range(x.shape[0]):
        acc += x[i]
    dst += acc


@threaded
def _matmul_few_rows(out, inp, weight):
    # out: (M,OC) = inp (M,C) @ weight (OC,C)^T, for a few rows M. Each weight row is read
    # from memory once and reused from cache for every input row, so this streams the weights;
    # threads that split their rows reach the full bandwidth, which BLAS's gemv did not here
    # (about a third of it), and BLAS's sgemm with a few rows was slower still.
    for o in prange(weight.shape[0]):
        for m in range(inp.shape[0]):
            s = ZERO
            for c in range(weight.shape[1]):
                s += weight[o, c] * inp[m, c]
            out[m, o] = s


def matmul_forward(out, inp, weight, bias):
    # out: (B,T,OC), inp: (B,T,C), weight: (OC,C), bias: (OC,) or None
    OC, C = weight.shape
    out2 = out.reshape(-1, OC)                                  # (B*T,OC)
    if out2.shape[0] <= FEW_ROWS:                               # e.g. sampling
        _matmul_few_rows(out2, inp.reshape(-1, C), weight)
        if bias is not None:
            out2 += bias
        return
    if bias is not None:
        out2[...] = bias                                        # then the GEMM adds into it
    _gemm(out2, inp.reshape(-1, C), weight, False, True, 0.0 if bias is None else 1.0)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    # dinp: (B,T,C), dweight: (OC,C), dbias: (OC,) or None, dout: (B,T,OC), inp: (B,T,C),
    # weight: (OC,C)
    OC, C = weight.shape
    dout2 = dout.reshape(-1, OC)                                # (B*T,OC)
    _gemm(dinp.reshape(-1, C), dout2, weight, False, False, 1.0)       # dinp += dout @ W
    _gemm(dweight, dout2, inp.reshape(-1, C), True, False, 1.0)        # dW += dout^T @ inp
    if dbias is not None:
        _add_column_sums(dbias, dout2)


# ----------------------------------------------------------------------------- attention

@threaded
def attention_forward(out, preatt, att, inp):
    # out: (B,T,C), preatt: (B,NH,T,T), att: (B,NH,T,T), inp: (B,T,3C) holding q,k,v
    B, NH, T, _ = att.shape
    C = out.shape[2]
    hs = C // NH
    scale = np.float32(1.0 / math.sqrt(hs))
    for i in prange(B * NH * T):               # one query row each; rows of all lengths mix
        b, h, t = i // (NH * T), (i // T) % NH, i % T
        q = inp[b, t, h * hs:(h + 1) * hs]
        pre, a, y = preatt[b, h, t], att[b, h, t], out[b, t, h * hs:(h + 1) * hs]
        mx = NEG_INF
        for t2 in range(t + 1):
            k = inp[b, t2, C + h * hs:C + (h + 1) * hs]
            s = ZERO
            for j in range(hs):
                s += q[j] * k[j]
            pre[t2] = s * scale
            mx = max(mx, pre[t2])
        total = ZERO
        for t2 in range(t + 1):
            a[t2] = math.exp(pre[t2] - mx)
            total += a[t2]
        for t2 in range(t + 1):
            a[t2] /= total
        for t2 in range(t + 1, T):             # causal mask: the future gets no weight
            pre[t2] = NEG_INF
            a[t2] = ZERO
        y[:] = ZERO
        for t2 in range(t + 1):
            v = inp[b, t2, 2 * C + h * hs:2 * C + (h + 1) * hs]
            for j in range(hs):
                y[j] += a[t2] * v[j]


@threaded
def attention_backward(dinp, dpreatt, datt, dout, inp, att):
    # dinp: (B,T,3C), dpreatt: (B,NH,T,T), datt: (B,NH,T,T), dout: (B,T,C), inp: (B,T,3C),
    # att: (B,NH,T,T). Only the causal (t2 <= t) entries of datt and dpreatt are touched:
    # the masked ones have att == 0, so they pass no gradient.
    B, NH, T, _ = att.shape
    C = dout.shape[2]
    hs = C // NH
    scale = np.float32(1.0 / math.sqrt(hs))
    for bh in prange(B * NH):                  # one head each: dk, dv sum over all t >= t2
        b, h = bh // NH, bh % NH
        qo, ko, vo = h * hs, C + h * hs, 2 * C + h * hs
        for t in range(T):
            dy = dout[b, t, qo:qo + hs]
            a, da, dp = att[b, h, t], datt[b, h, t], dpreatt[b, h, t]
            for t2 in range(t + 1):            # y = att @ v
                v, dv = inp[b, t2, vo:vo + hs], dinp[b, t2, vo:vo + hs]
                s = ZERO
                for j in range(hs):
                    s += dy[j] * v[j]
                    dv[j] += a[t2] * dy[j]
                da[t2] += s
            s = ZERO                           # softmax: dpre = att * (datt - sum(datt * att))
            for t2 in range(t + 1):
                s += da[t2] * a[t2]
            for t2 in range(t + 1):
                dp[t2] += a[t2] * (da[t2] - s)
            q, dq = inp[b, t, qo:qo + hs], dinp[b, t, qo:qo + hs]
            for t2 in range(t + 1):            # preatt = q @ k^T * scale
                k, dk = inp[b, t2, ko:ko + hs], dinp[b, t2, ko:ko + hs]
                g = dp[t2] * scale
                for j in range(hs):
                    dq[j] += g * k[j]
                    dk[j] += g * q[j]


# ----------------------------------------------------------------------------- gelu
# GPT-2's tanh GELU, 0.5 x (1 + tanh(u)), written with 0.5 (1 + tanh(u)) = sigmoid(2u):
# one exp instead of a tanh, which compiled code evaluates several times slower.

@threaded
def _gelu_forward(out, inp):
    for i in prange(inp.size):
        x = inp[i]
        u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
        out[i] = x / (ONE + math.exp(-TWO * u))


def gelu_forward(out, inp):
    # out: (N,), inp: (N,), any matching shapes
    _gelu_forward(out.reshape(-1), inp.reshape(-1))


@threaded
def _gelu_backward(dinp, inp, dout):
    for i in prange(inp.size):
        x = inp[i]
        u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
        s = ONE / (ONE + math.exp(-TWO * u))                    # 0.5 (1 + tanh u)
        du = GELU_SCALE * (ONE + np.float32(3.0) * GELU_CUBE * x * x)
        # 0.5 x (1 - tanh^2 u) du = 2 x s (1 - s) du
        dinp[i] += dout[i] * (s + TWO * x * s * (ONE - s) * du)


def gelu_backward(dinp, inp, dout):
    # dinp, inp, dout: matching shapes
    _gelu_backward(dinp.reshape(-1), inp.reshape(-1), dout.reshape(-1))


# ----------------------------------------------------------------------------- residual

@kernel
def _residual_forward(out, inp1, inp2):
    for i in range(out.size):
        out[i] = inp1[i] + inp2[i]


def residual_forward(out, inp1, inp2):
    # out, inp1, inp2: (B,T,C)
    _residual_forward(out.reshape(-1), inp1.reshape(-1), inp2.reshape(-1))


# ----------------------------------------------------------------------------- softmax + cross-entropy

@threaded
def _crossentropy_forward(losses, probs, logits, targets, V):
    # losses: (N,), probs: (N,Vp), logits: (N,Vp), targets: (N,) int
    N, Vp = logits.shape
    for i in prange(N):
        x, p = logits[i], probs[i]
        mx = NEG_INF
        for j in range(V):
            mx = max(mx, x[j])
        s = 0.0
        for j in range(V):
            p[j] = math.exp(x[j] - mx)
            s += p[j]
        s32 = np.float32(s)
        for j in range(V):
            p[j] /= s32
        for j in range(V, Vp):                 # padded logits get probability 0
            p[j] = ZERO
        # -log softmax[target] = log(sum) - (logit[target] - max): no log of a tiny probability
        losses[i] = math.log(s32) - (x[targets[i]] - mx)


def crossentropy_forward(losses, probs, logits, targets, V):
    # losses: (B,T), probs: (B,T,Vp), logits: (B,T,Vp), targets: (B,T) int, V: real vocab size
    Vp = logits.shape[-1]
    _crossentropy_forward(losses.reshape(-1), probs.reshape(-1, Vp), logits.reshape(-1, Vp),
                          targets.reshape(-1), V)


@threaded
def _crossentropy_backward(dlogits, dlosses, probs, targets, V):
    # dlogits: (N,Vp), dlosses: (N,), probs: (N,Vp), targets: (N,) int
    for i in prange(dlogits.shape[0]):
        dl = dlosses[i]
        for j in range(V):
            dlogits[i, j] += probs[i, j] * dl
        dlogits[i, targets[i]] -= dl


def crossentropy_backward(dlogits, dlosses, probs, targets, V):
    # dlogits: (B,T,Vp), dlosses: (B,T), probs: (B,T,Vp), targets: (B,T) int
    Vp = dlogits.shape[-1]
    _crossentropy_backward(dlogits.reshape(-1, Vp), dlosses.reshape(-1), probs.reshape(-1, Vp),
                           targets.reshape(-1), V)


# ----------------------------------------------------------------------------- adamw

@threaded
def _adamw(params, grads, m, v, lr_step, one_m_beta1, beta2, one_m_beta2, eps, decay,
           bc2_sqrt, grad_scale):
    # params, grads, m, v: (N,) float32; scalars float32. One pass over memory, in
    # torch.optim.AdamW's order of operations (decoupled decay first).
    for i in prange(params.size):
        g = grads[i] * grad_scale
        mi = m[i] + one_m_beta1 * (g - m[i])                    # torch's lerp_
        vi = v[i] * beta2 + one_m_beta2 * g * g
        m[i], v[i] = mi, vi
        params[i] = params[i] * decay - lr_step * (mi / (math.sqrt(vi) / bc2_sqrt + eps))


def adamw_update(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay,
                 grad_scale=1.0):
    # params, grads, m, v: (N,) float32; step: 1-based; grad_scale: see the reference
    f = np.float32
    _adamw(params, grads, m, v, f(lr / (1.0 - beta1 ** step)), f(1.0 - beta1), f(beta2),
           f(1.0 - beta2), f(eps), f(1.0 - lr * weight_decay), f(math.sqrt(1.0 - beta2 ** step)),
           f(grad_scale))
