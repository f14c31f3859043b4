"""Compile every Triton kernel of the gpu backend for an H100 (sm_90), without a GPU, as GPT-2
124M trains in bf16, and the decoder's kernels as Llama-3.2-1B and Gemma-3-270M (a head size of
256, one kv head) train in `llmpy bench gpu` (bench/gpu_session.sh; tests/test_bench.py checks
that its models are these): the launch constants the backend uses on a GPU and every autotune
config of every tuned kernel (of flash attention, those its pruning keeps for the head size).
Catches what Triton's interpreter cannot: block shapes a GPU refuses, dtype mixes the GPU
compiler rejects, shared memory beyond the H100's 227 KB, and bf16 tensors streamed with scalar
loads. Flash attention's lines also give the registers a thread and the stack (registers
spilled) that ptxas gave each config: what a GPU session should look at first.

Also checks that no kernel argument takes a name that Triton's argument binder uses for itself:
such a kernel fails at every launch on a GPU, yet runs in the interpreter (adamw's `params` did).

Run by tests/test_gpu.py in a subprocess: the kernels must be imported without
TRITON_INTERPRET (which would make them interpreted functions) and as if a GPU were there (so
that the GPU's launch sizes and configs are chosen); nothing is launched.
Prints one line per compile and exits 1 if any fails."""
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
import torch  # noqa: E402

torch.cuda.is_available = lambda: True          # the GPU's launch sizes; nothing runs
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from llmpy.backends.gpu import (adamw, attention, classifier, embedding,  # noqa: E402
                                encoder, gelu, glu, layernorm, rmsnorm, rope, softcap)
from llmpy.backends.gpu.launch import ELEMENTS, ROWS, SPAN  # noqa: E402
from llmpy.model import llama  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_MEMORY = 227 * 1024                      # an H100's most per block
C, V, HS = 768, 50257, 64                       # GPT-2 124M
P, F, I, X = "*bf16", "*fp32", "*i64", "i32"    # bf16 / float32 / token pointers, an int
# The decoders that bench/gpu_session.sh trains with `llmpy bench gpu`, at its T, built from
# the same presets: their kernels as those models launch them (each kind of layer's attention,
# QK-norm's heads, the activation, the softcaps); and Gemma 2's softcaps, which neither has, at
# Gemma 3's shape (Gemma 2 has no QK-norm, and a window on every other layer: here on all).
BENCH_T = 2048
GEMMA3 = llama.preset("gemma3-270m")
DECODERS = {"llama-3.2-1b": llama.preset("llama-3.2-1b"), "gemma3-270m": GEMMA3,
            "gemma-2 softcaps": dataclasses.replace(GEMMA3, attn_softcap=50.0,
                                                    final_softcap=30.0, qk_norm=False,
                                                    layer_types=("sliding",) * 18)}

