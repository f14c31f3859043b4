"""GELU (tanh approximation, as GPT-2), forward and backward, elementwise in float32.

0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): Triton has sigmoid, and no tanh that the
interpreter also runs. Block sizes, and warps, are timed on a GPU on first use per size: wider
blocks keep more bytes in flight per thread.

The backward walks (rows, channels) tiles, SPAN rows a program, so that given dsums it also sums
the dinp it writes over the rows: the fc matmul's bias gradient (the backend's sums_bias_grads),
in float32 partials, one row per program, added up afterwards in a fixed order."""
import math

import torch
import triton
import triton.language as tl

from .launch import ELEMENTS, ROWS, SPAN, configs, tuning
from .matmul import add_partial_sums

GELU_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))
# (BLOCK, num_warps): the last is the one config that small tensors take
@triton.autotune(configs=configs([(dict(BLOCK=2048), 4, 1), (dict(BLOCK=4096), 4, 1),
                                  (dict(BLOCK=4096), 8, 1), (dict(BLOCK=8192), 8, 1),
                                  (dict(BLOCK=1024), 4, 1)], dict(BLOCK=ELEMENTS)),
                 **tuning(least=1 << 20))
@triton.jit
def _gelu_forward_kernel(out, inp, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < N
    x = tl.load(inp + o, mask=mask).to(tl.float32)
    u = GELU_SCALE * (x + 0.044715 * x * x * x)
    tl.store(out + o, (x * tl.sigmoid(2.0 * u)).to(out.dtype.element_ty), mask=mask)


# (ROWS, BLOCK_C, num_warps), ROWS x BLOCK_C a step: the last is the one that small tensors take
# (GPT-2's 4C = 3072 channels: 1024 or 512 wide wastes no lanes)
@triton.autotune(configs=configs([(dict(ROWS=2, BLOCK_C=1024), 4, 1),
                                  (dict(ROWS=4, BLOCK_C=1024), 8, 1),
                                  (dict(ROWS=4, BLOCK_C=512), 4, 1),
                                  (dict(ROWS=8, BLOCK_C=512), 8, 1),
                                  (dict(ROWS=1, BLOCK_C=1024), 4, 1)],
                                 dict(ROWS=ROWS, BLOCK_C=1024)),
                 **tuning("C", "SUMS"))
@triton.jit
def _gelu_backward_kernel(dinp, ds_part, inp, dout, N, C, SUMS: tl.constexpr,
                          SPAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # dinp, inp, dout: (N,C); ds_part (if SUMS): (programs over N, C) float32, this program's
    # sums of dinp as stored, over its SPAN rows and BLOCK_C channels
    tl.static_assert(SPAN % ROWS == 0)         # else the last step reads the next span's rows
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ds = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid * SPAN, pid * SPAN + SPAN, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        o = rows[:, None].to(tl.int64) * C + cols[None, :]     # (ROWS,BLOCK_C)
        x = tl.load(inp + o, mask=mask, other=0.0).to(tl.float32)
        u = GELU_SCALE * (x + 0.044715 * x * x * x)
        s = tl.sigmoid(2.0 * u)                                 # (1 + tanh(u)) / 2
        du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
        grad = s + 2.0 * x * s * (1.0 - s) * du                 # 1 - tanh^2 = 4 s (1 - s)
        d = (tl.load(dout + o, mask=mask, other=0.0).to(tl.float32) * grad
             ).to(dinp.dtype.element_ty)                        # written, not added
        tl.store(dinp + o, d, mask=mask)
        if SUMS:
            ds += tl.sum(d.to(tl.float32), axis=0)             # 0 where masked: dout is
    if SUMS:
        tl.store(ds_part + pid * C + cols, ds, mask=cols < C)


def gelu_forward(out, inp):
    # out, inp: matching shapes, e.g. (B,T,4C)
    N = inp.numel()
    _gelu_forward_kernel[lambda m: (triton.cdiv(N, m["BLOCK"]),)](out, inp, N)


def gelu_backward(dinp, inp, dout, dsums=None):
    # dinp, inp, dout: matching shapes (...,C); dsums: (C,) or None, += the sums of dinp over
    # all but its last dimension
    C = inp.shape[-1]
    N = inp.numel() // C                                        # rows
    G = triton.cdiv(N, SPAN)                                    # programs over the rows
    parts = torch.empty((1, G, C) if dsums is not None else (1, 1, 1), dtype=torch.float32,
                        device=inp.device)
    _gelu_backward_kernel[lambda m: (G, triton.cdiv(C, m["BLOCK_C"]))](
        dinp, parts, inp, dout, N, C, SUMS=dsums is not None, SPAN=SPAN)
    if dsums is not None:
        add_partial_sums([dsums], parts)
