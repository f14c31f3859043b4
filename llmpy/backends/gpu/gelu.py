"""GELU (tanh approximation, as GPT-2), forward and backward, elementwise in float32.

0.5 * x * (1 + tanh(u)) == x * sigmoid(2u): Triton has sigmoid, and no tanh that the
interpreter also runs. Elements per program, and warps, are timed on a GPU on first use per
size: wider blocks keep more bytes in flight per thread."""
import math

import triton
import triton.language as tl

from .interpreter import ELEMENTS, configs, tuning

GELU_SCALE = tl.constexpr(math.sqrt(2.0 / math.pi))
# (BLOCK, num_warps): the last is the one config that small tensors take
_CONFIGS = configs([(dict(BLOCK=2048), 4, 1), (dict(BLOCK=4096), 4, 1), (dict(BLOCK=4096), 8, 1),
                    (dict(BLOCK=8192), 8, 1), (dict(BLOCK=1024), 4, 1)], dict(BLOCK=ELEMENTS))


@triton.autotune(configs=_CONFIGS, **tuning(least=1 << 20))
@triton.jit
def _gelu_forward_kernel(out, inp, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < N
    x = tl.load(inp + o, mask=mask).to(tl.float32)
    u = GELU_SCALE * (x + 0.044715 * x * x * x)
    tl.store(out + o, (x * tl.sigmoid(2.0 * u)).to(out.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, **tuning(least=1 << 20))
@triton.jit
def _gelu_backward_kernel(dinp, inp, dout, N, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = o < N
    x = tl.load(inp + o, mask=mask).to(tl.float32)
    u = GELU_SCALE * (x + 0.044715 * x * x * x)
    s = tl.sigmoid(2.0 * u)                                     # (1 + tanh(u)) / 2
    du = GELU_SCALE * (1.0 + 3.0 * 0.044715 * x * x)
    grad = s + 2.0 * x * s * (1.0 - s) * du                     # 1 - tanh^2 = 4 s (1 - s)
    d = tl.load(dout + o, mask=mask).to(tl.float32) * grad     # written, not added
    tl.store(dinp + o, d.to(dinp.dtype.element_ty), mask=mask)


def gelu_forward(out, inp):
    # out, inp: matching shapes, e.g. (B,T,4C)
    N = inp.numel()
    _gelu_forward_kernel[lambda m: (triton.cdiv(N, m["BLOCK"]),)](out, inp, N)


def gelu_backward(dinp, inp, dout):
    # dinp, inp, dout: matching shapes
    N = inp.numel()
    _gelu_backward_kernel[lambda m: (triton.cdiv(N, m["BLOCK"]),)](dinp, inp, dout, N)
