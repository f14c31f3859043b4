"""The backend contract: the ops every backend has, and the capabilities each declares.

A backend's ops are plain module-level functions in its package (numpy/, cpu/, gpu/<op>.py);
`Backend` gathers the ones named in OPS into one object, checking that none is missing, and
adds what the backend declares: its name, its `Capabilities`, how it allocates and moves arrays
(which may depend on options, such as the gpu backend's compute dtype), and its device's peak
FLOP/s and free memory. The model and the trainer read these attributes; they never probe a
backend for what it has. A new op is one more name in OPS (or in an architecture's own tuple
passed as `ops=`) and one more function in every backend's module."""
import copy
from dataclasses import dataclass

# Every op, as doc/backends.md lists their signatures.
OPS = (
    "encoder_forward", "encoder_backward",
    "layernorm_forward", "layernorm_backward", "residual_layernorm_forward",
    "matmul_forward", "matmul_backward",
    "attention_forward", "attention_backward",
    "gelu_forward", "gelu_backward",
    "crossentropy_forward", "crossentropy_backward",
    "adamw_update", "sum_squares", "zero_fill",
    # the Llama/Gemma decoder's (model/llama.py)
    "embedding_forward", "embedding_backward",
    "rmsnorm_forward", "rmsnorm_backward", "residual_rmsnorm_forward",
    "rope_forward", "rope_backward",
    "swiglu_forward", "swiglu_backward", "geglu_forward", "geglu_backward",
    "softcap_forward", "softcap_backward",
)


@dataclass(frozen=True)
class Capabilities:
    """What a backend does differently from the NumPy reference (doc/backends.md).
    fused: flash attention and a fused classifier, which keep one logsumexp per row instead of
      the (T,T) attention matrices and the probabilities, and take other arguments for it.
    writes_activation_grads: the backwards of matmul, GELU, attention and the classifier WRITE
      their input's gradient instead of adding into it (llm.c's CUDA contract).
    sums_bias_grads: layernorm's and GELU's backwards take `dsums=` and sum into it the gradient
      they leave, which is the next matmul's dout: that matmul's bias gradient.
    master_weights: the params are in a lower precision; `Backend.master_weights(params)` makes
      a float32 copy, which `adamw_update(..., master=)` updates and rounds into the params.
    host_arrays: its arrays are NumPy arrays in host memory, which code on the host (the
      models' KV-cache decoders) can index and pass to its ops."""
    fused: bool = False
    writes_activation_grads: bool = False
    sums_bias_grads: bool = False
    master_weights: bool = False
    host_arrays: bool = True


class Backend:
    """One backend instance: the ops of `module`, and the declared rest.
    zeros(n, dtype=None): a flat (n,) buffer in the compute dtype, or float32 when dtype is
      np.float32; to_device(x) / to_host(x): host arrays in, NumPy arrays out.
    peak_flops(): the device's peak FLOP/s in the compute dtype, or None (no MFU then).
    available_memory(): the bytes the device has for this process's buffers, or None.
    master_weights(params): only where caps.master_weights."""

    def __init__(self, name, module, *, zeros, to_device, to_host, caps=Capabilities(),
                 dtype=None, peak_flops=None, available_memory=None, master_weights=None,
                 ops=OPS):
        missing = [op for op in ops if not callable(getattr(module, op, None))]
        if missing:
            raise TypeError(f"backend {name!r} lacks {', '.join(missing)}")
        if caps.master_weights != (master_weights is not None):
            raise TypeError(f"backend {name!r}: caps.master_weights needs master_weights=")
        for op in ops:
            setattr(self, op, getattr(module, op))
        self.ops = tuple(ops)
        self.name, self.caps, self.dtype = name, caps, dtype
        self.zeros, self.to_device, self.to_host = zeros, to_device, to_host
        self._peak_flops, self._available_memory = peak_flops, available_memory
        self._master_weights = master_weights

    def peak_flops(self):
        return self._peak_flops() if self._peak_flops else None

    def available_memory(self):
        return self._available_memory() if self._available_memory else None

    def master_weights(self, params):
        return self._master_weights(params)

    def wrapped(self, wrap):
        """A copy of this backend whose every op is wrap(op name, op): a benchmark's timer."""
        new = copy.copy(self)
        for op in self.ops:
            setattr(new, op, wrap(op, getattr(self, op)))
        return new

    def __repr__(self):
        return f"<backend {self.name}{f' {self.dtype}' if self.dtype else ''}>"
