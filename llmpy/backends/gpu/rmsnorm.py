"""RMSNorm forward (alone, or fused with the residual add before it) and backward, the Llama
family's norm: layernorm.py's kernels without the mean and the bias, with its configs (timed
on a GPU on first use per (rows, C)). Each program normalises blocks of ROWS rows of C with the
statistics in float32; rstd is kept in float32 for the backward. `offset` is added to the
weight as it is loaded: Gemma's x * (1 + w), whose checkpoints store w around 0.

Rows may be views with a stride of their own: Gemma 3's QK-norm normalises each q and k head
inside the packed qkv rows. Row r of each tensor starts at (r // H) * outer + (r % H) * inner,
its own outer and inner: H = 1 for a tensor of whole rows, H heads of a (...,H,C) view.

The weight gradient is a sum over all B*T rows: each program of the backward sums its SPAN rows
into its own float32 partial, added up afterwards in a fixed order (deterministic, no atomics).
dinp is added into: it is the residual stream's gradient, which every layer adds to.
"""
import torch
import triton
import triton.language as tl

from .launch import ROWS, SPAN, configs, tuning
from .layernorm import BACKWARD_CONFIGS, FORWARD_CONFIGS, load_rows
from .matmul import add_partial_sums


# (ROWS, num_warps) for rows under 512 wide (QK-norm's heads): more rows a program than
# layernorm's configs take, and 4 warps, so that each thread still loads a vector of bf16s,
# not one, from the rows and the weight
NARROW_CONFIGS = configs([(dict(ROWS=4), 4, 1), (dict(ROWS=8), 4, 1), (dict(ROWS=16), 4, 1),
                          (dict(ROWS=2), 4, 1)], dict(ROWS=ROWS))


def _tuning(*key):
    """interpreter.tuning per (rows, C, *key), NARROW_CONFIGS for narrow rows."""
    tuned = tuning("C", *key)
    prune = tuned["prune_configs_by"]["early_config_prune"]

    def narrow(candidates, named_args, **kwargs):
        return prune(NARROW_CONFIGS if kwargs["BLOCK_C"] < 512 else candidates, named_args,
                     **kwargs)
    return dict(tuned, prune_configs_by={"early_config_prune": narrow})


