"""The GPU backend: the reference ops' signatures on torch tensors, with Triton kernels.

PyTorch is only the array library here: allocation, host<->device copies and cuBLAS matmuls.
Nothing uses autograd; every forward and backward is an explicit kernel, one file per op family:
encoder.py, layernorm.py, matmul.py (cuBLAS), gelu.py, attention.py (flash attention, with
grouped-query heads, softcap and sliding window), classifier.py (fused softmax + cross-entropy,
with an optional final-logit softcap), adamw.py; for the Llama/Gemma decoder also
embedding.py, rmsnorm.py, rope.py, glu.py (SwiGLU, GeGLU) and softcap.py; bench.py is
`llmpy bench gpu`.

Device: the CUDA GPU when there is one. Without one, Triton's interpreter runs the same kernels
on CPU tensors (TRITON_INTERPRET=1, set before triton is imported; interpreter.py), slowly: that
is how CI tests them. Without a GPU and without the interpreter the backend is unavailable
(ImportError), and so is it without torch or triton.

Mixed precision, the way llm.c's train_gpt2.cu does it, in the backend-neutral model:
- `zeros(n)` allocates in `compute_dtype`: bf16 on a GPU, float32 in the interpreter
  (LLMPY_GPU_DTYPE=float32|float16|bfloat16 overrides it). So the model's params, grads and
  activations are bf16.
- `zeros(n, np.float32)` allocates float32. The model keeps its per-row statistics there
  (model.STATS: layernorm mean/rstd, the logsumexps, the losses), AdamW its moments.
- `master_weights(params)` gives AdamW float32 master weights, which `adamw_update(...,
  master=)` updates and rounds into the bf16 params in the same pass.
- Every kernel computes and accumulates in float32, and so does cuBLAS.
- `fused = True` tells the model that attention keeps one logsumexp per row instead of the
  (T,T) matrices (flash attention), and the classifier one per position instead of the
  probabilities (fused classifier): neither is ever materialised.
- `writes_activation_grads = True`: as in llm.c's train_gpt2.cu, the backward ops of matmul,
  GELU, attention and the classifier write their input's gradient instead of adding into it.
  Each of those gradients has exactly one writer, so the model never zeroes their buffers:
  that saves a pass writing zeros and one reading them back, per layer (at GPT-2 124M, B=16,
  T=1024 in bf16, 8.4 GB of traffic a step). The parameters' gradients still accumulate, and
  so does the residual stream's (layernorm's dinp). The classifier writes dlogits over the
  logits, which have no other reader.
- `sums_bias_grads = True`: layernorm's and GELU's backwards take `dsums` and sum into it,
  over the rows, the gradient they leave, which is the dout of the matmul backward that comes
  next (attproj's, fcproj's, fc's): the model gives them that matmul's bias gradient, and the
  matmul None. Each of those douts is then read once instead of twice (at GPT-2 124M, B=64,
  T=1024: 7.2 GB a step, about 2.7 ms of torch's column sums on an H200, for 1.2 ms more in
  the two kernels: bench/RESULTS.md).
"""
import os

import numpy as np
import torch
import triton  # noqa: F401  (the backend is unavailable without it)

if not torch.cuda.is_available():
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise ImportError("no CUDA GPU (TRITON_INTERPRET=1 runs the Triton kernels on the CPU)")
    from .interpreter import fix_loop_bounds
    fix_loop_bounds()

from .adamw import adamw_update, master_weights, sum_squares  # noqa: E402,F401
from .attention import attention_backward, attention_forward  # noqa: E402,F401
from .classifier import crossentropy_backward, crossentropy_forward  # noqa: E402,F401
from .embedding import embedding_backward, embedding_forward  # noqa: E402,F401
from .encoder import encoder_backward, encoder_forward  # noqa: E402,F401
from .gelu import gelu_backward, gelu_forward  # noqa: E402,F401
from .glu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward  # noqa: E402,F401
from .layernorm import (layernorm_backward, layernorm_forward,  # noqa: E402,F401
                        residual_layernorm_forward)
from .matmul import matmul_backward, matmul_forward  # noqa: E402,F401
from .rmsnorm import (residual_rmsnorm_forward, rmsnorm_backward,  # noqa: E402,F401
                      rmsnorm_forward)
from .rope import rope_backward, rope_forward  # noqa: E402,F401
from .softcap import softcap_backward, softcap_forward  # noqa: E402,F401

name = "gpu"
fused = True
writes_activation_grads = True
sums_bias_grads = True
# The shared op tests compare with float64 at float32 tolerance; tests/test_gpu.py checks
# float16 (interpreter) and bf16 (GPU) with their own tolerances.
test_dtypes = (np.float32,)
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets, for MFU.
# The first name contained in the device's name counts, so "H100 PCIe" goes before "H100".
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12))
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
compute_dtype = _DTYPES[os.environ.get("LLMPY_GPU_DTYPE",
                                       "bfloat16" if device.type == "cuda" else "float32")]


def dense_peak(name):
    """The dense bf16 tensor-core peak (FLOP/s) of the GPU with this name, or None."""
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def peak_flops():
    """This GPU's dense tensor-core peak in the compute dtype (FLOP/s), or None: an unknown GPU,
    float32 (no tensor-core peak to compare with), or the interpreter."""
    if device.type != "cuda" or compute_dtype == torch.float32:
        return None
    return dense_peak(torch.cuda.get_device_name(device))


# ----------------------------------------------------------------------------- memory

def available_memory():
    """Bytes that this process's buffers can take in all: the GPU's free memory plus what torch's
    allocator already holds here (the buffers made so far among them); None in the interpreter
    (CPU tensors: no GPU to fill)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)


def zeros(n, dtype=None):
    """(n,) zeros in the compute dtype, or float32 when asked for np.float32."""
    return torch.zeros(n, dtype=torch.float32 if dtype == np.float32 else compute_dtype,
                       device=device)


def to_device(x):
    """A host array -> a new device tensor (token ids stay int64, floats keep their dtype)."""
    return torch.tensor(np.ascontiguousarray(x), device=device)


def to_host(x):
    """A device tensor -> a NumPy array; bf16 (which NumPy lacks) and fp16 become float32, which
    the host-side decoder's kernels take."""
    x = x.detach()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).cpu().numpy()


# ----------------------------------------------------------------------------- residual

def residual_forward(out, inp1, inp2):
    # out, inp1, inp2: (B,T,C)
    torch.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout):
    # dinp1, dinp2, dout: (B,T,C)
    dinp1 += dout
    dinp2 += dout
