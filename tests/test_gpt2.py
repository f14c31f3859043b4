"""The whole model against the PyTorch reference (torchref/gpt2.py) in float32: logits, loss,
all 16 gradient tensors, and 10 AdamW steps, on every backend.

Tolerance: max |ours - torch| / max |torch| <= 1e-5 per tensor (measured: below 1e-6 on the
numpy backend); losses to 1e-5 relative. Both sides sum in float32 in different orders, so
bit equality is not expected; 1e-5 is about 100 ulps of the largest value.
"""
import json
import struct
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from conftest import BACKENDS
from llmpy.model.layout import GPT2Config
from llmpy.model.build import preset
from llmpy.errors import LlmpyError
from llmpy.model.gpt2 import GPT2, flops_per_token, init_weights, load_params, param_shapes
from llmpy.train.optim import AdamW, AdamWConfig
from torchref.gpt2 import from_flat

TOL = 1e-5
# odd sizes, and a vocab (100) that is padded (to 128)
CFG = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=2, num_heads=3, channels=48)


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def random_weights(cfg, seed=0):
    """GPT-2 init plus noise, so that LayerNorm weights and biases are not just 1 and 0."""
    host = GPT2(cfg, BACKENDS[0])
    init_weights(host, seed)
    flat = host.params.buf + np.random.default_rng(seed).normal(0, 0.02, len(host.params))
    host.params.buf[:] = flat
    host.params.wte[cfg.vocab_size:] = 0
    return host.params.buf.copy()


def batch(cfg, B, T, seed=1):
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, T)), r.integers(0, cfg.vocab_size, (B, T))


def forward_backward_both(cfg, backend, flat, x, y):
    """One forward and backward of llmpy and of the PyTorch reference, from the same weights:
    (model, loss, our logits as the forward left them, reference, its logits, its loss)."""
    model = GPT2(cfg, backend)
    load_params(model, flat)
    loss = model.forward(x, y)
    ours = np.array(backend.to_host(model.acts.logits))   # a fused backward overwrites them
    model.zero_grad()
    model.backward()
    ref = from_flat(cfg, flat)
    logits, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    ref_loss.backward()
    return model, loss, ours, ref, logits, ref_loss


@pytest.fixture(params=BACKENDS, ids=lambda be: be.name)
def backend(request):
    return request.param


def test_forward_backward_matches_torch(backend):
    flat = random_weights(CFG)
    x, y = batch(CFG, 3, 11)
    model, loss, ours, ref, logits, ref_loss = forward_backward_both(CFG, backend, flat, x, y)
    V = CFG.vocab_size
    host = backend.to_host
    assert rel_err(ours[..., :V], logits.detach().numpy()) <= TOL
    assert abs(loss - ref_loss.item()) <= TOL * ref_loss.item()
    ref_grads = ref.flat(grads=True)
    o = 0
    for name, shape in param_shapes(CFG):
        n = int(np.prod(shape))
        ours = np.asarray(host(getattr(model.grads, name))).reshape(-1)
        assert rel_err(ours, ref_grads[o:o + n]) <= TOL, name
        o += n
    assert not np.asarray(host(model.grads.wte))[V:].any(), "padded rows get no gradient"


def test_targets_must_match_the_inputs(backend):
    # the cpu backend's cross-entropy would read past the end of shorter targets
    x, y = batch(CFG, 2, 5)
    with pytest.raises(LlmpyError, match=r"targets of shape \(2, 4\) for inputs of shape"):
        GPT2(CFG, backend).forward(x, y[:, :4])


def test_recompute_gelu_changes_nothing_but_memory(backend):
    """llm.c's -r 1: one layer's GELU output, recomputed in the backward pass, gives the same
    loss and gradients, bit for bit, with (L-1)*B*T*4C fewer activations."""
    flat = random_weights(CFG)
    B, T = 3, 11
    x, y = batch(CFG, B, T)
    models = GPT2(CFG, backend), GPT2(CFG, backend, recompute_gelu=True)
    losses = []
    for model in models:
        load_params(model, flat)
        losses.append(model.forward(x, y))
        model.zero_grad()
        model.backward()
    assert losses[0] == losses[1]
    plain, again = (np.asarray(backend.to_host(m.grads.buf)) for m in models)
    assert np.array_equal(plain, again)
    L, C = CFG.num_layers, CFG.channels
    assert len(models[0].acts) - len(models[1].acts) == (L - 1) * B * T * 4 * C


