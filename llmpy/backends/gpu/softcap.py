"""Soft capping (Gemma 2's logits): out = cap * tanh(inp / cap), elementwise in float32, and its
backward, which reads the output: d out / d inp = 1 - (out / cap)^2.

tanh(x) = 2 sigmoid(2x) - 1: Triton has sigmoid, and no tanh that the interpreter also runs
(as gelu.py). Attention's logit cap runs inside the flash attention kernels and the final logits'
inside the fused classifier (attention.py, classifier.py); these ops are the unfused form.
The forward may run in place (not autotuned: its timing runs would apply an in-place call
again); the backward adds into dinp, as the ops' contract says.
"""
import triton
import triton.language as tl

from .launch import ELEMENTS as BLOCK


@triton.jit
def tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softcap_forward_kernel(out, inp, N, cap, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(inp + o, mask=o < N).to(tl.float32)
    tl.store(out + o, (cap * tanh(x / cap)).to(out.dtype.element_ty), mask=o < N)


@triton.jit
def _softcap_backward_kernel(dinp, dout, out, N, cap, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(out + o, mask=o < N).to(tl.float32) / cap
    d = tl.load(dout + o, mask=o < N).to(tl.float32) * (1.0 - y * y)
    d += tl.load(dinp + o, mask=o < N).to(tl.float32)
    tl.store(dinp + o, d.to(dinp.dtype.element_ty), mask=o < N)


def softcap_forward(out, inp, cap):
    # out, inp: matching shapes (out may be inp); cap > 0
    N = inp.numel()
    _softcap_forward_kernel[(triton.cdiv(N, BLOCK),)](out, inp, N, cap, BLOCK=BLOCK)


def softcap_backward(dinp, dout, out, cap):
    # dinp: added into, dout, out: the forward's output, matching shapes
    N = out.numel()
    _softcap_backward_kernel[(triton.cdiv(N, BLOCK),)](dinp, dout, out, N, cap, BLOCK=BLOCK)
