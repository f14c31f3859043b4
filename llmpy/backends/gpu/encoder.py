"""Token + position embedding, forward and backward. The wte gradient is deterministic: the
token ids are sorted (stably), and one program sums all the rows of one id in a fixed order,
instead of racing atomic adds whose order, and so whose rounding, changes from run to run."""
import torch
import triton
import triton.language as tl

from .launch import ROWS


@triton.jit
def _encoder_forward_kernel(out, inp, wte, wpe, N, T, C, ROWS: tl.constexpr,
                            BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)        # b*T + t
    cols = tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < N) & (cols[None, :] < C)
    tok = tl.load(inp + rows, mask=rows < N, other=0)
    x = tl.load(wte + tok[:, None] * C + cols[None, :], mask=mask).to(tl.float32)
    x += tl.load(wpe + (rows % T)[:, None] * C + cols[None, :], mask=mask).to(tl.float32)
    tl.store(out + rows[:, None] * C + cols[None, :], x.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _wte_backward_kernel(dwte, dout, ids, rows, N, C, scale, SEG: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    # ids: (N,) sorted token ids, rows: (N,) where each came from. The first position of each
    # run of equal ids sums the run, SEG positions at a time, and adds it times scale (the
    # forward's embedding scale); the others have nothing to do.
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    tok = tl.load(ids + i)
    prev = tl.load(ids + i - 1, mask=i > 0, other=-1)
    j = tl.where(prev == tok, N, i)                             # not a run's start: skip
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    more = j < N
    while more:
        offs = j + tl.arange(0, SEG)
        same = tl.load(ids + offs, mask=offs < N, other=-1) == tok     # a prefix: ids are sorted
        r = tl.load(rows + offs, mask=same, other=0)
        x = tl.load(dout + r[:, None] * C + cols[None, :], mask=same[:, None] & (cols < C)[None, :],
                    other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
        j += SEG
        more = tl.load(ids + j, mask=j < N, other=-1) == tok
    if prev != tok:
        p = dwte + tok * C + cols
        d = tl.load(p, mask=cols < C).to(tl.float32) + acc * scale
        tl.store(p, d.to(p.dtype.element_ty), mask=cols < C)


@triton.jit
def _wpe_backward_kernel(dwpe, dout, B, T, C, ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_C)
    mask = (t[:, None] < T) & (cols[None, :] < C)
    acc = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
    for b in range(B):
        acc += tl.load(dout + (b * T + t)[:, None] * C + cols[None, :], mask=mask).to(tl.float32)
    p = dwpe + t[:, None] * C + cols[None, :]
    tl.store(p, (tl.load(p, mask=mask).to(tl.float32) + acc).to(p.dtype.element_ty), mask=mask)


def wte_backward(dwte, dout, inp, scale):
    """dwte: (Vp,C) += scale * the rows of dout: (...,C) summed by token id, inp: (...) int."""
    C = dout.shape[-1]
    N = inp.numel()
    ids, rows = torch.sort(inp.reshape(-1), stable=True)        # (N,) each
    block = min(triton.next_power_of_2(C), 256)
    _wte_backward_kernel[(N, triton.cdiv(C, block))](dwte, dout, ids, rows, N, C, scale, SEG=16,
                                                     BLOCK_C=block)


def encoder_forward(out, inp, wte, wpe):
    # out: (B,T,C), inp: (B,T) int, wte: (Vp,C), wpe: (maxT,C)
    B, T, C = out.shape
    _encoder_forward_kernel[(triton.cdiv(B * T, ROWS),)](out, inp, wte, wpe, B * T, T, C,
                                                         ROWS=ROWS,
                                                         BLOCK_C=triton.next_power_of_2(C))


def encoder_backward(dwte, dwpe, dout, inp):
    # dwte: (Vp,C), dwpe: (maxT,C), dout: (B,T,C), inp: (B,T) int
    B, T, C = dout.shape
    wte_backward(dwte, dout, inp, 1.0)
    _wpe_backward_kernel[(triton.cdiv(T, ROWS),)](dwpe, dout, B, T, C, ROWS=ROWS,
                                                   BLOCK_C=triton.next_power_of_2(C))