def test_flops_per_token_counts_the_step_s_products():
    """flops_per_token (MFU's numerator) against the products one forward and backward of the
    NumPy reference actually computes, counted from the shapes the model passes: 2 FLOPs per
    multiply-add, a matmul's backward twice its forward (dinp and dweight), attention's two
    (T,T) products likewise."""
    from llmpy.backends import numpy as ref
    flops = []

    def counted(name, count):
        def op(*args):
            flops.append(count(*args))
            return getattr(ref, name)(*args)
        return op

    mm = lambda out, inp, weight, *_: 2 * inp.size * weight.shape[0]  # noqa: E731
    att = lambda out, pre, a, inp: 2 * 2 * pre.size * out.shape[-1] // pre.shape[1]  # noqa: E731
    be = ref.make()                              # a fresh instance: its ops replaced below
    be.matmul_forward = counted("matmul_forward", mm)
    be.matmul_backward = counted("matmul_backward",
                                 lambda dinp, dw, db, dout, inp, w: 2 * mm(dout, inp, w))
    be.attention_forward = counted("attention_forward", att)
    be.attention_backward = counted("attention_backward",
                                    lambda dinp, dpre, da, dout, inp, a: 2 * att(dout, dpre, a, inp))
    B, T = 2, 7
    model = GPT2(CFG, be)
    model.forward(*batch(CFG, B, T))
    model.zero_grad()
    model.backward()
    assert sum(flops) == flops_per_token(CFG, T) * B * T


@pytest.mark.parametrize("recompute_gelu", [False, True])
def test_memory_plan_is_what_is_allocated(backend, recompute_gelu):
    """model.memory() and AdamW.state_bytes(), from shapes alone (train prints them), against
    the buffers a step allocates."""
    B, T = 2, 7
    model = GPT2(CFG, backend, recompute_gelu)
    opt = AdamW(model)
    plan = {**model.memory(B, T), "AdamW state": opt.state_bytes()}
    model.forward(*batch(CFG, B, T))
    model.zero_grad()
    model.backward()
    opt.update()
    nbytes = lambda *bufs: sum(b.nbytes for b in bufs if b is not None)  # noqa: E731
    assert plan == {"parameters": nbytes(model.params.buf), "gradients": nbytes(model.grads.buf),
                    "activations": nbytes(model.acts.buf, model.acts.buf32),
                    "activation gradients": nbytes(model.grad_acts.buf, model.grad_acts.buf32,
                                                   model.grad_layer.buf),
                    "AdamW state": nbytes(opt.m, opt.v, opt.master)}


def key_bias(model):
    """The flat indices of the attention's key bias: its true gradient is exactly zero (a
    constant added to a row of attention scores changes no softmax), so a float32 backward
    gives it rounding noise only."""
    C, L = model.config.channels, model.config.num_layers
    return model.params.offsets["qkvb"] + np.add.outer(np.arange(L) * 3 * C,
                                                       np.arange(C, 2 * C)).ravel()


def key_bias_bound(lrs, noise, eps, bias):
    """How far apart two AdamW runs may take the key bias when each sees gradients of at most
    `noise` there: each step moves it by lr * m_hat / (sqrt(v_hat) + eps) and |m_hat| <= noise,
    so by at most lr * noise / eps a side; plus the float32 rounding of each step's weight
    decay and update, half an ulp of the bias each, on each side."""
    return sum(lrs) * 2 * noise / eps + len(lrs) * 2 * float(np.spacing(np.float32(bias)))


