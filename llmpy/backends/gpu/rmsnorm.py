"""RMSNorm forward (alone, or fused with the residual add before it) and backward, the Llama
family's norm: layernorm.py's kernels without the mean and the bias, with its configs (timed
on a GPU on first use per (rows, C)). Each program normalises blocks of ROWS rows of C with the
statistics in float32; rstd is kept in float32 for the backward. `offset` is added to the
weight as it is loaded: Gemma's x * (1 + w), whose checkpoints store w around 0.

The weight gradient is a sum over all B*T rows: each program of the backward sums its SPAN rows
into its own float32 partial, added up afterwards in a fixed order (deterministic, no atomics).
dinp is added into: it is the residual stream's gradient, which every layer adds to.
"""
import torch
import triton
import triton.language as tl

from .interpreter import SPAN, tuning
from .layernorm import BACKWARD_CONFIGS, FORWARD_CONFIGS, load_rows
from .matmul import add_partial_sums


@triton.autotune(configs=FORWARD_CONFIGS, **tuning("C", "RESIDUAL"))
@triton.jit
def _rmsnorm_forward_kernel(out, rstd, inp, weight, residual, inp2, N, C, eps, offset,
                            RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # RESIDUAL: normalise inp + inp2, stored in residual
    rows, cols, mask, o, x = load_rows(inp, residual, inp2, N, C, RESIDUAL, ROWS, BLOCK_C)
    rs = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)        # (ROWS,)
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32) + offset
    tl.store(out + o, (x * rs[:, None] * w[None, :]).to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, rs, mask=rows < N)


# dinp is added into, so the timing runs restore it
@triton.autotune(configs=BACKWARD_CONFIGS, restore_value=["dinp"], **tuning("C"))
@triton.jit
def _rmsnorm_backward_kernel(dinp, dw_part, dout, inp, weight, rstd, N, C, offset,
                             SPAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # dw_part: (programs, C) float32, this program's sum over its SPAN rows of dweight's terms
    tl.static_assert(SPAN % ROWS == 0)         # else the last step reads the next span's rows
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid * SPAN, pid * SPAN + SPAN, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        o = rows[:, None] * C + cols[None, :]                   # (ROWS,BLOCK_C); B*T*C < 2**31
        x = tl.load(inp + o, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dout + o, mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(rstd + rows, mask=rows < N, other=0.0)[:, None]
        norm = x * rs
        dw += tl.sum(dy * norm, axis=0)
        # d/dx of x * rstd: layernorm's without the mean term (doc/layernorm.md)
        dnorm = dy * w[None, :]
        dx = (dnorm - norm * (tl.sum(dnorm * norm, axis=1)[:, None] / C)) * rs
        dx += tl.load(dinp + o, mask=mask, other=0.0).to(tl.float32)
        tl.store(dinp + o, dx.to(dinp.dtype.element_ty), mask=mask)
    tl.store(dw_part + pid * C + cols, dw, mask=cols < C)


def rmsnorm_forward(out, rstd, inp, weight, eps, offset=0.0):
    # out: (...,C), rstd: (...) float32, inp: (...,C), weight: (C,)
    _forward(out, rstd, inp, weight, eps, offset)


def residual_rmsnorm_forward(residual, out, rstd, inp1, inp2, weight, eps, offset=0.0):
    # residual: (...,C) = inp1 + inp2; out: (...,C), rstd: (...) float32 its RMSNorm with
    # weight: (C,). One kernel: the sum is normalised without a trip through memory.
    _forward(out, rstd, inp1, weight, eps, offset, residual, inp2)


def _forward(out, rstd, inp, weight, eps, offset, residual=None, inp2=None):
    """The forward kernel's launch; given residual, it normalises inp + inp2, stored there.
    (Without, the kernel never touches its residual and inp2 pointers: inp stands in.)"""
    C = inp.shape[-1]
    N = inp.numel() // C
    _rmsnorm_forward_kernel[lambda m: (triton.cdiv(N, m["ROWS"]),)](
        out, rstd, inp, weight, inp if residual is None else residual,
        inp if inp2 is None else inp2, N, C, eps, offset, RESIDUAL=residual is not None,
        BLOCK_C=triton.next_power_of_2(C))


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, offset=0.0):
    # dinp: (...,C) and dweight: (C,) added into, dout: (...,C), inp: (...,C), weight: (C,),
    # rstd: (...) float32
    C = inp.shape[-1]
    N = inp.numel() // C
    G = triton.cdiv(N, SPAN)
    parts = torch.empty((1, G, C), dtype=torch.float32, device=inp.device)
    _rmsnorm_backward_kernel[(G,)](dinp, parts[0], dout, inp, weight, rstd, N, C, offset,
                                   SPAN=SPAN, BLOCK_C=triton.next_power_of_2(C))
    add_partial_sums([dweight], parts)
