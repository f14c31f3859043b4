"""The fused classifier: softmax + cross-entropy + dlogits without storing probabilities.

The forward streams each row of logits once with an online softmax (running max and sum in
float32) and saves only its logsumexp: loss = lse - logit[target]. The backward streams the row
again and writes dlogits = (softmax - onehot(target)) * dloss, the softmax recomputed as
exp(logit - lse). For GPT-2 at B*T = 16K rows, float32 probabilities would take 3.3 GB; the
logsumexps take 64 KB. Only the first V (real) logits take part; the padded ones get gradient 0.
Given softcap > 0 (Gemma 2's final logits), both kernels cap each logit as they load it,
softcap * tanh(logit / softcap), and the backward multiplies by the cap's derivative: the capped
logits are never stored either.

Unlike the other backward ops, the backward *writes* dlogits instead of adding into it: the
model passes the logits buffer itself as dlogits (llm.c's fused classifier does the same), and
each block of a row is read before it is overwritten.

The forward's block width is timed on a GPU on first use: each step of its loop waits on two
reductions, so wider blocks keep more of a row in flight. The backward is not timed, as its
timing runs would overwrite the logits (it streams at close to the memory's speed anyway).
"""
import triton
import triton.language as tl

from .launch import ROWS, configs, tuning
from .softcap import tanh

BLOCK = 1024
# the backward's: 8 logits a thread at its 8 warps, one 16-byte load each
BACKWARD_BLOCK = 2048


@triton.jit
def _rows(N, ROWS: tl.constexpr):
    # this program's rows, int64 (B*T*Vp passes 2**31); the tail repeats the last row, whose
    # stores are masked off, so that no lane computes on -inf alone
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    return tl.minimum(rows, N - 1).to(tl.int64), rows < N


@triton.jit
def _capped(x, softcap, SOFTCAP: tl.constexpr):
    """x, or softcap * tanh(x / softcap) where SOFTCAP (Gemma 2's final logits)."""
    if SOFTCAP:
        return softcap * tanh(x / softcap)
    return x


@triton.autotune(configs=configs([(dict(BLOCK=2048), 8, 1), (dict(BLOCK=4096), 8, 1),
                                  (dict(BLOCK=4096), 16, 1), (dict(BLOCK=8192), 16, 1),
                                  (dict(BLOCK=BLOCK), 8, 1)], dict(BLOCK=BLOCK)),
                 **tuning("V", "Vp", "SOFTCAP"))
@triton.jit
def _classifier_forward_kernel(losses, lse, logits, targets, N, V, Vp, softcap,
                               SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, ok = _rows(N, ROWS)
    m = tl.full([ROWS], -float("inf"), dtype=tl.float32)       # running max and sum
    s = tl.zeros([ROWS], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        # masked at Vp, not V: llm.c pads Vp to a multiple of 128, so the loads are 16-byte
        # vectors (masked at V, each lane loads its own 2 bytes, at ~60% of memory speed)
        x = tl.load(logits + rows[:, None] * Vp + cols[None, :], mask=cols[None, :] < Vp)
        x = tl.where(cols[None, :] < V, _capped(x.to(tl.float32), softcap, SOFTCAP),
                     -float("inf"))
        m_new = tl.maximum(m, tl.max(x, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), axis=1)
        m = m_new
    row_lse = m + tl.log(s)
    target_logit = _capped(tl.load(logits + rows * Vp + tl.load(targets + rows)).to(tl.float32),
                           softcap, SOFTCAP)
    tl.store(lse + rows, row_lse, mask=ok)
    tl.store(losses + rows, (row_lse - target_logit).to(losses.dtype.element_ty), mask=ok)


@triton.jit
def _classifier_backward_kernel(dlogits, dlosses, logits, lse, targets, N, V, Vp, softcap,
                                SOFTCAP: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows, ok = _rows(N, ROWS)
    dloss = tl.load(dlosses + rows).to(tl.float32)[:, None]
    row_lse = tl.load(lse + rows)[:, None]
    target = tl.load(targets + rows)[:, None]
    for start in range(0, Vp, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        real = cols[None, :] < V
        o = rows[:, None] * Vp + cols[None, :]
        x = _capped(tl.load(logits + o, mask=ok[:, None] & (cols[None, :] < Vp), other=0.0
                            ).to(tl.float32), softcap, SOFTCAP)  # masked at Vp: as the forward
        d = (tl.exp(x - row_lse) - tl.where(cols[None, :] == target, 1.0, 0.0)) * dloss
        if SOFTCAP:
            d *= 1.0 - (x / softcap) * (x / softcap)             # through the cap's tanh
        d = tl.where(real, d, 0.0)
        tl.store(dlogits + o, d.to(dlogits.dtype.element_ty),
                 mask=ok[:, None] & (cols[None, :] < Vp))


def crossentropy_forward(losses, lse, logits, targets, V, softcap=0.0):
    # losses: (B,T), lse: (B,T) float32, logits: (B,T,Vp), targets: (B,T) int, V: real vocab size;
    # softcap > 0: the loss of softcap * tanh(logits / softcap) (Gemma 2's final logits)
    N, Vp = losses.numel(), logits.shape[-1]
    _classifier_forward_kernel[(triton.cdiv(N, ROWS),)](losses, lse, logits, targets, N, V, Vp,
                                                        float(softcap), SOFTCAP=softcap > 0,
                                                        ROWS=ROWS)


def crossentropy_backward(dlogits, dlosses, logits, lse, targets, V, softcap=0.0):
    # dlogits: (B,T,Vp), written (it may be logits itself), dlosses: (B,T), logits: (B,T,Vp),
    # the uncapped logits, lse: (B,T) float32, targets: (B,T) int; softcap as the forward's
    N, Vp = dlosses.numel(), logits.shape[-1]
    block = min(BACKWARD_BLOCK, triton.next_power_of_2(V))
    _classifier_backward_kernel[(triton.cdiv(N, ROWS),)](dlogits, dlosses, logits, lse, targets,
                                                         N, V, Vp, float(softcap),
                                                         SOFTCAP=softcap > 0, ROWS=ROWS,
                                                         BLOCK=block, num_warps=8)
