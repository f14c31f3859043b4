"""The NumPy reference backend: one <op>_forward / <op>_backward pair per layer, as in llm.c.

Conventions (every backend follows them):
- outputs are preallocated arrays passed in; forward ops overwrite them;
- backward ops ADD into the gradients of inputs and parameters (zeroing is the caller's job);
- B = batch, T = time, C = channels, OC = output channels, NH = heads, NKV = key/value heads,
  hd = head size (GPT-2: C // NH), F = the gated MLP's width, V = vocab size,
  Vp = padded vocab size.
Matmuls go to BLAS through `@`; everything else is plain vectorised NumPy in float32.
"""
import math
import sys

import numpy as np

from ..base import Backend

# Python floats, not NumPy scalars: they take the arrays' dtype (float32 in training, float64
# in the finite-difference tests) instead of forcing one.
GELU_SCALE = math.sqrt(2.0 / math.pi)


def make():
    """This module's ops as a Backend (backends/base.py)."""
    return Backend("numpy", sys.modules[__name__], zeros=zeros, to_device=to_device,
                   to_host=to_host)


# ----------------------------------------------------------------------------- memory

def zeros(n, dtype=np.float32):
    return np.zeros(n, dtype=dtype)


def to_device(x):
    """Host arrays (token ids) are already where this backend computes."""
    return x


def to_host(x):
    return x


# ----------------------------------------------------------------------------- encoder

def encoder_forward(out, inp, wte, wpe):
    # out: (B,T,C), inp: (B,T) int, wte: (Vp,C), wpe: (maxT,C)
    T = inp.shape[1]
    np.add(wte[inp], wpe[:T], out=out)


def encoder_backward(dwte, dwpe, dout, inp):
    # dwte: (Vp,C), dwpe: (maxT,C), dout: (B,T,C), inp: (B,T) int
    T = inp.shape[1]
    np.add.at(dwte, inp.ravel(), dout.reshape(-1, dout.shape[-1]))  # repeated ids accumulate
    dwpe[:T] += dout.sum(axis=0)


# ----------------------------------------------------------------------------- layernorm

def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=1e-5):
    # out: (B,T,C), mean: (B,T), rstd: (B,T), inp: (B,T,C), weight: (C,), bias: (C,)
    mean[...] = inp.mean(axis=-1)
    xc = inp - mean[..., None]                                  # (B,T,C)
    rstd[...] = 1.0 / np.sqrt((xc * xc).mean(axis=-1) + eps)    # biased variance, as torch
    np.multiply(xc, rstd[..., None], out=out)                   # normalized
    out *= weight
    out += bias


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    # dinp: (B,T,C), dweight: (C,), dbias: (C,), dout: (B,T,C), inp: (B,T,C), weight: (C,),
    # mean: (B,T), rstd: (B,T)
    norm = (inp - mean[..., None]) * rstd[..., None]            # (B,T,C)
    dnorm = dout * weight                                       # (B,T,C)
    dbias += dout.sum(axis=(0, 1))
    dweight += (dout * norm).sum(axis=(0, 1))
    # d/dx of (x - mean) * rstd: the mean term and the variance term, see doc/layernorm.md
    dnorm_mean = dnorm.mean(axis=-1, keepdims=True)             # (B,T,1)
    dnorm_norm_mean = (dnorm * norm).mean(axis=-1, keepdims=True)
    dinp += (dnorm - dnorm_mean - norm * dnorm_norm_mean) * rstd[..., None]


# ----------------------------------------------------------------------------- matmul

