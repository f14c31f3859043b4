"""llm.c's debug state (gpt2_124M_debug_state.bin) and `test-model`, the counterpart of llm.c's
test_gpt2.c: one batch, the reference's logits, loss and gradients, checked tensor by tensor.

File: a 256 x int32 header (magic 20240327, version 2, B at [2], T at [3]), then
x int32[B*T], y int32[B*T], logits float32[B*T*V] (V unpadded), loss float32[1], and the
gradients of all parameters as float32 in the model file's layout (wte padded to Vp rows, with
zero rows), as llm.c's train_gpt2.py writes it.
"""
import os
from dataclasses import dataclass

import numpy as np

from .io.modelfile import num_params, read_model
from .train.config import check_seq_len
from .data.loader import DataLoader, bundled_data
from .errors import LlmpyError
from .io.files import (HEADER_BYTES, atomic_write, check_output_file, file_size, make_header,
                       read_header)

STATE_MAGIC = 20240327
STATE_VERSION = 2
# test-model's tolerance, on max|ours - ref| / max|ref| per tensor (and |d loss| / loss).
# Both sides compute in float32, summing in different orders: measured errors are ~1e-6
# (see tests/test_interop.py); 1e-4 leaves room for BLAS differences but not for a bug.
TOL = 1e-4
# test-model's AdamW steps, as llm.c's test_gpt2.c makes them; a llama3 debug state holds the
# reference's losses and gradient norms of STATE_STEPS of them
LR, WEIGHT_DECAY, STATE_STEPS = 1e-4, 0.01, 10


@dataclass
class DebugState:
    x: np.ndarray          # (B,T) int32 inputs
    y: np.ndarray          # (B,T) int32 targets
    logits: np.ndarray     # (B,T,V) float32
    loss: float
    grads: np.ndarray      # (num_params,) float32, the model file's layout


def read_debug_state(path, cfg):
    """The debug state for a model of config cfg (its V and parameter count size the file)."""
    h = read_header(path, STATE_MAGIC, (STATE_VERSION,), "debug state")
    B, T, V, N = int(h[2]), int(h[3]), cfg.vocab_size, num_params(cfg)
    if B < 1 or not 1 <= T <= cfg.max_seq_len:
        raise LlmpyError(f"{path}: debug state header has B={B} T={T}; need B >= 1 and "
                         f"1 <= T <= the model's max_seq_len {cfg.max_seq_len}")
    state, _ = read_state_body(path, B, T, V, N, "debug state",
                               f"B={B} T={T} and this model's V={V} and {N:,} parameters")
    return state


def read_state_body(path, B, T, V, N, kind, sizes, extra=0):
    """What follows the header in llm.c's debug states (GPT-2's and llama3's): x, y int32
    (B,T), logits float32 (B,T,V), loss float32, N gradients float32, then `extra` float32s
    (llama3's per-step losses and norms). Returns (DebugState, the extra floats); one line for
    a file of another length (sizes: what sized it, for the message) or an id out of range."""
    expected = HEADER_BYTES + 4 * (2 * B * T + B * T * V + 1 + N + extra)
    size = file_size(path)
    if size != expected:
        what = "truncated" if size < expected else "too long"
        raise LlmpyError(f"{path}: {kind} {what}: {size} bytes, expected {expected} for {sizes}")
    with open(path, "rb") as f:
        f.seek(HEADER_BYTES)
        x = np.fromfile(f, "<i4", B * T).reshape(B, T)
        y = np.fromfile(f, "<i4", B * T).reshape(B, T)
        logits = np.fromfile(f, "<f4", B * T * V).reshape(B, T, V)
        loss = float(np.fromfile(f, "<f4", 1)[0])
        grads = np.fromfile(f, "<f4", N)
        tail = np.fromfile(f, "<f4", extra)
    for what, t in (("input", x), ("target", y)):
        if t.min() < 0 or t.max() >= V:
            raise LlmpyError(f"{path}: {what} token id {int(t[(t < 0) | (t >= V)][0])} is out of "
                             f"range for the model's vocab size {V}")
    return DebugState(x, y, logits, loss, grads), tail


def write_debug_state(path, state):
    B, T = state.x.shape
    atomic_write(path, [make_header(STATE_MAGIC, STATE_VERSION, B, T),
                        state.x.astype("<i4"), state.y.astype("<i4"),
                        state.logits.astype("<f4"), np.array([state.loss], "<f4"),
                        state.grads.astype("<f4")])


def _torchref(what, module="steps"):
    """The PyTorch reference (torchref.steps for GPT-2, torchref.llama for the decoder, which
    is transformers' own model), imported only by the commands that need it."""
    try:
        import importlib
        return importlib.import_module(f"torchref.{module}")
    except ImportError as e:
        raise LlmpyError(f"{what} needs the PyTorch reference ({e}): "
                         "pip install 'llmpy[test]'") from None


def default_out(model_path):
    """gpt2_124M.bin -> gpt2_124M_debug_state.bin, as llm.c names the pair."""
    return os.path.splitext(model_path)[0] + "_debug_state.bin"


def is_llama_file(path):
    """Whether path starts with llm.c's llama3 magic (else it is read as GPT-2's)."""
    from .io.llama3 import LLAMA_MAGIC
    try:
        return np.fromfile(path, dtype="<i4", count=1).tolist() == [LLAMA_MAGIC]
    except OSError:
        return False


