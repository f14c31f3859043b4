"""The gated MLP activations, forward and backward, elementwise in float32: SwiGLU (Llama,
Mistral, Qwen2: up * silu(gate)) and GeGLU (Gemma: up * gelu_tanh(gate)). One kernel each way;
GELU, a constexpr, picks the activation.

inp (N,2F) holds each row's [up | gate] (the fc matmul's output, [up; gate] weight rows), out
(N,F). The kernels walk (rows, channels) tiles of the F outputs, so up and gate are read as
contiguous vectors. The backward adds into dinp, as the ops' contract says (the model zeroes
it first; unlike gelu_backward's, it is not among the backend's writes_activation_grads).
"""
import triton
import triton.language as tl

from .gelu import GELU_SCALE
from .launch import ROWS, configs, tuning


@triton.jit
def _act(g, GELU: tl.constexpr):
    """act(g) and act'(g), float32. gelu_tanh(g) = g * sigmoid(2u), as gelu.py."""
    if GELU:
        u = GELU_SCALE * (g + 0.044715 * g * g * g)
        s = tl.sigmoid(2.0 * u)
        du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * g * g)
        return g * s, s + 2.0 * g * s * (1.0 - s) * du
    s = tl.sigmoid(g)
    return g * s, s + g * s * (1.0 - s)


@triton.jit
def _tile(N, F, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (ROWS,BLOCK_C) tile: the offsets of its up values in (N,2F) (gate at +F),
    of its outputs in (N,F), and its mask."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < F)
    rows = rows[:, None].to(tl.int64)
    return rows * 2 * F + cols[None, :], rows * F + cols[None, :], mask


# (ROWS, BLOCK_C, num_warps): the last is the one that small tensors take
_CONFIGS = configs([(dict(ROWS=2, BLOCK_C=1024), 4, 1), (dict(ROWS=4, BLOCK_C=1024), 8, 1),
                    (dict(ROWS=4, BLOCK_C=512), 4, 1), (dict(ROWS=8, BLOCK_C=512), 8, 1),
                    (dict(ROWS=1, BLOCK_C=1024), 4, 1)], dict(ROWS=ROWS, BLOCK_C=1024))


@triton.autotune(configs=_CONFIGS, **tuning("F", "GELU"))
@triton.jit
def _glu_forward_kernel(out, inp, N, F, GELU: tl.constexpr, ROWS: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    io, oo, mask = _tile(N, F, ROWS, BLOCK_C)
    up = tl.load(inp + io, mask=mask, other=0.0).to(tl.float32)
    a, _ = _act(tl.load(inp + io + F, mask=mask, other=0.0).to(tl.float32), GELU)
    tl.store(out + oo, (up * a).to(out.dtype.element_ty), mask=mask)


# dinp is added into, so the timing runs restore it
@triton.autotune(configs=_CONFIGS, restore_value=["dinp"], **tuning("F", "GELU"))
@triton.jit
def _glu_backward_kernel(dinp, dout, inp, N, F, GELU: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_C: tl.constexpr):
    io, oo, mask = _tile(N, F, ROWS, BLOCK_C)
    up = tl.load(inp + io, mask=mask, other=0.0).to(tl.float32)
    a, da = _act(tl.load(inp + io + F, mask=mask, other=0.0).to(tl.float32), GELU)
    dy = tl.load(dout + oo, mask=mask, other=0.0).to(tl.float32)
    du = tl.load(dinp + io, mask=mask, other=0.0).to(tl.float32) + dy * a
    dg = tl.load(dinp + io + F, mask=mask, other=0.0).to(tl.float32) + dy * up * da
    tl.store(dinp + io, du.to(dinp.dtype.element_ty), mask=mask)
    tl.store(dinp + io + F, dg.to(dinp.dtype.element_ty), mask=mask)


def _launch(kernel, grad, inp, gelu):
    """kernel over the rows of inp (...,2F): forward (grad: out) or backward (grad: (dinp,
    dout))."""
    F = inp.shape[-1] // 2
    N = inp.numel() // (2 * F)
    kernel[lambda m: (triton.cdiv(N, m["ROWS"]), triton.cdiv(F, m["BLOCK_C"]))](
        *grad, inp, N, F, GELU=gelu)


def swiglu_forward(out, inp):
    # out: (...,F) = up * silu(gate), inp: (...,2F) = [up | gate]
    _launch(_glu_forward_kernel, (out,), inp, False)


def swiglu_backward(dinp, dout, inp):
    # dinp: (...,2F) added into, dout: (...,F), inp: (...,2F) = [up | gate]
    _launch(_glu_backward_kernel, (dinp, dout), inp, False)


def geglu_forward(out, inp):
    # out: (...,F) = up * gelu_tanh(gate), inp: (...,2F) = [up | gate]
    _launch(_glu_forward_kernel, (out,), inp, True)


def geglu_backward(dinp, dout, inp):
    # dinp: (...,2F) added into, dout: (...,F), inp: (...,2F) = [up | gate]
    _launch(_glu_backward_kernel, (dinp, dout), inp, True)
