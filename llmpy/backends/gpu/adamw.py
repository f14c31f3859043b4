"""AdamW over a flat slice of the parameter buffer in one launch (the optimizer passes runs of
adjacent tensors that share a weight decay: llm.c's multi-tensor update), with optional float32
master weights for bf16 params, and global-norm gradient clipping fused in: the norm comes from
sum_squares, and AdamW multiplies each gradient by the clipping scale as it loads it, so the
clipping costs no pass over the gradients of its own."""
import math

import torch
import triton
import triton.language as tl

from .launch import ELEMENTS as BLOCK


@triton.jit
def _adamw_kernel(weights, grads, m, v, master, N, lr, beta1, beta2, eps, weight_decay, bc1,
                  bc2_sqrt, grad_scale, HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < N
    g = tl.load(grads + o, mask=mask).to(tl.float32) * grad_scale
    if HAS_MASTER:
        p = tl.load(master + o, mask=mask)
    else:
        p = tl.load(weights + o, mask=mask).to(tl.float32)
    # the order of operations of torch.optim.AdamW and of the reference backend
    p *= 1.0 - lr * weight_decay
    mm = tl.load(m + o, mask=mask)
    mm += (1.0 - beta1) * (g - mm)
    vv = tl.load(v + o, mask=mask) * beta2 + (1.0 - beta2) * g * g
    p -= (lr / bc1) * (mm / (tl.sqrt(vv) / bc2_sqrt + eps))
    tl.store(m + o, mm, mask=mask)
    tl.store(v + o, vv, mask=mask)
    if HAS_MASTER:
        tl.store(master + o, p, mask=mask)
    tl.store(weights + o, p.to(weights.dtype.element_ty), mask=mask)


@triton.jit
def _sum_squares_kernel(partials, x, N, BLOCK: tl.constexpr):
    # partials: (programs,) float32, each program's sum over its BLOCK elements
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    xx = tl.load(x + o, mask=o < N, other=0.0).to(tl.float32)
    tl.store(partials + tl.program_id(0), tl.sum(xx * xx, axis=0))


def sum_squares(x):
    # x: (N,) any float dtype -> the float32 sum of its squares, as a Python float. (x @ x on
    # bf16 would round the result to bf16's three digits.)
    N = x.numel()
    partials = torch.empty(triton.cdiv(N, BLOCK), dtype=torch.float32, device=x.device)
    _sum_squares_kernel[(partials.numel(),)](partials, x, N, BLOCK=BLOCK)
    return float(partials.sum())


def zero_fill(x):
    # x: (N,) = 0, in place
    x.zero_()


def master_weights(params):
    """float32 master weights for lower-precision params (llm.c's master_weights); None when the
    params are float32 already."""
    return None if params.dtype == torch.float32 else params.float()


def adamw_update(params, grads, m, v, step, lr, beta1, beta2, eps, weight_decay,
                 grad_scale=1.0, master=None):
    # params, grads: (N,) compute dtype; m, v, master: (N,) float32; step: 1-based;
    # grad_scale: multiplies each gradient first (clipping). With master, the update is made
    # to it, then rounded into params.
    N = params.numel()
    _adamw_kernel[(triton.cdiv(N, BLOCK),)](
        params, grads, m, v, params if master is None else master, N, lr, beta1, beta2, eps,
        weight_decay, 1.0 - beta1 ** step, math.sqrt(1.0 - beta2 ** step), grad_scale,
        HAS_MASTER=master is not None, BLOCK=BLOCK)
