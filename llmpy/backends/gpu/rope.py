"""Rotary position embedding (RoPE), forward and backward, in HF's rotate-half pairing: each
head's channel d < hd/2 turns with channel d + hd/2 by the angle of (position, d),
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin.
The backward is the inverse rotation, the same kernel with sin negated:
    dx1 = d1 * cos + d2 * sin,    dx2 = d2 * cos - d1 * sin.

One program turns every head of one position, so each row of cos and sin is read once for all
heads. The (B,T,H,hd) arguments may be views with any strides but the last (the q and k heads
inside the packed qkv rows): each program reads both halves of a head before it writes them,
so the forward's out may also be inp itself (in place). The backward adds into dinp, as the
ops' contract says.
"""
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(out, inp, cos, sin, T, H, half, sign, o_b, o_t, o_h, i_b, i_t, i_h,
                 ADD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # out, inp: (B,T,H,2*half) with strides (o_b, o_t, o_h, 1) and (i_b, i_t, i_h, 1);
    # cos, sin: (T,half); sign: 1.0 to rotate, -1.0 for the inverse rotation; ADD: out += it
    pid = tl.program_id(0)
    b, t = (pid // T).to(tl.int64), pid % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < H) & (d < half)
    x = inp + b * i_b + t * i_t + heads * i_h + d               # (BLOCK_H,BLOCK_D) pointers
    x1 = tl.load(x, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x + half, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos + t * half + d, mask=d < half, other=0.0).to(tl.float32)   # (1,BLOCK_D)
    s = tl.load(sin + t * half + d, mask=d < half, other=0.0).to(tl.float32) * sign
    y = out + b * o_b + t * o_t + heads * o_h + d
    y1, y2 = x1 * c - x2 * s, x2 * c + x1 * s
    if ADD:
        y1 += tl.load(y, mask=mask, other=0.0).to(tl.float32)
        y2 += tl.load(y + half, mask=mask, other=0.0).to(tl.float32)
    tl.store(y, y1.to(out.dtype.element_ty), mask=mask)
    tl.store(y + half, y2.to(out.dtype.element_ty), mask=mask)


def warps(BLOCK_H, BLOCK_D):
    """At least 4 elements a thread, up to 4 warps: a program's bf16 halves then load as
    vectors. One kv head of Gemma 3's (after its QK-norm, k turns on its own) is 128 elements,
    which 4 warps would load one a thread, a scalar 2-byte load each."""
    return max(1, min(4, BLOCK_H * BLOCK_D // 128))


def _rope(out, inp, cos, sin, sign, add):
    B, T, H, hd = inp.shape
    assert inp.stride(-1) == 1 and out.stride(-1) == 1 and cos.is_contiguous() \
        and sin.is_contiguous(), "rope: the channels of a head must be contiguous"
    BLOCK_H, BLOCK_D = triton.next_power_of_2(H), triton.next_power_of_2(hd // 2)
    _rope_kernel[(B * T,)](out, inp, cos, sin, T, H, hd // 2, sign, *out.stride()[:3],
                           *inp.stride()[:3], ADD=add, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
                           num_warps=warps(BLOCK_H, BLOCK_D))


def rope_forward(out, inp, cos, sin):
    # out, inp: (B,T,H,hd), views allowed, out may be inp; cos, sin: (T,hd/2)
    _rope(out, inp, cos, sin, 1.0, False)


def rope_backward(dinp, dout, cos, sin):
    # dinp: (B,T,H,hd) added into, dout: (B,T,H,hd); cos, sin: (T,hd/2)
    _rope(dinp, dout, cos, sin, -1.0, True)
