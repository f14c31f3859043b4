"""How the kernels are launched: rows and elements per program, the autotuning candidates and
their cache, on a GPU and in Triton's CPU interpreter (TRITON_INTERPRET=1, which runs the
kernels when there is no GPU and cannot time them), and a fix for the interpreter."""
import torch
import triton
from triton.runtime import interpreter

# Rows per program for the encoder and the classifier, and layernorm's in the interpreter: one on
# a GPU (a row of 768 already fills the warps; layernorm's are tuned there); many in the
# interpreter, whose cost is per program and per operation, not per element.
ROWS = 1 if torch.cuda.is_available() else 16
# Elements per program for the elementwise kernels.
ELEMENTS = 1024 if torch.cuda.is_available() else 16384
# Rows per program of the backward kernels that also sum over rows (layernorm's weight and bias
# gradients, GELU's column sums): enough programs to fill the GPU many times over (latency is
# hidden by other programs, not within one), few enough that their float32 partial sums, one
# row of them per program, stay small. The interpreter's ROWS divides it.
SPAN = 32 if torch.cuda.is_available() else 4 * ROWS


def configs(cuda_configs, interpreter_config):
    """Autotune candidates, (constexprs, num_warps, num_stages) each, timed on a GPU on first
    use; in the interpreter, which cannot time them, the one config that suits it."""
    if not torch.cuda.is_available():
        return [triton.Config(interpreter_config)]
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in cuda_configs]


# Each choice is kept in Triton's cache directory: later runs on the machine skip the timing and
# run the same kernels. Configs that sum in another order round differently, so without this a
# resumed run could pick others than the run it resumes, and not continue it bit for bit.
CACHED = dict(cache_results=True)


def tuning(*key, least=8192):
    """Autotuning per (N, *key) for a kernel over N rows or elements: an N under `least` (the
    tests' shapes) takes the last config without comparing, as that would only cost compiles
    (Triton still runs its timing on it once, alone). See CACHED."""
    def prune(candidates, named_args, **kwargs):
        return candidates if named_args["N"] >= least else candidates[-1:]
    return dict(key=["N", *key], prune_configs_by={"early_config_prune": prune}, **CACHED)


def fix_loop_bounds():
    """The interpreter keeps every scalar as a 1-element array and makes a Python int of it with
    int(array), which NumPy >= 2.4 refuses for arrays of ndim > 0: `for i in range(lo, hi)`
    with run-time bounds fails. This converts with .item() instead."""
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fixed = True
    interpreter._patch_lang_tensor = patched
