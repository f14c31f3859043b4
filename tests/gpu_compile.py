"""Compile every Triton kernel of the gpu backend for an H100 (sm_90), without a GPU, as GPT-2
124M trains in bf16: the launch constants the backend uses on a GPU and every autotune config
of every tuned kernel. Catches what Triton's interpreter cannot: block shapes a GPU refuses,
dtype mixes the GPU compiler rejects, shared memory beyond the H100's 227 KB, and bf16 tensors
streamed with scalar loads.

Also checks that no kernel argument takes a name that Triton's argument binder uses for itself:
such a kernel fails at every launch on a GPU, yet runs in the interpreter (adamw's `params` did).

Run by tests/test_gpu.py in a subprocess: the kernels must be imported without
TRITON_INTERPRET (which would make them interpreted functions) and as if a GPU were there (so
that the GPU's launch sizes and configs are chosen); nothing is launched.
Prints one line per compile and exits 1 if any fails."""
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402

torch.cuda.is_available = lambda: True          # the GPU's launch sizes; nothing runs
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from llmpy.backends.gpu import adamw, attention, classifier, encoder, gelu, layernorm  # noqa: E402
from llmpy.backends.gpu.launch import ELEMENTS, ROWS, SPAN  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024                      # an H100's most per block
C, V, HS = 768, 50257, 64                       # GPT-2 124M
P, F, I, X = "*bf16", "*fp32", "*i64", "i32"    # bf16 / float32 / token pointers, an int


def kernels():
    """(kernel, {argument: type}, {constexpr: value}, num_warps), for every launch."""
    head = dict(HS=HS, HS_PAD=HS, PREC="tf32")
    for residual in (False, True):
        for config in layernorm._layernorm_forward_kernel.configs:
            yield (layernorm._layernorm_forward_kernel,
                   dict(out=P, mean=F, rstd=F, inp=P, weight=P, bias=P, residual=P, inp2=P, N=X,
                        C=X, eps="fp32"),
                   dict(RESIDUAL=residual, BLOCK_C=triton.next_power_of_2(C), **config.kwargs),
                   config.num_warps, config.num_stages)
    for sums in (False, True):                  # (layer 0's ln1 has no bias to sum for)
        for config in layernorm._layernorm_backward_kernel.configs:
            yield (layernorm._layernorm_backward_kernel,
                   dict(dinp=P, dw_part=F, db_part=F, ds_part=F, dout=P, inp=P, weight=P, mean=F,
                        rstd=F, N=X, C=X),
                   dict(SUMS=sums, SPAN=SPAN, BLOCK_C=triton.next_power_of_2(C),
                        **config.kwargs), config.num_warps, config.num_stages)
    yield (encoder._encoder_forward_kernel, dict(out=P, inp=I, wte=P, wpe=P, N=X, T=X, C=X),
           dict(ROWS=ROWS, BLOCK_C=triton.next_power_of_2(C)), 4, 3)
    yield (encoder._wte_backward_kernel, dict(dwte=P, dout=P, ids=I, rows=I, N=X, C=X),
           dict(SEG=16, BLOCK_C=min(triton.next_power_of_2(C), 256)), 4, 3)
    yield (encoder._wpe_backward_kernel, dict(dwpe=P, dout=P, B=X, T=X, C=X),
           dict(ROWS=ROWS, BLOCK_C=triton.next_power_of_2(C)), 4, 3)
    for config in gelu._gelu_forward_kernel.configs:
        yield (gelu._gelu_forward_kernel, dict(out=P, inp=P, N=X), config.kwargs,
               config.num_warps, config.num_stages)
    for sums in (False, True):
        for config in gelu._gelu_backward_kernel.configs:
            yield (gelu._gelu_backward_kernel,
                   dict(dinp=P, ds_part=F, inp=P, dout=P, N=X, C=X),
                   dict(SUMS=sums, SPAN=SPAN, **config.kwargs), config.num_warps,
                   config.num_stages)
    types = dict(losses=F, lse=F, logits=P, targets=I, N=X, V=X, Vp=X)
    for config in classifier._classifier_forward_kernel.configs:
        yield (classifier._classifier_forward_kernel, types, dict(ROWS=ROWS, **config.kwargs),
               config.num_warps, config.num_stages)
    yield (classifier._classifier_backward_kernel,
           dict(dlogits=P, dlosses=F, logits=P, lse=F, targets=I, N=X, V=X, Vp=X),
           dict(ROWS=ROWS, BLOCK=classifier.BACKWARD_BLOCK), 8, 3)
    scalars = {k: "fp32" for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "bc1",
                                    "bc2_sqrt", "grad_scale")}
    yield (adamw._adamw_kernel, dict(weights=P, grads=P, m=F, v=F, master=F, N=X, **scalars),
           dict(HAS_MASTER=True, BLOCK=ELEMENTS), 4, 3)
    yield (adamw._sum_squares_kernel, dict(partials=F, x=P, N=X), dict(BLOCK=ELEMENTS), 4, 3)
    for config in attention._attention_forward_kernel.configs:
        yield (attention._attention_forward_kernel,
               dict(out=P, lse=F, qkv=P, T=X, NH=X, C=X, qk_scale="fp32"),
               {**head, **config.kwargs}, config.num_warps, config.num_stages)
    backward = dict(dout=P, qkv=P, lse=F, delta=F, T=X, NH=X, C=X, qk_scale="fp32",
                    scale="fp32")
    for kernel, types in ((attention._attention_dq_kernel, dict(dinp=P, out=P, **backward)),
                          (attention._attention_dkdv_kernel, dict(dinp=P, **backward))):
        for config in kernel.configs:
            yield kernel, types, {**head, **config.kwargs}, config.num_warps, config.num_stages


def jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


# The integer arguments that are multiples of 16 at GPT-2 124M, B=64, T=1024 (rows, channels,
# Vp, T; not V = 50257 nor NH = 12): Triton specializes such an argument at launch, and its
# loads and stores can then be vectors.
DIVISIBLE = {"N", "C", "Vp", "T"}
# Kernels that stream bf16 tensors: their loads must be vectors. A scalar 2-byte load
# (ld.global.b16) is allowed only for single values (the classifier's target logit): one masked
# at a bound that is not a multiple of 16 (the real V) loads each element on its own, at ~60%
# of the memory's speed (the classifier's forward did, before 2026-11-27).
SCALAR_LOADS = {"_layernorm_forward_kernel": 0, "_layernorm_backward_kernel": 0,
                "_gelu_forward_kernel": 0, "_gelu_backward_kernel": 0,
                "_classifier_forward_kernel": 1, "_classifier_backward_kernel": 0,
                "_adamw_kernel": 0}


def compile_one(kernel, types, constants, num_warps, num_stages):
    fn = jit_function(kernel)
    signature = {name: "constexpr" if name in constants else types[name]
                 for name in fn.arg_names}
    # pointers 16-byte aligned, as torch allocates them
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in DIVISIBLE}
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    if compiled.metadata.shared > SHARED_MEMORY:
        raise ValueError(f"{compiled.metadata.shared} bytes of shared memory")
    scalar = compiled.asm["ptx"].count("ld.global.b16")
    if scalar > SCALAR_LOADS.get(fn.__name__, scalar):
        raise ValueError(f"{scalar} scalar bf16 loads (ld.global.b16), "
                         f"{SCALAR_LOADS[fn.__name__]} allowed")


@triton.jit
def _probe(x):
    pass


def binder_names():
    """The names of the function Triton generates to bind a kernel's arguments at each GPU
    launch, its arguments aside (options, params, specialization, backend, ...)."""
    code = create_function_from_signature(_probe.signature, _probe.params, None).__code__
    return (set(code.co_varnames) | set(code.co_names)) - set(_probe.arg_names)


def main():
    failed, seen, reserved = 0, set(), binder_names()
    for kernel, types, constants, num_warps, num_stages in kernels():
        name = jit_function(kernel).__name__
        if name not in seen and reserved & set(jit_function(kernel).arg_names):
            failed += 1
            print(f"{name}: FAILED: arguments named as Triton's binder's own "
                  f"{sorted(reserved & set(jit_function(kernel).arg_names))}")
        seen.add(name)
        t0 = time.perf_counter()
        try:
            compile_one(kernel, types, constants, num_warps, num_stages)
            status = "ok"
        except Exception as e:                  # noqa: BLE001 (each failure is reported)
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{name} {constants} warps={num_warps} stages={num_stages}: {status} "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
    every = {name for module in (adamw, attention, classifier, encoder, gelu, layernorm)
             for name in dir(module) if name.endswith("_kernel")}
    for name in sorted(every - seen):
        failed += 1
        print(f"{name}: FAILED: not compiled here (add it to kernels())")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
