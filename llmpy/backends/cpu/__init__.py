"""The fast CPU backend: the NumPy reference's ops and signatures, as Numba kernels and BLAS.

- Matmuls are single-precision BLAS calls (scipy's sgemm) on the arrays in place: a C-contiguous
  (M,K) array is the Fortran-contiguous transpose of itself, so passing `.T` views with the
  right transpose flags reaches BLAS with no copy, and beta=1 makes the backward's `+=`
  part of the GEMM instead of a temporary plus an addition.
- Everything else is one fused Numba loop per op, writing into the preallocated outputs. The
  big ones (attention, GELU and the gated MLPs, softcap, cross-entropy, AdamW) split their rows
  or elements over all cores; ops on a (B,T,C) tensor (the norms, RoPE, the embedding) take
  microseconds, less than waking the threads would cost.
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
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic
from scipy.linalg.blas import sgemm

from ..base import Backend
from ..numpy import to_device, to_host, zeros  # noqa: F401  (as the reference)


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
# for helpers that take array slices inside hot loops: a call would pass each slice with its
# reference count taken and dropped (atomic operations) and hide the loop from the caller's
# optimiser; inlined in Numba's IR, neither happens
inlined = njit(inline="always", **_JIT)

ZERO, ONE, TWO = np.float32(0.0), np.float32(1.0), np.float32(2.0)
NEG_INF = np.float32(-np.inf)
# matmul_forward streams the weights past up to this many rows (sampling, or a tiny batch):
# sgemm's fixed cost (packing the weights) loses up to about 12 rows at GPT-2's shapes here,
# and wins from 16; 8 stays clear of that crossover, which moves with the machine
FEW_ROWS = 8
GELU_SCALE = np.float32(math.sqrt(2.0 / math.pi))
GELU_CUBE = np.float32(0.044715)


# ----------------------------------------------------------------------------- exp, tanh
# math.exp compiles to a call to libm's expf per element (Numba vectorises it only with Intel's
# SVML, which is rarely installed), and the sigmoids of SiLU and GELU, tanh and the softmaxes
# spend most of their time there. _exp is the same function written out so that LLVM
# vectorises the loops that call it: Cephes' expf (a degree-5 polynomial on
# [-ln2/2, ln2/2] after x = n ln2 + r), with 2^n built in the exponent bits. Within 1 ulp of
# the correctly rounded value; below the smallest normal float it gives 0 instead of a
# subnormal, which no caller here can tell from 0.

@intrinsic
def _bits(typingctx, x):
    # the int32 holding float32 x's IEEE bits (a bitcast: Numba has no scalar view)
    return types.int32(types.float32), lambda ctx, builder, sig, args: builder.bitcast(
        args[0], ir.IntType(32))


@intrinsic
def _from_bits(typingctx, i):
    # the float32 whose IEEE bits are int32 i
    return types.float32(types.int32), lambda ctx, builder, sig, args: builder.bitcast(
        args[0], ir.FloatType())


EXP_HI, EXP_LO = np.float32(88.72283935546875), np.float32(-87.33654022216797)  # ln of the
# largest float32 and of the smallest normal one
LOG2E = np.float32(1.4426950408889634)
LN2_HI, LN2_LO = np.float32(0.693359375), np.float32(-2.12194440e-4)  # ln 2 in two parts,
# so r = x - n ln2 stays exact
ROUND = np.float32(12582912.0)    # 1.5 * 2^23: adding it rounds to an integer, kept in the
# low bits of the sum's mantissa
EXP_P = tuple(np.float32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                      4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))
INF = np.float32(np.inf)


@kernel
def _exp(x):
    # e^x for float32 x (inf and NaN as math.exp); see above
    xc = EXP_HI if x > EXP_HI else (EXP_LO if x < EXP_LO else x)
    nr = xc * LOG2E + ROUND
    n = nr - ROUND                                  # round(x / ln2)
    r = xc - n * LN2_HI - n * LN2_LO
    p0, p1, p2, p3, p4, p5 = EXP_P
    y = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
    y = y * r * r + r + ONE                         # e^r
    k = _bits(nr) - _bits(ROUND)                    # n as an int32, in [-126, 128]
    h = k >> 1                                      # 2^n = 2^h 2^(n-h): both halves normal
    y = y * _from_bits((h + 127) << 23) * _from_bits((k - h + 127) << 23)
    if x > EXP_HI:
        y = INF
    if x < EXP_LO:
        y = ZERO
    return y


TANH_P = tuple(np.float32(c) for c in (-5.70498872745e-3, 2.06390887954e-2, -5.37397155531e-2,
                                       1.33314422036e-1, -3.33332819422e-1))
TANH_SMALL = np.float32(0.625)


@kernel
def _tanh(x):
    # tanh x for float32 x, as Cephes' tanhf, for the same reason as _exp (math.tanh is a libm
    # call): 1 - 2 / (1 + e^(2x)), whose subtraction cancels near 0, where an odd polynomial
    # takes over. Both are computed and one chosen, which keeps the loop vectorisable.
    z = x * x
    p0, p1, p2, p3, p4 = TANH_P
    small = ((((p0 * z + p1) * z + p2) * z + p3) * z + p4) * z * x + x
    big = ONE - TWO / (ONE + _exp(TWO * x))                    # +-1 exactly at +-inf
    return small if abs(x) <= TANH_SMALL else big


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


@kernel
def embedding_forward(out, inp, wte, scale=ONE):
    # out: (B,T,C) = wte[inp] * scale, inp: (B,T) int, wte: (Vp,C); scale: float32 (Gemma's
    # sqrt(C), already rounded to the compute dtype by the caller)
    B, T, C = out.shape
    s = np.float32(scale)
    for b in range(B):
        for t in range(T):
            tok = inp[b, t]
            for c in range(C):
                out[b, t, c] = wte[tok, c] * s


@kernel
def embedding_backward(dwte, dout, inp, scale=ONE):
    # dwte: (Vp,C) += scale * dout: (B,T,C) scattered by inp: (B,T) int
    B, T, C = dout.shape
    s = np.float32(scale)
    for b in range(B):                          # in order: repeated ids accumulate
        for t in range(T):
            tok = inp[b, t]
            for c in range(C):
                dwte[tok, c] += s * dout[b, t, c]


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


# ----------------------------------------------------------------------------- rmsnorm

def _row_spans(*arrays):
    """(...,C) arrays of one shape as N*H rows of C for the row kernels: N, H, and for each
    array its memory from the first element to the last as a contiguous 1-D array, with the
    strides (in elements) of its N and H axes. The heads of q or k inside the packed qkv,
    (B,T,H,hd), are views whose rows are contiguous but spaced apart; passed as they are,
    Numba compiles them for any strides and does not vectorise the loops over a row."""
    shape = arrays[0].shape
    H, C = (shape[-2] if len(shape) > 2 else 1), shape[-1]
    N = arrays[0].size // max(H * C, 1)
    spans = []
    for a in arrays:
        if a.flags.c_contiguous:               # the common case, without as_strided's cost
            spans.append((a.reshape(-1), (H * C, C)))
            continue
        v = a.reshape(N, H, C)                 # merges the leading axes of a view, if it can
        s0, s1, s2 = (st // a.itemsize for st in v.strides)
        if not np.may_share_memory(v, a) or s2 != 1 or min(s0, s1) < 0:
            raise ValueError("row ops take (...,C) arrays with contiguous rows whose leading "
                             "axes merge without a copy")
        size = (N - 1) * s0 + (H - 1) * s1 + C if a.size else 0
        spans.append((np.lib.stride_tricks.as_strided(v, (size,), (a.itemsize,)), (s0, s1)))
    return N, H, spans


@kernel
def _rmsnorm_row(out, x, weight, eps, offset):
    # out: (C,) = x: (C,) * rstd * (offset + weight: (C,)); returns rstd = 1/sqrt(mean(x^2) + eps)
    C = x.shape[0]
    ss = 0.0
    for c in range(C):
        ss += x[c] * x[c]
    r = np.float32(1.0 / math.sqrt(ss / C + eps))
    for c in range(C):
        out[c] = x[c] * r * (offset + weight[c])
    return r


@kernel
def _rmsnorm_forward(out, os, rstd, inp, xs, N, H, weight, eps, offset):
    # rows of C = weight's length: out, inp: spans (see _row_spans) with strides os, xs;
    # rstd: (N*H,), weight: (C,)
    C = weight.shape[0]
    for n in range(N):
        for h in range(H):
            yo, xo = n * os[0] + h * os[1], n * xs[0] + h * xs[1]
            rstd[n * H + h] = _rmsnorm_row(out[yo:yo + C], inp[xo:xo + C], weight, eps, offset)


def rmsnorm_forward(out, rstd, inp, weight, eps, offset=0.0):
    # out: (...,C), rstd: (...), inp: (...,C), weight: (C,). offset=1.0 is Gemma's x*(1+w).
    # out may be inp (each value is read before it is written).
    N, H, ((y, ys), (x, xs)) = _row_spans(out, inp)
    _rmsnorm_forward(y, ys, rstd.reshape(-1), x, xs, N, H, weight, eps, np.float32(offset))


@kernel
def _residual_rmsnorm_forward(residual, out, rstd, inp1, inp2, weight, eps, offset):
    # residual, out, inp1, inp2: (N,C), rstd: (N,), weight: (C,)
    N, C = inp1.shape
    for i in range(N):
        for c in range(C):
            residual[i, c] = inp1[i, c] + inp2[i, c]
        rstd[i] = _rmsnorm_row(out[i], residual[i], weight, eps, offset)


def residual_rmsnorm_forward(residual, out, rstd, inp1, inp2, weight, eps, offset=0.0):
    # residual: (B,T,C) = inp1 + inp2; out: (B,T,C), rstd: (B,T) its rmsnorm with weight: (C,).
    # One pass over the rows: each is normalised while still in cache.
    C = inp1.shape[-1]
    _residual_rmsnorm_forward(residual.reshape(-1, C), out.reshape(-1, C), rstd.reshape(-1),
                              inp1.reshape(-1, C), inp2.reshape(-1, C), weight, eps,
                              np.float32(offset))


@kernel
def _rmsnorm_backward(dinp, dxs, dweight, dout, dys, inp, xs, weight, rstd, N, H, offset):
    # rows of C: dinp, dout, inp: spans with strides dxs, dys, xs (see _row_spans); dweight,
    # weight: (C,), rstd: (N*H,). With norm = x * rstd:
    # dx = rstd * (dnorm - norm * mean(dnorm * norm)), dnorm = dout * (offset + w).
    C = weight.shape[0]
    dw = np.zeros(C)                            # (C,) float64 sums over the rows
    for n in range(N):
        for h in range(H):
            xo, yo, do = n * xs[0] + h * xs[1], n * dys[0] + h * dys[1], n * dxs[0] + h * dxs[1]
            x, dy, dx, r = inp[xo:xo + C], dout[yo:yo + C], dinp[do:do + C], rstd[n * H + h]
            dd = 0.0
            for c in range(C):
                dd += dy[c] * (offset + weight[c]) * (x[c] * r)
            m = np.float32(dd / C)
            for c in range(C):
                norm = x[c] * r
                dw[c] += dy[c] * norm
                dx[c] += (dy[c] * (offset + weight[c]) - norm * m) * r
    dweight += dw


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, offset=0.0):
    # dinp: (...,C), dweight: (C,), dout: (...,C), inp: (...,C), weight: (C,), rstd: (...)
    N, H, ((dx, dxs), (dy, dys), (x, xs)) = _row_spans(dinp, dout, inp)
    _rmsnorm_backward(dx, dxs, dweight, dy, dys, x, xs, weight, rstd.reshape(-1), N, H,
                      np.float32(offset))


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

# Grouped-query attention: inp packs each position as [q heads | k heads | v heads], NH query
# heads and NKV kv heads of hd channels; query head h reads kv head h // (NH // NKV), in place,
# never copied out per query head. GPT-2 is NKV == NH with the default scale, no softcap and no
# window. A window > 0 lets position t see t2 with t - window < t2 <= t: the loops start at the
# window's first position, so the work outside it is never done, only its att entries zeroed.

def _attention_args(att, out, inp, scale, softcap):
    # the float32 constants the kernels take; hd from out: (B,T,NH*hd), att: (B,NH,T,T)
    NH = att.shape[1]
    hd = out.shape[-1] // NH
    NKV = (inp.shape[-1] // hd - NH) // 2
    if NKV < 1 or NH % NKV or inp.shape[-1] != (NH + 2 * NKV) * hd:
        raise ValueError(f"attention: inp's last axis {inp.shape[-1]} is not (NH + 2*NKV)*hd "
                         f"with NH={NH}, hd={hd}")
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    return np.float32(scale), np.float32(softcap)


@inlined
def _dots(out, q, x, o, lo, hi):
    # out[t2] = q . x[t2, o:o+hd] for t2 in [lo, hi); q: (hd,), x: (T,D) one sequence's rows.
    # Four rows of x per pass over q: a head's dot product is too short for one alone to
    # outweigh its loop and its final sum across the vector lanes.
    hd = q.shape[0]
    t2 = lo
    while t2 + 4 <= hi:
        x0, x1 = x[t2, o:o + hd], x[t2 + 1, o:o + hd]
        x2, x3 = x[t2 + 2, o:o + hd], x[t2 + 3, o:o + hd]
        s0 = s1 = s2 = s3 = ZERO
        for j in range(hd):
            s0 += q[j] * x0[j]
            s1 += q[j] * x1[j]
            s2 += q[j] * x2[j]
            s3 += q[j] * x3[j]
        out[t2], out[t2 + 1], out[t2 + 2], out[t2 + 3] = s0, s1, s2, s3
        t2 += 4
    for t2 in range(t2, hi):
        x0 = x[t2, o:o + hd]
        s0 = ZERO
        for j in range(hd):
            s0 += q[j] * x0[j]
        out[t2] = s0


@inlined
def _axpys(y, w, c, x, o, lo, hi):
    # y += c * sum over t2 in [lo, hi) of w[t2] * x[t2, o:o+hd]; y: (hd,), w: (T,), x: (T,D).
    # Four rows of x per pass over y, which is then loaded and stored once for four rows.
    hd = y.shape[0]
    t2 = lo
    while t2 + 4 <= hi:
        x0, x1 = x[t2, o:o + hd], x[t2 + 1, o:o + hd]
        x2, x3 = x[t2 + 2, o:o + hd], x[t2 + 3, o:o + hd]
        w0, w1, w2, w3 = c * w[t2], c * w[t2 + 1], c * w[t2 + 2], c * w[t2 + 3]
        for j in range(hd):
            y[j] += w0 * x0[j] + w1 * x1[j] + w2 * x2[j] + w3 * x3[j]
        t2 += 4
    for t2 in range(t2, hi):
        x0 = x[t2, o:o + hd]
        w0 = c * w[t2]
        for j in range(hd):
            y[j] += w0 * x0[j]


@threaded
def _attention_forward(out, preatt, att, inp, scale, softcap, window):
    # out: (B,T,NH*hd), preatt: (B,NH,T,T), att: (B,NH,T,T), inp: (B,T,(NH+2*NKV)*hd).
    # preatt holds the scores softmax reads (scaled, softcapped, -inf where masked).
    B, NH, T, _ = att.shape
    hd = out.shape[2] // NH
    NKV = (inp.shape[2] // hd - NH) // 2
    G = NH // NKV                              # query heads per kv head
    for i in prange(B * NH * T):               # one query row each; rows of all lengths mix
        b, h, t = i // (NH * T), (i // T) % NH, i % T
        qo, ko, vo = h * hd, (NH + h // G) * hd, (NH + NKV + h // G) * hd
        lo = max(0, t - window + 1) if window > 0 else 0
        x = inp[b]                             # (T,D): this sequence's q, k, v
        pre, a, y = preatt[b, h, t], att[b, h, t], out[b, t, qo:qo + hd]
        _dots(pre, x[t, qo:qo + hd], x, ko, lo, t + 1)
        mx = NEG_INF
        for t2 in range(lo, t + 1):
            s = pre[t2] * scale
            if softcap > ZERO:                 # Gemma 2: softcap * tanh(s / softcap)
                s = softcap * _tanh(s / softcap)
            pre[t2] = s
            mx = max(mx, s)
        total = ZERO
        for t2 in range(lo, t + 1):
            a[t2] = _exp(pre[t2] - mx)
            total += a[t2]
        for t2 in range(lo, t + 1):
            a[t2] /= total
        for t2 in range(lo):                   # outside the window: no weight
            pre[t2] = NEG_INF
            a[t2] = ZERO
        for t2 in range(t + 1, T):             # causal mask: the future gets no weight
            pre[t2] = NEG_INF
            a[t2] = ZERO
        y[:] = ZERO
        _axpys(y, a, ONE, x, vo, lo, t + 1)


def attention_forward(out, preatt, att, inp, scale=None, softcap=0.0, window=0):
    # out: (B,T,NH*hd), preatt: (B,NH,T,T), att: (B,NH,T,T), inp: (B,T,(NH+2*NKV)*hd) holding
    # q, k, v; scale None: 1/sqrt(hd); softcap > 0: scores capped by softcap * tanh(s/softcap)
    scale, softcap = _attention_args(att, out, inp, scale, softcap)
    _attention_forward(out, preatt, att, inp, scale, softcap, window)


@threaded
def _attention_backward_queries(dinp, dpreatt, datt, dout, inp, att, scale, softcap, window):
    # per query row: datt = dy @ v^T, dpreatt = the scores' gradient through the softmax (and
    # the softcap: dpreatt is the gradient of q.k * scale), dq += dpreatt @ k * scale.
    # datt and dpreatt are written (they are scratch); only the entries in the window.
    B, NH, T, _ = att.shape
    hd = dout.shape[2] // NH
    NKV = (inp.shape[2] // hd - NH) // 2
    G = NH // NKV
    for i in prange(B * NH * T):
        b, h, t = i // (NH * T), (i // T) % NH, i % T
        qo, ko, vo = h * hd, (NH + h // G) * hd, (NH + NKV + h // G) * hd
        lo = max(0, t - window + 1) if window > 0 else 0
        x = inp[b]
        a, da, dp = att[b, h, t], datt[b, h, t], dpreatt[b, h, t]
        _dots(da, dout[b, t, qo:qo + hd], x, vo, lo, t + 1)         # y = att @ v
        if softcap > ZERO:                     # the capped scores, recomputed into dp
            _dots(dp, x[t, qo:qo + hd], x, ko, lo, t + 1)
        s = ZERO                               # softmax: dpre = att * (datt - sum(datt * att))
        for t2 in range(lo, t + 1):
            s += da[t2] * a[t2]
        for t2 in range(lo, t + 1):
            g = a[t2] * (da[t2] - s)
            if softcap > ZERO:                 # d(c tanh(x/c))/dx = 1 - tanh^2
                th = _tanh(dp[t2] * scale / softcap)
                g *= ONE - th * th
            dp[t2] = g
        _axpys(dinp[b, t, qo:qo + hd], dp, scale, x, ko, lo, t + 1)   # scores = q @ k^T * scale


@threaded
def _attention_backward_keys(dinp, dpreatt, dout, inp, att, scale, window):
    # per key row t2 of each kv head: dk += sum over the group's query heads and the rows t
    # that see t2 of dpreatt * q * scale, dv += att * dy. Each kv head's gradient is summed
    # here, in one place, so the threads never write the same row.
    B, NH, T, _ = att.shape
    hd = dout.shape[2] // NH
    NKV = (inp.shape[2] // hd - NH) // 2
    G = NH // NKV
    for i in prange(B * NKV * T):
        b, kh, t2 = i // (NKV * T), (i // T) % NKV, i % T
        ko, vo = (NH + kh) * hd, (NH + NKV + kh) * hd
        hi = min(T, t2 + window) if window > 0 else T
        dk, dv = dinp[b, t2, ko:ko + hd], dinp[b, t2, vo:vo + hd]
        for h in range(kh * G, (kh + 1) * G):
            _axpys(dk, dpreatt[b, h, :, t2], scale, inp[b], h * hd, t2, hi)
            _axpys(dv, att[b, h, :, t2], ONE, dout[b], h * hd, t2, hi)


def attention_backward(dinp, dpreatt, datt, dout, inp, att, scale=None, softcap=0.0, window=0):
    # dinp: (B,T,(NH+2*NKV)*hd), dpreatt: (B,NH,T,T), datt: (B,NH,T,T), dout: (B,T,NH*hd),
    # inp: (B,T,(NH+2*NKV)*hd), att: (B,NH,T,T). Two passes, each parallel over rows: queries
    # (dq, and dpreatt for the second), then keys (dk, dv).
    scale, softcap = _attention_args(att, dout, inp, scale, softcap)
    _attention_backward_queries(dinp, dpreatt, datt, dout, inp, att, scale, softcap, window)
    _attention_backward_keys(dinp, dpreatt, dout, inp, att, scale, window)


# ----------------------------------------------------------------------------- rope
# HF's rotate-half pairing: channel j < hd/2 turns with channel j + hd/2 by the angle whose
# cos, sin are cos[t, j], sin[t, j]. The backward turns the gradient back by the same angle.

@kernel
def _rope_forward(out, os, inp, xs, N, H, cos, sin):
    # out, inp: spans of N*H rows of hd (see _row_spans) with strides os, xs; cos, sin: (T,hd/2),
    # row n at position n % T
    T, half = cos.shape
    for n in range(N):
        c, s = cos[n % T], sin[n % T]
        for h in range(H):
            xo, yo = n * xs[0] + h * xs[1], n * os[0] + h * os[1]
            x1, x2 = inp[xo:xo + half], inp[xo + half:xo + 2 * half]
            y1, y2 = out[yo:yo + half], out[yo + half:yo + 2 * half]
            for j in range(half):
                y1[j] = x1[j] * c[j] - x2[j] * s[j]
                y2[j] = x2[j] * c[j] + x1[j] * s[j]


def rope_forward(out, inp, cos, sin):
    # out, inp: (B,T,H,hd) (views allowed; out may not alias inp), cos, sin: (T,hd/2)
    # out1 = x1*cos - x2*sin ; out2 = x2*cos + x1*sin
    N, H, ((y, ys), (x, xs)) = _row_spans(out, inp)
    _rope_forward(y, ys, x, xs, N, H, cos, sin)


@kernel
def _rope_backward(dinp, dxs, dout, dys, N, H, cos, sin):
    # dinp += the inverse rotation of dout; spans and strides as _rope_forward
    T, half = cos.shape
    for n in range(N):
        c, s = cos[n % T], sin[n % T]
        for h in range(H):
            yo, xo = n * dys[0] + h * dys[1], n * dxs[0] + h * dxs[1]
            dy1, dy2 = dout[yo:yo + half], dout[yo + half:yo + 2 * half]
            dx1, dx2 = dinp[xo:xo + half], dinp[xo + half:xo + 2 * half]
            for j in range(half):
                dx1[j] += dy1[j] * c[j] + dy2[j] * s[j]
                dx2[j] += dy2[j] * c[j] - dy1[j] * s[j]


def rope_backward(dinp, dout, cos, sin):
    # dinp, dout: (B,T,H,hd), cos, sin: (T,hd/2); dinp += the inverse rotation of dout
    N, H, ((dx, dxs), (dy, dys)) = _row_spans(dinp, dout)
    _rope_backward(dx, dxs, dy, dys, N, H, cos, sin)


# ----------------------------------------------------------------------------- gelu
# GPT-2's tanh GELU, 0.5 x (1 + tanh(u)), written with 0.5 (1 + tanh(u)) = sigmoid(2u):
# one exp instead of a tanh, which compiled code evaluates several times slower.

@kernel
def _gelu(x):
    u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
    return x / (ONE + _exp(-TWO * u))


@kernel
def _gelu_grad(x):
    # d gelu(x) / dx
    u = GELU_SCALE * (x + GELU_CUBE * x * x * x)
    s = ONE / (ONE + _exp(-TWO * u))                            # 0.5 (1 + tanh u)
    du = GELU_SCALE * (ONE + np.float32(3.0) * GELU_CUBE * x * x)
    # 0.5 x (1 - tanh^2 u) du = 2 x s (1 - s) du
    return s + TWO * x * s * (ONE - s) * du


@threaded
def _gelu_forward(out, inp):
    for i in prange(inp.size):
        out[i] = _gelu(inp[i])


def gelu_forward(out, inp):
    # out: (N,), inp: (N,), any matching shapes
    _gelu_forward(out.reshape(-1), inp.reshape(-1))


@threaded
def _gelu_backward(dinp, inp, dout):
    for i in prange(inp.size):
        dinp[i] += dout[i] * _gelu_grad(inp[i])


def gelu_backward(dinp, inp, dout):
    # dinp, inp, dout: matching shapes
    _gelu_backward(dinp.reshape(-1), inp.reshape(-1), dout.reshape(-1))


# ----------------------------------------------------------------------------- gated MLP
# inp: (N,2F) = [up | gate] (fcw's rows are [up; gate]), out: (N,F) = up * act(gate).
# silu(g) = g * sigmoid(g); GeGLU's act is the GELU above (Gemma's gelu_pytorch_tanh).

@threaded
def _swiglu_forward(out, inp):
    N, F = out.shape
    for i in prange(N):
        for c in range(F):
            g = inp[i, F + c]
            out[i, c] = inp[i, c] * (g / (ONE + _exp(-g)))


def swiglu_forward(out, inp):
    # out: (B,T,F), inp: (B,T,2F)
    F = out.shape[-1]
    _swiglu_forward(out.reshape(-1, F), inp.reshape(-1, 2 * F))


@threaded
def _swiglu_backward(dinp, dout, inp):
    N, F = dout.shape
    for i in prange(N):
        for c in range(F):
            up, g, dy = inp[i, c], inp[i, F + c], dout[i, c]
            sig = ONE / (ONE + _exp(-g))
            dinp[i, c] += dy * (g * sig)
            dinp[i, F + c] += dy * up * (sig * (ONE + g * (ONE - sig)))   # silu'(g)


def swiglu_backward(dinp, dout, inp):
    # dinp: (B,T,2F), dout: (B,T,F), inp: (B,T,2F)
    F = dout.shape[-1]
    _swiglu_backward(dinp.reshape(-1, 2 * F), dout.reshape(-1, F), inp.reshape(-1, 2 * F))


@threaded
def _geglu_forward(out, inp):
    N, F = out.shape
    for i in prange(N):
        for c in range(F):
            out[i, c] = inp[i, c] * _gelu(inp[i, F + c])


def geglu_forward(out, inp):
    # out: (B,T,F), inp: (B,T,2F)
    F = out.shape[-1]
    _geglu_forward(out.reshape(-1, F), inp.reshape(-1, 2 * F))


@threaded
def _geglu_backward(dinp, dout, inp):
    N, F = dout.shape
    for i in prange(N):
        for c in range(F):
            up, g, dy = inp[i, c], inp[i, F + c], dout[i, c]
            dinp[i, c] += dy * _gelu(g)
            dinp[i, F + c] += dy * up * _gelu_grad(g)


def geglu_backward(dinp, dout, inp):
    # dinp: (B,T,2F), dout: (B,T,F), inp: (B,T,2F)
    F = dout.shape[-1]
    _geglu_backward(dinp.reshape(-1, 2 * F), dout.reshape(-1, F), inp.reshape(-1, 2 * F))


# ----------------------------------------------------------------------------- softcap

@threaded
def _softcap_forward(out, inp, cap):
    for i in prange(inp.size):
        out[i] = cap * _tanh(inp[i] / cap)


def softcap_forward(out, inp, cap):
    # out = cap * tanh(inp / cap), any matching shapes; out may be inp (Gemma 2's logits)
    _softcap_forward(out.reshape(-1), inp.reshape(-1), np.float32(cap))


@threaded
def _softcap_backward(dinp, dout, out, cap):
    for i in prange(out.size):
        y = out[i] / cap
        dinp[i] += dout[i] * (ONE - y * y)


def softcap_backward(dinp, dout, out, cap):
    # dinp += dout * (1 - (out/cap)^2): tanh's derivative from the forward's OUTPUT
    _softcap_backward(dinp.reshape(-1), dout.reshape(-1), out.reshape(-1), np.float32(cap))


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
            p[j] = _exp(x[j] - mx)
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


# ----------------------------------------------------------------------------- flat buffers
# Both run over all cores: one thread does not reach the memory bandwidth on its own.

@threaded
def _sum_squares(x):
    total = 0.0                                  # float64, as the reference's BLAS dot is not
    for i in prange(x.size):
        xi = np.float64(x[i])
        total += xi * xi
    return total


def sum_squares(x):
    # x: (N,) -> the sum of its squares as a Python float (the global gradient norm, squared)
    return float(_sum_squares(x))


@threaded
def zero_fill(x):
    # x: (N,) = 0, in place
    for i in prange(x.size):
        x[i] = ZERO
