"""LayerNorm forward (alone, or fused with the residual add before it) and backward: each program
normalises blocks of ROWS rows of C, with the statistics in float32. How many rows a program
takes at once, and with how many warps, is timed on a GPU on first use per (rows, C).

The weight and bias gradients are sums over all B*T rows. Each program of the backward sums its
SPAN rows into its own float32 partial, and the partials are added up afterwards in a fixed
order: deterministic, and no atomics. Given dsums, the backward also sums the dinp it leaves
(the residual stream's gradient, as rounded there) into it: the bias gradient of the matmul
that reads that gradient next (the backend's sums_bias_grads).
"""
import torch
import triton
import triton.language as tl

from .launch import ROWS, SPAN, configs, tuning
from .matmul import add_partial_sums


@triton.jit
def load_rows(inp, residual, inp2, o, mask, RESIDUAL: tl.constexpr):
    """A forward program's rows of inp at offsets o, float32 (ROWS,BLOCK_C). RESIDUAL: the rows
    of inp + inp2 instead, stored in residual as rounded there (the backward reads the sum back
    from it)."""
    x = tl.load(inp + o, mask=mask, other=0.0).to(tl.float32)
    if RESIDUAL:
        x += tl.load(inp2 + o, mask=mask, other=0.0).to(tl.float32)
        x = x.to(residual.dtype.element_ty)
        tl.store(residual + o, x, mask=mask)
        x = x.to(tl.float32)
    return x


# (ROWS, num_warps), for the forward and the backward (rmsnorm.py's too): the last is one row a
# program, the one config that small problems take
FORWARD_CONFIGS = configs([(dict(ROWS=1), 8, 1), (dict(ROWS=2), 4, 1), (dict(ROWS=2), 8, 1),
                           (dict(ROWS=4), 8, 1), (dict(ROWS=1), 4, 1)], dict(ROWS=ROWS))
BACKWARD_CONFIGS = configs([(dict(ROWS=2), 4, 1), (dict(ROWS=2), 8, 1), (dict(ROWS=4), 4, 1),
                            (dict(ROWS=4), 8, 1), (dict(ROWS=8), 8, 1), (dict(ROWS=1), 8, 1),
                            (dict(ROWS=1), 4, 1)], dict(ROWS=ROWS))


@triton.autotune(configs=FORWARD_CONFIGS, **tuning("C", "RESIDUAL"))
@triton.jit
def _layernorm_forward_kernel(out, mean, rstd, inp, weight, bias, residual, inp2, N, C, eps,
                              RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    o = rows[:, None] * C + cols[None, :]                       # (ROWS,BLOCK_C); B*T*C < 2**31
    x = load_rows(inp, residual, inp2, o, mask, RESIDUAL)
    mu = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mu[:, None], 0.0)
    rs = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)      # biased variance, as torch
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32)
    b = tl.load(bias + cols, mask=cols < C).to(tl.float32)
    y = xc * rs[:, None] * w[None, :] + b[None, :]
    tl.store(out + o, y.to(out.dtype.element_ty), mask=mask)
    tl.store(mean + rows, mu.to(mean.dtype.element_ty), mask=rows < N)
    tl.store(rstd + rows, rs.to(rstd.dtype.element_ty), mask=rows < N)