def kernels():
    """(kernel, {argument: type}, {constexpr: value}, num_warps), for every launch."""
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
    yield (encoder._wte_backward_kernel,
           dict(dwte=P, dout=P, ids=I, rows=I, N=X, C=X, scale="fp32"),
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
    yield from classifier_kernels(False)
    scalars = {k: "fp32" for k in ("lr", "beta1", "beta2", "eps", "weight_decay", "bc1",
                                    "bc2_sqrt", "grad_scale")}
    yield (adamw._adamw_kernel, dict(weights=P, grads=P, m=F, v=F, master=F, N=X, **scalars),
           dict(HAS_MASTER=True, BLOCK=ELEMENTS), 4, 3)
    yield (adamw._sum_squares_kernel, dict(partials=F, x=P, N=X), dict(BLOCK=ELEMENTS), 4, 3)
    yield from attention_kernels(HS, 1, False, False, False, 1024)


def classifier_kernels(softcap):
    types = dict(losses=F, lse=F, logits=P, targets=I, N=X, V=X, Vp=X, softcap="fp32")
    for config in classifier._classifier_forward_kernel.configs:
        yield (classifier._classifier_forward_kernel, types,
               dict(SOFTCAP=softcap, ROWS=ROWS, **config.kwargs), config.num_warps,
               config.num_stages)
    yield (classifier._classifier_backward_kernel,
           dict(dlogits=P, dlosses=F, logits=P, lse=F, targets=I, N=X, V=X, Vp=X,
                softcap="fp32"),
           dict(SOFTCAP=softcap, ROWS=ROWS, BLOCK=classifier.BACKWARD_BLOCK), 8, 3)


def attention_kernels(hs, heads, grouped, softcap, window, T):
    """Flash attention's three kernels, each config that its autotuning keeps at this head size
    in bf16 (its own pruning, at a length that compares them all)."""
    variant = dict(HS=hs, HS_PAD=hs, SOFTCAP=softcap, WINDOW=window, PREC="tf32")
    scalars = dict(T=X, NH=X, NKV=X, qk_scale="fp32", cap2="fp32", window=X)
    backward = dict(dout=P, qkv=P, lse=F, delta=F, scale="fp32", **scalars)
    for kernel, types, packed in (
            (attention._attention_forward_kernel, dict(out=P, lse=F, qkv=P, **scalars), True),
            (attention._attention_dq_kernel, dict(dinp=P, out=P, **backward), True),
            (attention._attention_dkdv_kernel, dict(dinp=P, **backward), False)):
        args = dict(qkv=torch.empty(0, dtype=torch.bfloat16), T=T)
        constants = dict(variant, **(dict(HEADS=heads) if packed else dict(GROUPED=grouped)))
        for config in kernel.early_config_prune(kernel.configs, args, **constants):
            yield kernel, types, {**constants, **config.kwargs}, config.num_warps, \
                config.num_stages


def decoder_kernels(cfg, T):
    """The decoder's kernels as model.llama.Llama launches them for cfg at length T (the sizes
    it does not name here only set which arguments are multiples of 16, decoder_divisible)."""
    C, NH, NKV, HS = cfg.channels, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    strides = ("x_outer", "x_inner", "y_outer", "y_inner", "dx_outer", "dx_inner", "dy_outer",
               "dy_inner")
    # (width, heads): whole rows (H = 1, which Triton specializes), and with QK-norm the heads
    # of q and of k inside the packed qkv rows (one kv head is whole rows again)
    norms = [(C, 1)] + ([(HS, NH), (HS, NKV)] if cfg.qk_norm else [])
    for width, heads in dict.fromkeys(norms):
        H = dict(H=1) if heads == 1 else dict()
        types = dict(dict.fromkeys(strides, X), H=X, N=X, C=X, eps="fp32", offset="fp32")
        block = triton.next_power_of_2(width)
        narrow = rmsnorm._rmsnorm_forward_kernel.early_config_prune(
            [], dict(N=1 << 20), BLOCK_C=block)         # its own candidates where narrow
        for residual in (False, True) if width == C else (False,):
            for config in narrow or rmsnorm._rmsnorm_forward_kernel.configs:
                yield (rmsnorm._rmsnorm_forward_kernel,
                       dict(out=P, rstd=F, inp=P, weight=P, residual=P, inp2=P, **types),
                       dict(RESIDUAL=residual, BLOCK_C=block, **H, **config.kwargs),
                       config.num_warps, config.num_stages)
        for config in narrow or rmsnorm._rmsnorm_backward_kernel.configs:
            yield (rmsnorm._rmsnorm_backward_kernel,
                   dict(dinp=P, dw_part=F, dout=P, inp=P, weight=P, rstd=F, **types),
                   dict(SPAN=SPAN, BLOCK_C=block, **H, **config.kwargs), config.num_warps,
                   config.num_stages)
    for kernel, types in ((glu._glu_forward_kernel, dict(out=P, inp=P, N=X, F=X)),
                          (glu._glu_backward_kernel, dict(dinp=P, dout=P, inp=P, N=X, F=X))):
        for config in kernel.configs:
            yield kernel, types, dict(GELU=cfg.mlp_act == "gelu_tanh", **config.kwargs), \
                config.num_warps, config.num_stages
    strides = {name: X for name in ("o_b", "o_t", "o_h", "i_b", "i_t", "i_h")}
    # the heads turned in one launch: q's and k's together, or each after its QK-norm
    for heads in dict.fromkeys((NH, NKV) if cfg.qk_norm else (NH + NKV,)):
        block = triton.next_power_of_2(heads)
        for add in (False, True):                   # forward, backward
            yield (rope._rope_kernel,
                   dict(out=P, inp=P, cos=P, sin=P, T=X, H=X, half=X, sign="fp32", **strides),
                   dict(ADD=add, BLOCK_H=block, BLOCK_D=HS // 2,
                        **(dict(H=1) if heads == 1 else dict())), rope.warps(block, HS // 2), 3)
    yield (embedding._embedding_forward_kernel,
           dict(out=P, inp=I, wte=P, N=X, C=X, scale="fp32"),
           dict(ROWS=ROWS, BLOCK_C=triton.next_power_of_2(C)), 4, 3)
    yield (softcap._softcap_forward_kernel, dict(out=P, inp=P, N=X, cap="fp32"),
           dict(BLOCK=ELEMENTS), 4, 3)
    yield (softcap._softcap_backward_kernel, dict(dinp=P, dout=P, out=P, N=X, cap="fp32"),
           dict(BLOCK=ELEMENTS), 4, 3)
    yield from classifier_kernels(cfg.final_softcap > 0)
    G = NH // NKV
    # one variant per kind of layer: a window shorter than T masks, a longer one does not
    variants = {(cfg.attn_softcap > 0, 0 < cfg.window(l) < T) for l in range(cfg.num_layers)}
    for capped, windowed in sorted(variants):
        yield from attention_kernels(HS, min(G & -G, 8), G > 1, capped, windowed, T)


def jit_function(kernel):
    return kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel


# The integer arguments that are multiples of 16 at GPT-2 124M, B=64, T=1024 (rows, channels,
# Vp, T; not V = 50257 nor NH = 12): Triton specializes such an argument at launch, and its
# loads and stores can then be vectors.
DIVISIBLE = {"N", "C", "Vp", "T"}


def decoder_divisible(cfg, T):
    """DIVISIBLE at a decoder's shape: the rows (a multiple of 16 as GPT-2's), and each integer
    argument whose value there is a multiple of 16. RoPE's and RMSNorm's strides are multiples
    of the head size (or C, or 0); a window is 0 or the model's."""
    HS = cfg.head_dim
    values = dict(C=cfg.channels, NH=cfg.num_heads, NKV=cfg.num_kv_heads, F=cfg.ffn_dim,
                  V=cfg.vocab_size, Vp=cfg.padded_vocab_size, T=T, half=HS // 2,
                  window=cfg.sliding_window,
                  H=cfg.num_heads if cfg.qk_norm else cfg.num_heads + cfg.num_kv_heads,
                  **dict.fromkeys(("o_b", "o_t", "o_h", "i_b", "i_t", "i_h"), HS),
                  **dict.fromkeys(("x_outer", "x_inner", "y_outer", "y_inner", "dx_outer",
                                   "dx_inner", "dy_outer", "dy_inner"), HS))
    return {"N"} | {name for name, value in values.items() if value % 16 == 0}
# Kernels that stream bf16 tensors: their loads must be vectors. A scalar 2-byte load
# (ld.global.b16) is allowed only for single values (the classifier's target logit): one masked
# at a bound that is not a multiple of 16 (the real V) loads each element on its own, at ~60%
# of the memory's speed (the classifier's forward did, before 2026-11-27).
SCALAR_LOADS = {"_layernorm_forward_kernel": 0, "_layernorm_backward_kernel": 0,
                "_gelu_forward_kernel": 0, "_gelu_backward_kernel": 0,
                "_classifier_forward_kernel": 1, "_classifier_backward_kernel": 0,
                "_adamw_kernel": 0, "_rmsnorm_forward_kernel": 0, "_rmsnorm_backward_kernel": 0,
                "_glu_forward_kernel": 0, "_glu_backward_kernel": 0,
                "_softcap_forward_kernel": 0, "_softcap_backward_kernel": 0,
                # cos and sin: a row each per program, for all its heads (one value a thread
                # where the half head is as wide as the program's threads, Gemma's 128)
                "_rope_kernel": 2}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                         "cuobjdump")


def compile_one(kernel, types, constants, num_warps, num_stages, divisible):
    """Compiles; raises on what a GPU would refuse or run slowly; returns the compiled kernel."""
    fn = jit_function(kernel)
    signature = {name: "constexpr" if name in constants else types[name]
                 for name in fn.arg_names}
    # pointers 16-byte aligned, as torch allocates them
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name in divisible}
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs), target=TARGET,
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    if compiled.metadata.shared > SHARED_MEMORY:
        raise ValueError(f"{compiled.metadata.shared} bytes of shared memory")
    scalar = compiled.asm["ptx"].count("ld.global.b16")
    if scalar > SCALAR_LOADS.get(fn.__name__, scalar):
        raise ValueError(f"{scalar} scalar bf16 loads (ld.global.b16), "
                         f"{SCALAR_LOADS[fn.__name__]} allowed")
    return compiled