def make_debug_state(model_path, data_path, B, T, out):
    """Run the PyTorch reference on the first batch of data_path and write the debug state:
    GPT-2's (torchref's nanoGPT-style model), or for a llama3 .bin llm.c's llama3 debug state
    (transformers' LlamaForCausalLM in float32), with the losses and gradient norms of
    STATE_STEPS AdamW steps (test-model's lr and weight decay) on that batch."""
    check_output_file(out)                # before the reference runs, which may take minutes
    llama = is_llama_file(model_path)
    steps = _torchref("writing a debug state", "llama" if llama else "steps")
    if llama:
        from .io.llama3 import read_llama_model
        cfg, params, _ = read_llama_model(model_path)
    else:
        cfg, params = read_model(model_path)
    check_seq_len(T, cfg, "-t")
    x, y = DataLoader(data_path or bundled_data("shakespeare_val.bin"), B, T,
                      cfg.vocab_size).next_batch()
    logits, loss, grads = steps.forward_backward(cfg, params, x, y)
    if llama:
        from .io.llama3 import LlamaDebugState, write_llama_debug_state
        losses, norms = steps.adamw_history(cfg, params, x, y, STATE_STEPS, LR, WEIGHT_DECAY)
        write_llama_debug_state(out, cfg, LlamaDebugState(x, y, logits, loss, grads, losses,
                                                          norms))
    else:
        write_debug_state(out, DebugState(x, y, logits, loss, grads))
    print(f"wrote {out}: B={B} T={T}, reference loss {loss:.6f}"
          + (f", {STATE_STEPS} AdamW steps to loss {losses[-1]:.6f}" if llama else ""))


# ----------------------------------------------------------------------------- test-model

def compare(name, ours, ref, tol=TOL, note=""):
    """Prints one row; returns whether max|ours - ref| / max|ref| <= tol."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    err = float(np.abs(ours - ref).max())
    scale = float(np.abs(ref).max())
    rel = err / scale if scale else (0.0 if err == 0 else np.inf)
    ok = rel <= tol
    print(f"{name:<12} {err:12.3e} {rel:12.3e}  {'OK' if ok else 'FAIL':<4}  {note}".rstrip())
    return ok


def check_model(model_path, state_path, backend, steps=10, lr=LR, weight_decay=WEIGHT_DECAY,
                tol=TOL):
    """llm.c's test_gpt2: forward/backward on the stored batch vs the debug state, then `steps`
    AdamW updates vs the reference's losses: the PyTorch reference's, run now, for GPT-2; for a
    llama3 .bin the losses and gradient norms the llama3 debug state holds (llm.c's
    test_llama3). Raises LlmpyError if anything is off."""
    from .train.optim import AdamW, AdamWConfig
    from .train.step import train_step
    from .model.build import build_model
    model = build_model(model_path, backend)
    cfg, V = model.config, model.config.vocab_size
    llama = is_llama_file(model_path)
    ref_norms = []
    if llama:
        from .io.llama3 import read_llama_debug_state
        state = read_llama_debug_state(state_path, cfg)
        ref_losses, ref_norms = state.losses[:steps].tolist(), state.norms[:steps].tolist()
    else:
        state = read_debug_state(state_path, cfg)
        ref_losses = []
        if steps:
            torchref = _torchref("checking AdamW steps (--steps 0 skips them)")
            params = backend.to_host(model.params.buf).copy()                  # (num_params,)
            ref_losses = torchref.adamw_losses(cfg, params, state.x, state.y, steps, lr,
                                               weight_decay)
    B, T = state.x.shape
    print(f"model {model_path}: L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} V={V} "
          f"| debug state {state_path}: B={B} T={T} | backend {backend.name}")
    if llama and steps > len(ref_losses):
        print(f"the debug state holds {len(ref_losses)} AdamW steps: comparing those")
    print(f"OK when max|ours - ref| / max|ref| <= {tol:g} per tensor")
    print(f"{'tensor':<12} {'max abs err':>12} {'max rel err':>12}  result")
    opt = AdamW(model, AdamWConfig(lr=lr, weight_decay=weight_decay))
    results = []
    loss = model.forward(state.x, state.y)
    # a copy: the gpu backend's backward writes dlogits over them
    logits = backend.to_host(model.acts.logits)[..., :V].copy()
    model.zero_grad()
    model.backward()
    results.append(compare("logits", logits, state.logits, tol))
    results.append(compare("loss", loss, state.loss, tol))
    grads = backend.to_host(model.grads.buf)
    o = 0
    for name, shape in model.params.shapes.items():
        n = int(np.prod(shape))
        results.append(compare("d" + name, grads[o:o + n], state.grads[o:o + n], tol))
        o += n
    for step, ref in enumerate(ref_losses):     # the first redoes the pass checked above
        result = train_step(model, opt, [(state.x, state.y)], step=step)
        loss = result.loss
        if ref_norms:
            results.append(compare(f"norm {step}", result.norm, ref_norms[step], tol,
                                   f"grad norm {result.norm:.6f}, reference "
                                   f"{ref_norms[step]:.6f}"))
        results.append(compare(f"step {step}", loss, ref, tol,
                               f"loss {loss:.6f}, reference {ref:.6f}"))
    failed = results.count(False)
    print(f"overall: {'OK' if not failed else 'FAIL'} ({len(results) - failed}/{len(results)} OK)")
    if failed:
        raise LlmpyError(f"{state_path}: FAIL: {failed} of {len(results)} checks out of "
                         f"tolerance {tol:g}")