def test_adamw_steps_match_torch(backend):
    """AdamW's steps against torch.optim.AdamW from the same weights and batch. The float32
    reference is itself off the float64 result: at step 1 Adam moves each parameter by
    lr * g / (|g| + eps), and a parameter whose gradient is as small as eps (1e-8) moves by
    an amount set by its gradient's float32 rounding noise (here one fcw entry: g = 2.06e-8
    in float64, 2.33e-8 in torch float32, 2.23e-8 on the cpu backend; moves of 0.67, 0.70 and
    0.69 lr). So the bound is PyTorch float32's own distance from float64: ours may be no
    farther from PyTorch float32 than that. Three steps on the gpu backend (Triton's
    interpreter is slow here) still catch an AdamW that drops eps or scales it by 2."""
    steps, lr, wd, eps = (3 if backend.name == "gpu" else 10), 1e-3, 0.01, 1e-8
    flat = random_weights(CFG, seed=2)
    x, y = batch(CFG, 4, 16, seed=3)
    model = GPT2(CFG, backend)
    load_params(model, flat)
    opt = AdamW(model, AdamWConfig(lr=lr, weight_decay=wd, eps=eps))
    refs = [from_flat(CFG, flat, dtype) for dtype in (torch.float32, torch.float64)]
    ref_opts = [torch.optim.AdamW(r.parameters(), lr=lr, weight_decay=wd, eps=eps) for r in refs]
    kb, noise = key_bias(model), 0.0
    for step in range(steps):
        loss = model.forward(x, y)
        model.zero_grad()
        model.backward()
        opt.update()
        for ref, ref_opt in zip(refs, ref_opts):
            ref_opt.zero_grad()
            _, ref_loss = ref(torch.from_numpy(x), torch.from_numpy(y))
            ref_loss.backward()
            ref_opt.step()
            assert abs(loss - ref_loss.item()) <= TOL * ref_loss.item(), f"step {step}"
        noise = max(noise, np.abs(model.backend.to_host(model.grads.buf)[kb]).max(),
                    np.abs(refs[0].flat(grads=True)[kb]).max())
    ours, theirs, exact = (model.backend.to_host(model.params.buf).astype(np.float64),
                           refs[0].flat(), refs[1].flat())
    assert noise < eps                                   # rounding noise, not a gradient
    assert np.abs(ours[kb] - theirs[kb]).max() <= key_bias_bound(
        [lr] * steps, noise, eps, np.abs(theirs[kb]).max())
    ours[kb] = theirs[kb] = exact[kb] = 0
    assert rel_err(ours, theirs) <= rel_err(theirs, exact)


def write_llmc_model(path, cfg, flat):
    """An independent writer of llm.c's model file (as llm.c's train_gpt2.py writes it)."""
    header = [20240326, 3, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers, cfg.num_heads,
              cfg.channels, cfg.padded_vocab_size] + [0] * 248
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *header))
        f.write(np.asarray(flat, dtype="<f4").tobytes())


def write_llmc_tokens(path, tokens):
    """An independent writer of llm.c's token file (as dev/data/data_common.py writes it)."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, len(tokens), *[0] * 253))
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


def test_cli_training_matches_torch(tmp_path):
    """Issue 2's acceptance check: `llmpy train` on files made by another program gives the
    same per-step losses as PyTorch trained on the same windows in the same order."""
    cfg = GPT2Config(max_seq_len=32, vocab_size=300, num_layers=2, num_heads=2, channels=32)
    flat = random_weights(cfg, seed=4)
    B, T, steps = 4, 16, 5
    tokens = np.random.default_rng(5).integers(0, cfg.vocab_size, B * T * steps + 1 + 17)
    write_llmc_model(tmp_path / "model.bin", cfg, flat)
    write_llmc_tokens(tmp_path / "train.bin", tokens)
    write_llmc_tokens(tmp_path / "val.bin", tokens[:B * T + 1])
    log = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "llmpy", "train", "--model", tmp_path / "model.bin",
                        "--train-data", tmp_path / "train.bin", "--val-data", tmp_path / "val.bin",
                        "-b", str(B), "-t", str(T), "--steps", str(steps), "--no-shuffle",
                        "--weight-decay", "0", "--val-every", "0", "--sample-every", "0",
                        "--log-jsonl", log], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ours = [json.loads(line) for line in log.read_text().splitlines()]
    assert [o["step"] for o in ours] == list(range(1, steps + 1))
    assert all(o["ms"] > 0 for o in ours)

    ref = from_flat(cfg, flat)
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, weight_decay=0.0)
    for step in range(steps):
        window = torch.from_numpy(tokens[step * B * T: step * B * T + B * T + 1].astype(np.int64))
        opt.zero_grad()
        _, loss = ref(window[:-1].view(B, T), window[1:].view(B, T))
        loss.backward()
        opt.step()
        assert abs(ours[step]["train_loss"] - loss.item()) <= 1e-5 * loss.item(), f"step {step}"


@pytest.mark.slow
def test_gpt2_124m_matches_torch():
    cfg = preset("d12")
    cpu = [be for be in BACKENDS if be.name in ("cpu", "numpy")]   # not gpu's CPU interpreter
    model = GPT2(cfg, cpu[-1])
    init_weights(model, 0)
    flat = model.backend.to_host(model.params.buf).copy()
    x, y = batch(cfg, 4, 64)
    model, loss, _, ref, _, ref_loss = forward_backward_both(cfg, model.backend, flat, x, y)
    assert abs(loss - ref_loss.item()) <= TOL * ref_loss.item()
    assert rel_err(model.backend.to_host(model.grads.buf), ref.flat(grads=True)) <= 1e-4
