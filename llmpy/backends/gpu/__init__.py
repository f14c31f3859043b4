"""The GPU backend: the reference ops' signatures on torch tensors, with Triton kernels.

PyTorch is only the array library here: allocation, host<->device copies and cuBLAS matmuls.
Nothing uses autograd; every forward and backward is an explicit kernel, one file per op family:
encoder.py, layernorm.py, matmul.py (cuBLAS), gelu.py, attention.py (flash attention, with
grouped-query heads, softcap and sliding window), classifier.py (fused softmax + cross-entropy,
with an optional final-logit softcap), adamw.py; for the Llama/Gemma decoder also
embedding.py, rmsnorm.py, rope.py, glu.py (SwiGLU, GeGLU) and softcap.py; `llmpy bench gpu` lives in llmpy/bench/gpu.py.

Device: the CUDA GPU when there is one. Without one, Triton's interpreter runs the same kernels
on CPU tensors (TRITON_INTERPRET=1, which the process must set before triton is imported),
slowly: that is how CI tests them. Without a GPU and without the interpreter make() refuses
(ImportError), and the backend is unavailable without torch or triton. Nothing happens at
import: make(dtype) chooses the device and the compute dtype, so one process can hold a
float32 and a bf16 backend.

Mixed precision, the way llm.c's train_gpt2.cu does it, in the backend-neutral model:
- `zeros(n)` allocates in the compute dtype: make(dtype=) (float32, float16 or bfloat16),
  else LLMPY_GPU_DTYPE, else bf16 on a GPU and float32 in the interpreter. So the model's params, grads and
  activations are bf16.
- `zeros(n, np.float32)` allocates float32. The model keeps its per-row statistics there
  (model.STATS: layernorm mean/rstd, the logsumexps, the losses), AdamW its moments.
- `master_weights(params)` gives AdamW float32 master weights, which `adamw_update(...,
  master=)` updates and rounds into the bf16 params in the same pass.
- Every kernel computes and accumulates in float32, and so does cuBLAS.
- Capabilities(fused=True) tells the model that attention keeps one logsumexp per row instead of the
  (T,T) matrices (flash attention), and the classifier one per position instead of the
  probabilities (fused classifier): neither is ever materialised.
- writes_activation_grads: as in llm.c's train_gpt2.cu, the backward ops of matmul,
  GELU, attention and the classifier write their input's gradient instead of adding into it.
  Each of those gradients has exactly one writer, so the model never zeroes their buffers:
  that saves a pass writing zeros and one reading them back, per layer (bench/RESULTS.md has
  the traffic at GPT-2 124M). The parameters' gradients still accumulate, and
  so does the residual stream's (layernorm's dinp). The classifier writes dlogits over the
  logits, which have no other reader.
- sums_bias_grads: layernorm's and GELU's backwards take `dsums` and sum into it,
  over the rows, the gradient they leave, which is the dout of the matmul backward that comes
  next (attproj's, fcproj's, fc's): the model gives them that matmul's bias gradient, and the
  matmul None. Each of those douts is then read once instead of twice (the time it saves on a
  GPU is in bench/RESULTS.md).
"""
import os
import sys

import numpy as np
import torch
import triton  # noqa: F401  (the backend is unavailable without it)

from ..base import Backend, Capabilities
from .adamw import adamw_update, master_weights, sum_squares, zero_fill  # noqa: F401
from .attention import attention_backward, attention_forward  # noqa: F401
from .classifier import crossentropy_backward, crossentropy_forward  # noqa: F401
from .embedding import embedding_backward, embedding_forward  # noqa: F401
from .encoder import encoder_backward, encoder_forward  # noqa: F401
from .gelu import gelu_backward, gelu_forward  # noqa: F401
from .glu import geglu_backward, geglu_forward, swiglu_backward, swiglu_forward  # noqa: F401
from .layernorm import layernorm_backward, layernorm_forward, residual_layernorm_forward  # noqa: F401
from .matmul import matmul_backward, matmul_forward  # noqa: F401
from .rmsnorm import residual_rmsnorm_forward, rmsnorm_backward, rmsnorm_forward  # noqa: F401
from .rope import rope_backward, rope_forward  # noqa: F401
from .softcap import softcap_backward, softcap_forward  # noqa: F401

# Dense (no sparsity) bf16/fp16 tensor-core peaks, FLOP/s, from NVIDIA's datasheets, for MFU.
# The first name contained in the device's name counts, so "H100 PCIe" goes before "H100".
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
              ("B200", 2250e12), ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12),
              ("L4", 121e12), ("A10", 125e12), ("RTX 4090", 165e12))
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CAPS = Capabilities(fused=True, writes_activation_grads=True, sums_bias_grads=True,
                    master_weights=True, host_arrays=False)


def make(dtype=None):
    """The gpu backend computing in `dtype` (see the module's docstring)."""
    cuda = torch.cuda.is_available()
    if not cuda:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ImportError("no CUDA GPU (TRITON_INTERPRET=1 runs the Triton kernels on the CPU)")
        from .launch import fix_loop_bounds
        fix_loop_bounds()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = dtype or os.environ.get("LLMPY_GPU_DTYPE", "bfloat16" if cuda else "float32")
    if dtype not in DTYPES:
        raise ImportError(f"unknown compute dtype {dtype!r} (choose from {', '.join(DTYPES)})")
    compute = DTYPES[dtype]

    def zeros(n, dtype=None):
        """(n,) zeros in the compute dtype, or float32 when asked for np.float32."""
        return torch.zeros(n, dtype=torch.float32 if dtype == np.float32 else compute,
                           device=device)

    def to_device(x):
        """A host array -> a new device tensor (token ids stay int64, floats keep their dtype)."""
        return torch.tensor(np.ascontiguousarray(x), device=device)

    def peak_flops():
        """This GPU's dense tensor-core peak in the compute dtype (FLOP/s), or None: an unknown
        GPU, float32 (no tensor-core peak to compare with), or the interpreter."""
        if not cuda or compute == torch.float32:
            return None
        return dense_peak(torch.cuda.get_device_name(device))

    def available_memory():
        """Bytes that this process's buffers can take in all: the GPU's free memory plus what
        torch's allocator already holds here (the buffers made so far among them); None in the
        interpreter (CPU tensors: no GPU to fill)."""
        if not cuda:
            return None
        return torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device)

    return Backend("gpu", sys.modules[__name__], caps=CAPS, dtype=dtype, zeros=zeros,
                   to_device=to_device, to_host=to_host, peak_flops=peak_flops,
                   available_memory=available_memory, master_weights=master_weights)


def dense_peak(name):
    """The dense bf16 tensor-core peak (FLOP/s) of the GPU with this name, or None."""
    return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def to_host(x):
    """A device tensor -> a NumPy array; bf16 (which NumPy lacks) and fp16 become float32."""
    x = x.detach()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).cpu().numpy()