@triton.jit
def _offsets(rows, cols, H, outer, inner):
    """(ROWS,BLOCK_C) offsets of these rows' channels, row r at (r // H) * outer + (r % H) *
    inner; < 2**31 (the tensors hold fewer elements)."""
    return ((rows // H) * outer + (rows % H) * inner)[:, None] + cols[None, :]


@triton.autotune(configs=FORWARD_CONFIGS, **_tuning("RESIDUAL"))
@triton.jit
def _rmsnorm_forward_kernel(out, rstd, inp, weight, residual, inp2, N, C, H, x_outer, x_inner,
                            y_outer, y_inner, eps, offset, RESIDUAL: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # inp (and under RESIDUAL inp2, residual) at (x_outer, x_inner), out at (y_outer, y_inner);
    # RESIDUAL: normalise inp + inp2, stored in residual
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    x = load_rows(inp, residual, inp2, _offsets(rows, cols, H, x_outer, x_inner), mask, RESIDUAL)
    rs = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / C + eps)        # (ROWS,)
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32) + offset
    tl.store(out + _offsets(rows, cols, H, y_outer, y_inner),
             (x * rs[:, None] * w[None, :]).to(out.dtype.element_ty), mask=mask)
    tl.store(rstd + rows, rs, mask=rows < N)


# dinp is added into, so the timing runs restore it
@triton.autotune(configs=BACKWARD_CONFIGS, restore_value=["dinp"], **_tuning())
@triton.jit
def _rmsnorm_backward_kernel(dinp, dw_part, dout, inp, weight, rstd, N, C, H, dx_outer, dx_inner,
                             dy_outer, dy_inner, x_outer, x_inner, offset, SPAN: tl.constexpr,
                             ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    # dw_part: (programs, C) float32, this program's sum over its SPAN rows of dweight's terms
    tl.static_assert(SPAN % ROWS == 0)         # else the last step reads the next span's rows
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    w = tl.load(weight + cols, mask=cols < C).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    for start in range(pid * SPAN, pid * SPAN + SPAN, ROWS):
        rows = start + tl.arange(0, ROWS)
        mask = (rows[:, None] < N) & (cols[None, :] < C)
        x = tl.load(inp + _offsets(rows, cols, H, x_outer, x_inner), mask=mask,
                    other=0.0).to(tl.float32)
        dy = tl.load(dout + _offsets(rows, cols, H, dy_outer, dy_inner), mask=mask,
                     other=0.0).to(tl.float32)
        rs = tl.load(rstd + rows, mask=rows < N, other=0.0)[:, None]
        norm = x * rs
        dw += tl.sum(dy * norm, axis=0)
        # d/dx of x * rstd: layernorm's without the mean term (doc/layernorm.md)
        dnorm = dy * w[None, :]
        dx = (dnorm - norm * (tl.sum(dnorm * norm, axis=1)[:, None] / C)) * rs
        o = _offsets(rows, cols, H, dx_outer, dx_inner)
        dx += tl.load(dinp + o, mask=mask, other=0.0).to(tl.float32)
        tl.store(dinp + o, dx.to(dinp.dtype.element_ty), mask=mask)
    tl.store(dw_part + pid * C + cols, dw, mask=cols < C)


def _collapsed(shape, strides):
    """The stride of these leading dimensions taken as one, or None where their strides do not
    allow it (dimensions of size 1 have any stride)."""
    dims = [(n, s) for n, s in zip(shape, strides) if n > 1]
    if any(s != s_next * n_next for (_, s), (n_next, s_next) in zip(dims, dims[1:])):
        return None
    return dims[-1][1] if dims else 0


def _layout(*tensors):
    """(N rows, C, H, and (outer, inner) for each tensor): whole rows where every tensor's
    leading dimensions collapse into one (H = 1), else H = the heads of (...,H,C) views."""
    C = tensors[0].shape[-1]
    N = tensors[0].numel() // C
    assert all(t.stride(-1) == 1 for t in tensors), "rmsnorm: the channels must be contiguous"
    whole = [_collapsed(t.shape[:-1], t.stride()[:-1]) for t in tensors]
    if None not in whole:
        return N, C, 1, [(s, 0) for s in whole]
    strides = [(_collapsed(t.shape[:-2], t.stride()[:-2]), t.stride(-2)) for t in tensors]
    assert all(outer is not None for outer, _ in strides), \
        "rmsnorm: rows must be whole rows or the heads of (...,H,C) views"
    return N, C, tensors[0].shape[-2], strides


def rmsnorm_forward(out, rstd, inp, weight, eps, offset=0.0):
    # out: (...,C), rstd: (...) float32, inp: (...,C) (a view of heads allowed), weight: (C,)
    N, C, H, (x, y) = _layout(inp, out)
    _forward(out, rstd, inp, weight, eps, offset, N, C, H, x, y)


def residual_rmsnorm_forward(residual, out, rstd, inp1, inp2, weight, eps, offset=0.0):
    # residual: (...,C) = inp1 + inp2; out: (...,C), rstd: (...) float32 its RMSNorm with
    # weight: (C,). One kernel: the sum is normalised without a trip through memory.
    assert all(t.is_contiguous() for t in (residual, inp2)), "rmsnorm: residual, inp2 rows"
    N, C, H, (x, y) = _layout(inp1, out)
    assert H == 1 and x == (C, 0), "rmsnorm: inp1 must be whole rows, as residual and inp2"
    _forward(out, rstd, inp1, weight, eps, offset, N, C, H, x, y, residual, inp2)


def _forward(out, rstd, inp, weight, eps, offset, N, C, H, x, y, residual=None, inp2=None):
    """The forward kernel's launch over N rows, inp's at offsets x = (outer, inner), out's at
    y; given residual, it normalises inp + inp2, stored there. (Without, the kernel never
    touches its residual and inp2 pointers: inp stands in.)"""
    _rmsnorm_forward_kernel[lambda m: (triton.cdiv(N, m["ROWS"]),)](
        out, rstd, inp, weight, inp if residual is None else residual,
        inp if inp2 is None else inp2, N, C, H, *x, *y, eps, offset,
        RESIDUAL=residual is not None, BLOCK_C=triton.next_power_of_2(C))


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, offset=0.0):
    # dinp: (...,C) and dweight: (C,) added into, dout: (...,C), inp: (...,C) (views of heads
    # allowed), weight: (C,), rstd: (...) float32
    N, C, H, strides = _layout(dinp, dout, inp)
    G = triton.cdiv(N, SPAN)
    parts = torch.empty((1, G, C), dtype=torch.float32, device=inp.device)
    _rmsnorm_backward_kernel[(G,)](dinp, parts[0], dout, inp, weight, rstd, N, C, H,
                                   *(s for pair in strides for s in pair), offset, SPAN=SPAN,
                                   BLOCK_C=triton.next_power_of_2(C))
    add_partial_sums([dweight], parts)