def registers(compiled):
    """ptxas's registers a thread and stack (spilled registers) for a compiled kernel, as text."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(item.split(":", 1) for line in usage.splitlines() if "REG:" in line
                  for item in line.split())
    return f"registers={fields['REG']} stack={fields['STACK']} bytes"


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
    shapes = [("gpt2-124m", kernels(), DIVISIBLE)] + [
        (model, decoder_kernels(cfg, BENCH_T), decoder_divisible(cfg, BENCH_T))
        for model, cfg in DECODERS.items()]
    for model, kernel, types, constants, num_warps, num_stages, divisible in (
            (model, *launch, divisible) for model, launches, divisible in shapes
            for launch in launches):
        name = jit_function(kernel).__name__
        if name not in seen and reserved & set(jit_function(kernel).arg_names):
            failed += 1
            print(f"{name}: FAILED: arguments named as Triton's binder's own "
                  f"{sorted(reserved & set(jit_function(kernel).arg_names))}")
        seen.add(name)
        t0 = time.perf_counter()
        usage = ""                              # registers, for flash attention
        try:
            compiled = compile_one(kernel, types, constants, num_warps, num_stages, divisible)
            status = "ok"
            if name.startswith("_attention"):
                usage = f" {registers(compiled)}"
        except Exception as e:                  # noqa: BLE001 (each failure is reported)
            failed += 1
            status = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"{name} {model} {constants} warps={num_warps} stages={num_stages}: {status} "
              f"({time.perf_counter() - t0:.1f} s){usage}", flush=True)
    every = {name for module in (adamw, attention, classifier, embedding, encoder, gelu, glu,
                                 layernorm, rmsnorm, rope, softcap)
             for name in dir(module) if name.endswith("_kernel")}
    for name in sorted(every - seen):
        failed += 1
        print(f"{name}: FAILED: not compiled here (add it to kernels())")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