# dinp is added into, so the timing runs restore it
@triton.autotune(configs=BACKWARD_CONFIGS, restore_value=["dinp"], **tuning("C", "SUMS"))
@triton.jit
def _layernorm_backward_kernel(dinp, dw_part, db_part, ds_part, dout, inp, weight, mean, rstd,
                               N, C, SUMS: tl.constexpr, SPAN: tl.constexpr, ROWS: tl.constexpr,
                               BLOCK_C: tl.constexpr):
    # dw_part, db_part, ds_part (if SUMS): (programs, C) float32, this program's sums over its
    # SPAN rows of dweight's and dbias's terms, and of dinp as stored
    tl.static_assert(SPAN % ROWS == 0)         # else the last step reads the next span's rows
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32)
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_C], dtype=tl.float32)
    ds = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid * SPAN, pid * SPAN + SPAN, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        o = rows[:, None] * C + cols[None, :]                   # (ROWS,BLOCK_C)
        x = tl.load(inp + o, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dout + o, mask=mask, other=0.0).to(tl.float32)
        rs = tl.load(rstd + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        mu = tl.load(mean + rows, mask=rows < N, other=0.0).to(tl.float32)[:, None]
        norm = tl.where(mask, (x - mu) * rs, 0.0)
        db += tl.sum(dy, axis=0)
        dw += tl.sum(dy * norm, axis=0)
        # d/dx of (x - mean) * rstd: the mean term and the variance term, see doc/layernorm.md
        dnorm = dy * w[None, :]
        dx = (dnorm - tl.sum(dnorm, axis=1)[:, None] / C
              - norm * (tl.sum(dnorm * norm, axis=1)[:, None] / C)) * rs
        dx += tl.load(dinp + o, mask=mask, other=0.0).to(tl.float32)
        dx = dx.to(dinp.dtype.element_ty)
        tl.store(dinp + o, dx, mask=mask)
        if SUMS:
            ds += tl.sum(tl.where(mask, dx.to(tl.float32), 0.0), axis=0)
    tl.store(dw_part + pid * C + cols, dw, mask=cols < C)
    tl.store(db_part + pid * C + cols, db, mask=cols < C)
    if SUMS:
        tl.store(ds_part + pid * C + cols, ds, mask=cols < C)


def _rows(inp):
    """C, and N = B*T rows of it."""
    C = inp.shape[-1]
    return C, inp.numel() // C


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=1e-5):
    # out: (B,T,C), mean: (B,T), rstd: (B,T), inp: (B,T,C), weight: (C,), bias: (C,)
    _forward(out, mean, rstd, inp, weight, bias, eps)


def residual_layernorm_forward(residual, out, mean, rstd, inp1, inp2, weight, bias,
                               eps=1e-5):
    # residual: (B,T,C) = inp1 + inp2; out: (B,T,C), mean, rstd: (B,T) its layernorm with
    # weight, bias: (C,). One kernel: the sum is normalised without a trip through memory.
    _forward(out, mean, rstd, inp1, weight, bias, eps, residual, inp2)


def _forward(out, mean, rstd, inp, weight, bias, eps, residual=None, inp2=None):
    """The forward kernel's launch; given residual, it normalises inp + inp2, stored there.
    (Without, the kernel never touches its residual and inp2 pointers: inp stands in.)"""
    C, N = _rows(inp)
    grid = lambda m: (triton.cdiv(N, m["ROWS"]),)  # noqa: E731
    _layernorm_forward_kernel[grid](out, mean, rstd, inp, weight, bias,
                                    inp if residual is None else residual,
                                    inp if inp2 is None else inp2, N, C, eps,
                                    RESIDUAL=residual is not None,
                                    BLOCK_C=triton.next_power_of_2(C))


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd, dsums=None):
    # dinp: (B,T,C), dweight: (C,), dbias: (C,), dout: (B,T,C), inp: (B,T,C), weight: (C,),
    # mean: (B,T), rstd: (B,T); dsums: (C,) or None, += the column sums of dinp as left here
    C, N = _rows(inp)
    G = triton.cdiv(N, SPAN)
    dsts = [dweight, dbias] + ([] if dsums is None else [dsums])
    parts = torch.empty((len(dsts), G, C), dtype=torch.float32, device=inp.device)
    _layernorm_backward_kernel[(G,)](dinp, parts[0], parts[1], parts[-1], dout, inp, weight,
                                     mean, rstd, N, C, SUMS=dsums is not None, SPAN=SPAN,
                                     BLOCK_C=triton.next_power_of_2(C))
    add_partial_sums(dsts, parts)