def matmul_forward(out, inp, weight, bias):
    # out: (B,T,OC), inp: (B,T,C), weight: (OC,C), bias: (OC,) or None
    OC, C = weight.shape
    np.matmul(inp.reshape(-1, C), weight.T, out=out.reshape(-1, OC))   # 2-D: one BLAS call
    if bias is not None:
        out += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    # dinp: (B,T,C), dweight: (OC,C), dbias: (OC,) or None, dout: (B,T,OC), inp: (B,T,C),
    # weight: (OC,C)
    OC, C = weight.shape
    dout2 = dout.reshape(-1, OC)                                # (B*T,OC)
    dinp += (dout2 @ weight).reshape(dinp.shape)
    dweight += dout2.T @ inp.reshape(-1, C)
    if dbias is not None:
        dbias += dout2.sum(axis=0)


# ----------------------------------------------------------------------------- attention

def _split_heads(qkv, NH, hd):
    # qkv: (B,T,(NH+2*NKV)*hd), per position [q heads | k heads | v heads] -> views
    # q: (B,NKV,G,T,hd), k, v: (B,NKV,1,T,hd) with G = NH // NKV query heads per kv head:
    # query head h = kv*G + g reads kv head h // G (HF's repeat_kv), and the size-1 axis
    # broadcasts each K, V over its group instead of copying it G times
    B, T, D = qkv.shape
    NKV = (D // hd - NH) // 2
    x = qkv.reshape(B, T, NH + 2 * NKV, hd).transpose(0, 2, 1, 3)     # (B,heads,T,hd)
    q = x[:, :NH].reshape(B, NKV, NH // NKV, T, hd)
    return q, x[:, NH:NH + NKV, None], x[:, NH + NKV:, None]


def _masked(T, window):
    # (T,T) True where query i may not see key j: the future (j > i) and, with a window, the
    # keys at or before i - window, so that i sees i - window < j <= i, `window` keys with itself
    # (transformers' sliding_window_overlay: kv_idx > q_idx - sliding_window)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    return (j > i) | (j <= i - window) if window > 0 else j > i


def attention_forward(out, preatt, att, inp, scale=None, softcap=0.0, window=0):
    # out: (B,T,NH*hd), preatt: (B,NH,T,T), att: (B,NH,T,T),
    # inp: (B,T,(NH+2*NKV)*hd) holding q,k,v (GPT-2: NKV = NH)
    # preatt = the scores softmax reads: scale*q.k, capped (Gemma 2) then masked
    B, NH, T, _ = att.shape
    hd = out.shape[-1] // NH
    q, k, v = _split_heads(inp, NH, hd)                         # (B,NKV,G,T,hd), (B,NKV,1,T,hd)
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    pre = preatt.reshape(q.shape[:3] + (T, T))                  # (B,NKV,G,T,T) view
    np.matmul(q, k.swapaxes(-1, -2), out=pre)
    preatt *= scale
    if softcap > 0:
        softcap_forward(preatt, preatt, softcap)
    preatt[..., _masked(T, window)] = -np.inf
    np.subtract(preatt, preatt.max(axis=-1, keepdims=True), out=att)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att.reshape(pre.shape) @ v                              # (B,NKV,G,T,hd)
    out[...] = y.reshape(B, NH, T, hd).transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention_backward(dinp, dpreatt, datt, dout, inp, att, scale=None, softcap=0.0, window=0):
    # dinp: (B,T,(NH+2*NKV)*hd), dpreatt: (B,NH,T,T), datt: (B,NH,T,T), dout: (B,T,NH*hd),
    # inp: (B,T,(NH+2*NKV)*hd), att: (B,NH,T,T); dpreatt, datt are zeroed scratch.
    # window needs no work here: masked entries have att == 0, so their gradient is 0.
    B, NH, T, _ = att.shape
    hd = dout.shape[-1] // NH
    q, k, v = _split_heads(inp, NH, hd)                         # (B,NKV,G,T,hd), (B,NKV,1,T,hd)
    dq, dk, dv = _split_heads(dinp, NH, hd)                     # views into dinp
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    grouped = q.shape[:3] + (T, T)                              # (B,NKV,G,T,T)
    att, datt5, dpre = att.reshape(grouped), datt.reshape(grouped), dpreatt.reshape(grouped)
    dy = dout.reshape(B, T, NH, hd).transpose(0, 2, 1, 3).reshape(q.shape)   # (B,NKV,G,T,hd)
    datt5 += dy @ v.swapaxes(-1, -2)                            # y = att @ v
    dv += (att.swapaxes(-1, -2) @ dy).sum(axis=2, keepdims=True)   # each kv head: its group's sum
    # softmax backward: dpre = att * (datt - sum_j datt_j att_j); masked entries have att == 0
    dpre += att * (datt5 - (datt5 * att).sum(axis=-1, keepdims=True))
    ds = dpre                   # the gradient of s = scale*q.k, which the cap (if any) reads
    if softcap > 0:
        # the capped scores are recomputed: the backward is given att, whose log would lose them
        # where att underflows
        capped = (q @ k.swapaxes(-1, -2)) * scale
        softcap_forward(capped, capped, softcap)
        ds = np.zeros_like(dpre)
        softcap_backward(ds, dpre, capped, softcap)
    dq += (ds @ k) * scale                                      # preatt = q @ k^T * scale
    dk += (ds.swapaxes(-1, -2) @ q).sum(axis=2, keepdims=True) * scale


# ----------------------------------------------------------------------------- gelu

def gelu_forward(out, inp):
    # out: (N,), inp: (N,), any matching shapes; tanh approximation, as GPT-2
    np.tanh(GELU_SCALE * (inp + 0.044715 * inp * inp * inp), out=out)
    out += 1.0
    out *= inp
    out *= 0.5


def gelu_backward(dinp, inp, dout):
    # dinp, inp, dout: matching shapes
    u = GELU_SCALE * (inp + 0.044715 * inp * inp * inp)
    th = np.tanh(u)
    du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * inp * inp)
    dinp += dout * (0.5 * (1.0 + th) + 0.5 * inp * (1.0 - th * th) * du)


# ----------------------------------------------------------------------------- residual

def residual_forward(out, inp1, inp2):
    # out, inp1, inp2: (B,T,C)
    np.add(inp1, inp2, out=out)


def residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias,
                               eps=1e-5):
    # residual: (B,T,C) = inp1 + inp2, then out: (B,T,C), mean, rstd: (B,T) its layernorm with
    # weight, bias: (C,). Every layernorm after the first reads a residual add's output, so a
    # fused kernel reads the stream once instead of twice (llm.c's fused_residual_forward).
    # Its backward is layernorm_backward adding into the residual stream's gradient, which the
    # add passes through unchanged (model.py).
    residual_forward(residual, inp1, inp2)
    layernorm_forward(out, mean, rstd, residual, weight, bias, eps)


