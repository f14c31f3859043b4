"""Token embedding without positions (the Llama family's: RoPE turns q and k instead), forward
and backward, times `scale` (Gemma's sqrt(C), rounded to the compute dtype by the model as HF
does; 1 elsewhere). The backward is encoder.py's deterministic wte gradient: the token ids are
sorted, and one program sums all the rows of one id in a fixed order, then scales the sum."""
import triton
import triton.language as tl

from .encoder import wte_backward
from .launch import ROWS


@triton.jit
def _embedding_forward_kernel(out, inp, wte, N, C, scale, ROWS: tl.constexpr,
                              BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)        # b*T + t
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    tok = tl.load(inp + rows, mask=rows < N, other=0)
    x = tl.load(wte + tok[:, None] * C + cols[None, :], mask=mask).to(tl.float32) * scale
    tl.store(out + rows[:, None].to(tl.int64) * C + cols[None, :], x.to(out.dtype.element_ty),
             mask=mask)


def embedding_forward(out, inp, wte, scale=1.0):
    # out: (B,T,C) = wte[inp] * scale, inp: (B,T) int, wte: (Vp,C)
    C = out.shape[-1]
    N = inp.numel()
    _embedding_forward_kernel[(triton.cdiv(N, ROWS),)](out, inp, wte, N, C, scale, ROWS=ROWS,
                                                       BLOCK_C=triton.next_power_of_2(C))


def embedding_backward(dwte, dout, inp, scale=1.0):
    # dwte: (Vp,C) += scale * dout's rows summed by token id, dout: (B,T,C), inp: (B,T) int
    wte_backward(dwte, dout, inp, scale)
