"""Matmul + bias through cuBLAS (torch.addmm): the bias add rides in the GEMM's epilogue and the
weight gradient's `+=` in its beta=1 accumulate, so neither costs a pass of its own. dinp is
written, not added to (the backend's writes_activation_grads). The bias gradient is a column sum
of dout, accumulated in float32; for attproj, fc and fcproj the model has the layernorm or GELU
backward that writes dout sum it instead (the backend's sums_bias_grads), and gives
matmul_backward dbias=None. In fp32, torch leaves TF32 off by default, so these are full fp32
products; in bf16, cuBLAS accumulates in fp32."""
import torch


def add_partial_sums(dsts, parts):
    """dsts[i]: (C,) += the float32 sum over the rows of parts[i]; parts: (n,G,C), a kernel's
    partial sums (one row per program) or the rows themselves. One reduction for all n."""
    for dst, sums in zip(dsts, torch.sum(parts, dim=1, dtype=torch.float32)):
        dst += sums


def matmul_forward(out, inp, weight, bias):
    # out: (B,T,OC), inp: (B,T,C), weight: (OC,C), bias: (OC,) or None
    OC, C = weight.shape
    out2, inp2 = out.view(-1, OC), inp.view(-1, C)              # (B*T,OC), (B*T,C)
    if bias is None:
        torch.mm(inp2, weight.t(), out=out2)
    else:
        torch.addmm(bias, inp2, weight.t(), out=out2)


def matmul_backward(dinp, dweight, dbias, dout, inp, weight):
    # dinp: (B,T,C), dweight: (OC,C), dbias: (OC,) or None, dout: (B,T,OC), inp: (B,T,C),
    # weight: (OC,C)
    OC, C = weight.shape
    dout2 = dout.view(-1, OC)                                   # (B*T,OC)
    torch.mm(dout2, weight, out=dinp.view(-1, C))              # written: one reader
    dweight.addmm_(dout2.t(), inp.view(-1, C))
    if dbias is not None:
        add_partial_sums([dbias], dout2[None])