# ----------------------------------------------------------------------------- rmsnorm

def rmsnorm_forward(out, rstd, inp, weight, eps, offset=0.0):
    # out: (...,C), rstd: (...), inp: (...,C), weight: (C,)
    # offset=1.0 is Gemma's x*(1+w): HF stores w zero-initialised
    rstd[...] = 1.0 / np.sqrt((inp * inp).mean(axis=-1) + eps)  # no mean subtracted
    np.multiply(inp, rstd[..., None], out=out)                  # normalized
    out *= offset + weight


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, offset=0.0):
    # dinp: (...,C), dweight: (C,), dout: (...,C), inp: (...,C), weight: (C,), rstd: (...)
    C = inp.shape[-1]
    norm = inp * rstd[..., None]                                # (...,C)
    dnorm = dout * (offset + weight)                            # (...,C)
    dweight += (dout * norm).reshape(-1, C).sum(axis=0)
    # layernorm's backward without the mean term: d(rstd)/dx = -rstd^3 x / C
    dinp += (dnorm - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]


def residual_rmsnorm_forward(residual, out, rstd, inp1, inp2, weight, eps, offset=0.0):
    # residual: (B,T,C) = inp1 + inp2, then out: (B,T,C), rstd: (B,T) its rmsnorm, as
    # residual_layernorm_forward; the backward is rmsnorm_backward into the residual's gradient
    residual_forward(residual, inp1, inp2)
    rmsnorm_forward(out, rstd, residual, weight, eps, offset)


