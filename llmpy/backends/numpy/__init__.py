"""The NumPy reference backend: one <op>_forward / <op>_backward pair per layer, as in llm.c.

Conventions (every backend follows them):
- outputs are preallocated arrays passed in; forward ops overwrite them;
- backward ops ADD into the gradients of inputs and parameters (zeroing is the caller's job);
- B = batch, T = time, C = channels, OC = output channels, NH = heads, hs = C // NH,
  V = vocab size, Vp = padded vocab size.
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

def _split_heads(qkv, NH):
    # qkv: (B,T,3C) -> q, k, v views, each (B,NH,T,hs)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // NH
    x = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    return x[0], x[1], x[2]


def attention_forward(out, preatt, att, inp):
    # out: (B,T,C), preatt: (B,NH,T,T), att: (B,NH,T,T), inp: (B,T,3C) holding q,k,v
    B, NH, T, _ = att.shape
    q, k, v = _split_heads(inp, NH)                             # each (B,NH,T,hs)
    scale = 1.0 / math.sqrt(q.shape[-1])
    np.matmul(q, k.swapaxes(-1, -2), out=preatt)
    preatt *= scale
    future = np.triu(np.ones((T, T), dtype=bool), k=1)          # (T,T), True above diagonal
    preatt[..., future] = -np.inf                               # causal mask
    np.subtract(preatt, preatt.max(axis=-1, keepdims=True), out=att)
    np.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v                                                 # (B,NH,T,hs)
    out[...] = y.transpose(0, 2, 1, 3).reshape(B, T, -1)


def attention_backward(dinp, dpreatt, datt, dout, inp, att):
    # dinp: (B,T,3C), dpreatt: (B,NH,T,T), datt: (B,NH,T,T), dout: (B,T,C), inp: (B,T,3C),
    # att: (B,NH,T,T)
    B, NH, T, _ = att.shape
    q, k, v = _split_heads(inp, NH)                             # each (B,NH,T,hs)
    dq, dk, dv = _split_heads(dinp, NH)                         # views into dinp
    hs = q.shape[-1]
    scale = 1.0 / math.sqrt(hs)
    dy = dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)       # (B,NH,T,hs)
    datt += dy @ v.swapaxes(-1, -2)                             # y = att @ v
    dv += att.swapaxes(-1, -2) @ dy
    # softmax backward: dpre = att * (datt - sum_j datt_j att_j); masked entries have att == 0
    dpreatt += att * (datt - (datt * att).sum(axis=-1, keepdims=True))
    dq += (dpreatt @ k) * scale                                 # preatt = q @ k^T * scale
    dk += (dpreatt.swapaxes(-1, -2) @ q) * scale


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


# AdamW walks the flat buffers this many elements at a time, so that each chunk's temporaries
# (64 KB) come from memory malloc reuses, under its mmap threshold, and stay in cache. At 124M
# parameters one pass with (N,) temporaries took 1.5x as long; chunks of 256 KB, over the
# threshold, took 3x.
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