# ----------------------------------------------------------------------------- embedding

def embedding_forward(out, inp, wte, scale=1.0):
    # out: (B,T,C), inp: (B,T) int, wte: (Vp,C); scale: Gemma's sqrt(C), rounded by the caller
    np.multiply(wte[inp], scale, out=out)


def embedding_backward(dwte, dout, inp, scale=1.0):
    # dwte: (Vp,C), dout: (B,T,C), inp: (B,T) int
    C = dout.shape[-1]
    np.add.at(dwte, inp.ravel(), dout.reshape(-1, C) * scale)  # repeated ids accumulate


# ----------------------------------------------------------------------------- rope

def rope_forward(out, inp, cos, sin):
    # out, inp: (B,T,H,hd), views allowed, out not aliasing inp; cos, sin: (T,hd/2).
    # HF's rotate-half pairing: element i of the first half turns with element i of the second
    half = inp.shape[-1] // 2
    x1, x2 = inp[..., :half], inp[..., half:]                   # (B,T,H,hd/2)
    c, s = cos[:, None], sin[:, None]                           # (T,1,hd/2): every head's
    np.multiply(x1, c, out=out[..., :half])
    out[..., :half] -= x2 * s
    np.multiply(x2, c, out=out[..., half:])
    out[..., half:] += x1 * s


def rope_backward(dinp, dout, cos, sin):
    # dinp, dout: (B,T,H,hd), cos, sin: (T,hd/2). The rotation is orthogonal: its gradient is
    # the rotation by -angle
    half = dout.shape[-1] // 2
    d1, d2 = dout[..., :half], dout[..., half:]                 # (B,T,H,hd/2)
    c, s = cos[:, None], sin[:, None]                           # (T,1,hd/2)
    dinp[..., :half] += d1 * c + d2 * s
    dinp[..., half:] += d2 * c - d1 * s


# ----------------------------------------------------------------------------- gated MLP

def _sigmoid(x):
    # through tanh: exp(-x) overflows (with a warning) for x < -88 in float32
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def swiglu_forward(out, inp):
    # out: (B,T,F), inp: (B,T,2F) = [up | gate] (llm.c's fcw = [c_fc; c_fc2]); out = up * silu(gate)
    F = out.shape[-1]
    up, gate = inp[..., :F], inp[..., F:]                       # (B,T,F) views
    np.multiply(gate, _sigmoid(gate), out=out)
    out *= up


def swiglu_backward(dinp, dout, inp):
    # dinp: (B,T,2F), dout: (B,T,F), inp: (B,T,2F)
    F = dout.shape[-1]
    up, gate = inp[..., :F], inp[..., F:]                       # (B,T,F) views
    sig = _sigmoid(gate)
    dinp[..., :F] += dout * gate * sig
    dinp[..., F:] += dout * up * sig * (1.0 + gate * (1.0 - sig))   # d silu(g) / dg


def geglu_forward(out, inp):
    # out: (B,T,F), inp: (B,T,2F) = [up | gate]; out = up * gelu_tanh(gate) (Gemma)
    F = out.shape[-1]
    gelu_forward(out, inp[..., F:])
    out *= inp[..., :F]


def geglu_backward(dinp, dout, inp):
    # dinp: (B,T,2F), dout: (B,T,F), inp: (B,T,2F)
    F = dout.shape[-1]
    up, gate = inp[..., :F], inp[..., F:]                       # (B,T,F) views
    g = np.empty_like(dout)
    gelu_forward(g, gate)
    dinp[..., :F] += dout * g
    gelu_backward(dinp[..., F:], gate, dout * up)


# ----------------------------------------------------------------------------- softcap

def softcap_forward(out, inp, cap):
    # out, inp: matching shapes, out may be inp; out = cap * tanh(inp / cap) (Gemma 2)
    np.divide(inp, cap, out=out)
    np.tanh(out, out=out)
    out *= cap


def softcap_backward(dinp, dout, out, cap):
    # dinp, dout, out: matching shapes. Reads the forward's OUTPUT: tanh' = 1 - tanh^2, so the
    # input (which the forward may have overwritten) is not needed
    t = out / cap
    dinp += dout * (1.0 - t * t)


# ----------------------------------------------------------------------------- softmax + cross-entropy

def crossentropy_forward(losses, probs, logits, targets, V):
    # losses: (B,T), probs: (B,T,Vp), logits: (B,T,Vp), targets: (B,T) int, V: real vocab size
    # Only the first V logits are real; the padded ones get probability 0 and no gradient.
    real = logits[..., :V]                                      # (B,T,V)
    maxes = real.max(axis=-1, keepdims=True)                    # (B,T,1)
    p = probs[..., :V]
    np.subtract(real, maxes, out=p)
    np.exp(p, out=p)
    sums = p.sum(axis=-1, keepdims=True)                        # (B,T,1)
    p /= sums
    probs[..., V:] = 0.0
    # -log softmax[target] = log(sum) - (logit[target] - max): no log of a tiny probability
    target_logit = np.take_along_axis(real, targets[..., None], axis=-1)
    losses[...] = (np.log(sums) - (target_logit - maxes))[..., 0]


def crossentropy_backward(dlogits, dlosses, probs, targets, V):
    # dlogits: (B,T,Vp), dlosses: (B,T), probs: (B,T,Vp), targets: (B,T) int
    d = dlogits[..., :V]                                        # (B,T,V) view
    d += probs[..., :V] * dlosses[..., None]
    b, t = np.indices(targets.shape)
    d[b, t, targets] -= dlosses


# ----------------------------------------------------------------------------- adamw

def sum_squares(x):
    # x: (N,) -> the sum of its squares as a Python float (the global gradient norm, squared)
    return float(x @ x)


def zero_fill(x):
    # x: (N,) = 0, in place (the gradients before a step, the activation gradients before a
    # backward pass)
    x[...] = 0


# AdamW walks the flat buffers this many elements at a time, so that each chunk's temporaries
# (64 KB) come from memory malloc reuses, under its mmap threshold, and stay in cache: faster
# than one pass with (N,) temporaries, and than chunks over the threshold (bench/RESULTS.md,
# "The NumPy reference's AdamW in chunks").
ADAMW_CHUNK = 1 << 14


def adamw_update(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay,
                 grad_scale=1.0):
    # params, grads, m, v: (N,) float32; step: 1-based. Same order of operations as
    # torch.optim.AdamW (decoupled decay first), so the two agree to within an ulp or so.
    # grad_scale: the gradients are multiplied by it first (global-norm clipping, done here as
    # llm.c does, instead of in a pass of its own); grads itself is left as it is.
    bc1 = 1.0 - beta1 ** step
    bc2_sqrt = math.sqrt(1.0 - beta2 ** step)
    for i in range(0, params.size, ADAMW_CHUNK):
        s = slice(i, i + ADAMW_CHUNK)
        p, g, m_, v_ = params[s], grads[s], m[s], v[s]          # (chunk,) views
        if grad_scale != 1.0:
            g = g * grad_scale
        p *= 1.0 - lr * weight_decay
        m_ += (1.0 - beta1) * (g - m_)                          # torch's lerp_
        v_ *= beta2
        v_ += (1.0 - beta2) * g * g                             # torch's addcmul_
        p -= m_ / (np.sqrt(v_) / bc2_sqrt + eps) * (lr / bc1)
