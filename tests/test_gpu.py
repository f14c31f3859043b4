"""The gpu backend's kernels against the NumPy reference, and the whole model against the
NumPy model.

Without a GPU, the Triton kernels run in Triton's interpreter on CPU tensors (conftest.py sets
TRITON_INTERPRET=1), in float32 and float16: the interpreter reads bf16 wrongly. On a GPU they
run in float32 and bf16, and larger shapes and bf16 training are checked too.

Every input is drawn, rounded to the dtype under test, and the reference runs in float64 on
those same rounded values, so what is measured is the kernel's own error:
max |got - want| / max |want|. Tolerances (TOL): float32 1e-5, about 100 float32 ulps of the
largest value; float16 4e-3 and bf16 3e-2, eight units of each format's rounding (2^-11,
2^-8): each output is rounded once, and bf16/fp16 intermediates (the attention probabilities
fed to the second matmul) once more.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from llmpy.backends import get_backend
from llmpy.backends import numpy as ref
from llmpy.model.layout import GPT2Config
from llmpy.model.build import preset
from llmpy.data.loader import DataLoader, bundled_data
from llmpy.model.gpt2 import GPT2, load_params, param_shapes
from llmpy.train.optim import AdamW, AdamWConfig, clip_scale, global_norm
from test_gpt2 import random_weights

gpu = pytest.importorskip("llmpy.backends.gpu", reason="needs torch, triton and a GPU or "
                                                       "TRITON_INTERPRET=1")
CUDA = torch.cuda.is_available()
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
DTYPES = [torch.float32, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
DEVICE = torch.device("cuda" if CUDA else "cpu")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


class Case:
    """Random inputs as device tensors in one dtype, plus their exact float64 values."""

    def __init__(self, dtype, seed=0):
        self.dtype, self.rng = dtype, np.random.default_rng(seed)

    def randn(self, *shape, scale=1.0, dtype=None):
        x = torch.tensor(self.rng.standard_normal(shape) * scale, dtype=dtype or self.dtype,
                         device=DEVICE)
        return x, x.double().cpu().numpy()

    def zeros(self, *shape, dtype=None):
        return torch.zeros(shape, dtype=dtype or self.dtype, device=DEVICE)

    def check(self, got, want, what):
        got = got.double().cpu().numpy()
        err = np.abs(got - want).max() / np.abs(want).max()
        print(f"test_gpu: {what} {dtype_name(self.dtype)}: relative error {err:.2e}")
        assert err <= TOL[self.dtype], f"{what}: relative error {err:.3g} > {TOL[self.dtype]}"


@pytest.fixture(params=DTYPES, ids=dtype_name)
def case(request):
    return Case(request.param)


def test_encoder(case):
    B, T, C, Vp = 3, 7, 20, 40
    inp = case.rng.integers(0, Vp, (B, T))
    inp[:, :6] = 17                   # a frequent token: 18 rows, more than one kernel step (16)
    wte, wte64 = case.randn(Vp, C)
    wpe, wpe64 = case.randn(T + 2, C)
    dout, dout64 = case.randn(B, T, C)
    out, want = case.zeros(B, T, C), np.zeros((B, T, C))
    ids = torch.tensor(inp, device=DEVICE)
    gpu.encoder_forward(out, ids, wte, wpe)
    ref.encoder_forward(want, inp, wte64, wpe64)
    case.check(out, want, "encoder out")
    dwte, dwte64 = case.randn(Vp, C)
    dwpe, dwpe64 = case.randn(T + 2, C)
    start = dwte.clone()
    gpu.encoder_backward(dwte, dwpe, dout, ids)
    ref.encoder_backward(dwte64, dwpe64, dout64, inp)
    case.check(dwte, dwte64, "encoder dwte")
    case.check(dwpe, dwpe64, "encoder dwpe")
    again = start.clone()
    gpu.encoder_backward(again, dwpe.clone(), dout, ids)
    assert torch.equal(again, dwte), "the wte gradient must be the same, bit for bit, every run"


def test_layernorm(case):
    B, T, C = 3, 50, 37               # 150 rows: several backward programs, the last one partial
    x, x64 = case.randn(B, T, C, scale=3.0)
    w, w64 = case.randn(C)
    b, b64 = case.randn(C)
    dout, dout64 = case.randn(B, T, C)
    out, mean, rstd = case.zeros(B, T, C), case.zeros(B, T, dtype=torch.float32), \
        case.zeros(B, T, dtype=torch.float32)
    want, mean64, rstd64 = np.zeros((B, T, C)), np.zeros((B, T)), np.zeros((B, T))
    gpu.layernorm_forward(out, mean, rstd, x, w, b)
    ref.layernorm_forward(want, mean64, rstd64, x64, w64, b64)
    case.check(out, want, "layernorm out")
    case.check(rstd, rstd64, "layernorm rstd")
    dx, dx64 = case.randn(B, T, C)
    dw, dw64 = case.randn(C)
    db, db64 = case.randn(C)
    ds, ds64 = case.randn(C)
    gpu.layernorm_backward(dx, dw, db, dout, x, w, mean, rstd, dsums=ds)
    ref.layernorm_backward(dx64, dw64, db64, dout64, x64, w64, mean64, rstd64)
    case.check(dx, dx64, "layernorm dinp")
    case.check(dw, dw64, "layernorm dweight")
    case.check(db, db64, "layernorm dbias")
    check_sums(case, ds, ds64, dx, "layernorm")


def check_sums(case, dsums, start64, dinp, what):
    """dsums: start64 plus the column sums of dinp as the kernel left it (the next matmul's bias
    gradient, sums_bias_grads)."""
    case.check(dsums, start64 + dinp.double().cpu().numpy().reshape(-1, dinp.shape[-1]).sum(0),
               f"{what} dsums")


def test_residual_layernorm(case):
    B, T, C = 2, 9, 37
    x, x64 = case.randn(B, T, C, scale=3.0)
    y, y64 = case.randn(B, T, C)
    w, w64 = case.randn(C)
    b, b64 = case.randn(C)
    res, out = case.zeros(B, T, C), case.zeros(B, T, C)
    mean, rstd = case.zeros(B, T, dtype=torch.float32), case.zeros(B, T, dtype=torch.float32)
    res64, want, mean64, rstd64 = (np.zeros((B, T, C)), np.zeros((B, T, C)), np.zeros((B, T)),
                                   np.zeros((B, T)))
    gpu.residual_layernorm_forward(res, out, mean, rstd, x, y, w, b)
    ref.residual_layernorm_forward(res64, want, mean64, rstd64, x64, y64, w64, b64)
    case.check(res, res64, "residual+layernorm residual")
    case.check(out, want, "residual+layernorm out")
    case.check(mean, mean64, "residual+layernorm mean")
    case.check(rstd, rstd64, "residual+layernorm rstd")


def test_matmul(case):
    B, T, C, OC = 2, 9, 24, 40
    x, x64 = case.randn(B, T, C)
    w, w64 = case.randn(OC, C)
    b, b64 = case.randn(OC)
    out, want = case.zeros(B, T, OC), np.zeros((B, T, OC))
    gpu.matmul_forward(out, x, w, b)
    ref.matmul_forward(want, x64, w64, b64)
    case.check(out, want, "matmul out")
    dout, dout64 = case.randn(B, T, OC)
    dx, _ = case.randn(B, T, C)                 # written over, not added to
    dx64 = np.zeros((B, T, C))
    dw, dw64 = case.randn(OC, C)
    db, db64 = case.randn(OC)
    gpu.matmul_backward(dx, dw, db, dout, x, w)
    ref.matmul_backward(dx64, dw64, db64, dout64, x64, w64)
    case.check(dx, dx64, "matmul dinp")
    case.check(dw, dw64, "matmul dweight")
    case.check(db, db64, "matmul dbias")


def test_gelu(case):
    # 18000 elements: several programs at every block size, the last one partial
    x, x64 = case.randn(3, 5, 1200, scale=2.0)
    out, want = case.zeros(3, 5, 1200), np.zeros((3, 5, 1200))
    gpu.gelu_forward(out, x)
    ref.gelu_forward(want, x64)
    case.check(out, want, "gelu out")
    dout, dout64 = case.randn(3, 5, 1200)
    dx, _ = case.randn(3, 5, 1200)              # written over, not added to
    dx64 = np.zeros((3, 5, 1200))
    ds, ds64 = case.randn(1200)
    gpu.gelu_backward(dx, x, dout, dsums=ds)
    ref.gelu_backward(dx64, x64, dout64)
    case.check(dx, dx64, "gelu dinp")
    check_sums(case, ds, ds64, dx, "gelu")
    again = case.zeros(3, 5, 1200)
    gpu.gelu_backward(again, x, dout)           # without dsums
    assert torch.equal(again, dx)


# (B, T, C, NH): T over several blocks with a ragged last one, and a head size (6) that is not
# a power of two; on a GPU also GPT-2's head size 64 at a length that fills the blocks, and at
# one long enough (>= 512) to take the autotuned blocks that training at T=1024 takes in bf16.
ATTENTION_SHAPES = [(2, 37, 12, 2)] + ([(2, 300, 256, 4), (1, 640, 128, 2)] if CUDA else [])


@pytest.mark.parametrize("shape", ATTENTION_SHAPES, ids=lambda s: "B{}T{}C{}NH{}".format(*s))
def test_flash_attention(case, shape):
    B, T, C, NH = shape
    qkv, qkv64 = case.randn(B, T, 3 * C)
    out, lse = case.zeros(B, T, C), case.zeros(B, NH, T, dtype=torch.float32)
    want, pre, att = np.zeros((B, T, C)), np.zeros((B, NH, T, T)), np.zeros((B, NH, T, T))
    gpu.attention_forward(out, lse, qkv)
    ref.attention_forward(want, pre, att, qkv64)
    case.check(out, want, "attention out")
    # the logsumexp of each row of scores: a diagonal score minus the log of its probability
    diag = np.arange(T)
    case.check(lse, pre[..., diag, diag] - np.log(att[..., diag, diag]), "attention lse")
    dout, dout64 = case.randn(B, T, C)
    dqkv, _ = case.randn(B, T, 3 * C)           # written over, not added to
    dqkv64 = np.zeros((B, T, 3 * C))
    gpu.attention_backward(dqkv, dout, qkv, out, lse)
    ref.attention_backward(dqkv64, np.zeros_like(att), np.zeros_like(att), dout64, qkv64, att)
    case.check(dqkv, dqkv64, "attention dinp")
    again = case.zeros(B, T, 3 * C)            # every element written by one program: no atomics
    gpu.attention_backward(again, dout, qkv, out, lse)
    assert torch.equal(again, dqkv)


@pytest.mark.skipif(CUDA, reason="a GPU compiles every config (gpu_compile.py) and runs the one "
                                   "autotuning chose, in the test above")
@pytest.mark.parametrize("dq,dkdv", [((64, 32), (32, 16)), ((32, 16), (64, 32))])
def test_flash_attention_blocks(dq, dkdv, monkeypatch):
    """The interpreter's one config walks whole blocks (STEP = BLOCK), the same in both backward
    kernels. Here: steps under a block (the unmasked loop, then the diagonal block in several
    steps), over a ragged last block, and other blocks in each kernel."""
    import triton
    from llmpy.backends.gpu import attention
    for kernel, (block, step) in ((attention._attention_dq_kernel, dq),
                                  (attention._attention_dkdv_kernel, dkdv)):
        monkeypatch.setattr(kernel, "configs", [triton.Config(dict(BLOCK=block, STEP=step))])
    test_flash_attention(Case(torch.float32), (2, 70, 12, 2))


def test_fused_classifier(case):
    B, T, V, Vp = 2, 5, 9000, 9216         # V spans blocks of every tuned width (1024-8192)
    logits, logits64 = case.randn(B, T, Vp, scale=3.0)
    targets = case.rng.integers(0, V, (B, T))
    tgt = torch.tensor(targets, device=DEVICE)
    losses, lse = case.zeros(B, T, dtype=torch.float32), case.zeros(B, T, dtype=torch.float32)
    want, probs = np.zeros((B, T)), np.zeros((B, T, Vp))
    gpu.crossentropy_forward(losses, lse, logits, tgt, V)
    ref.crossentropy_forward(want, probs, logits64, targets, V)
    case.check(losses, want, "classifier losses")
    dlosses, dlosses64 = case.randn(B, T, dtype=torch.float32)
    dlogits64 = np.zeros((B, T, Vp))
    ref.crossentropy_backward(dlogits64, dlosses64, probs, targets, V)
    dlogits, _ = case.randn(B, T, Vp)           # written over, not added to
    gpu.crossentropy_backward(dlogits, dlosses, logits, lse, tgt, V)
    case.check(dlogits, dlogits64, "classifier dlogits")
    gpu.crossentropy_backward(logits, dlosses, logits, lse, tgt, V)    # in place, as the model
    case.check(logits, dlogits64, "classifier dlogits in place of the logits")


@needs_cuda
@pytest.mark.parametrize("test", [test_layernorm, test_residual_layernorm, test_gelu,
                                  test_fused_classifier])
def test_every_tuned_config(test, monkeypatch):
    """Autotuning compares its configs only at large shapes and keeps the fastest, so the tests
    above, at small shapes, see one config of each row-wise or elementwise kernel; here each
    config of each runs them, in bf16 (the interpreter has one config). Flash attention's
    configs are compiled by gpu_compile.py; on a GPU, the test above runs the one chosen."""
    from llmpy.backends.gpu import classifier, gelu, layernorm
    tuned = [layernorm._layernorm_forward_kernel, layernorm._layernorm_backward_kernel,
             gelu._gelu_forward_kernel, gelu._gelu_backward_kernel,
             classifier._classifier_forward_kernel]
    every = {kernel: kernel.configs for kernel in tuned}
    for i in range(max(map(len, every.values()))):
        for kernel, configs in every.items():
            monkeypatch.setattr(kernel, "configs", [configs[min(i, len(configs) - 1)]])
        test(Case(torch.bfloat16))


@pytest.mark.skipif(CUDA, reason="a GPU compiles them itself, in the tests above")
def test_kernels_compile_for_an_h100():
    """tests/gpu_compile.py: every kernel at GPT-2 124M's bf16 launch constants, and every
    autotune config of every tuned kernel, compiled for sm_90 without a GPU: what the interpreter
    cannot check (block shapes, dtypes and shared memory the GPU compiler refuses), and kernel
    argument names that Triton's binder takes for itself."""
    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "gpu_compile.py")],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert all(": ok (" in line for line in r.stdout.splitlines()), r.stdout


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A10", 125e12), ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 3060", None)])
def test_dense_peak_by_device_name(name, peak):
    # names as torch.cuda.get_device_name gives them; a longer model name must not match a
    # shorter one's peak (A10 in A100, L4 in L40S)
    assert gpu.dense_peak(name) == peak


def test_available_memory():
    """What train's GELU default compares its plan with: on a GPU the free memory plus this
    process's own (its buffers so far are part of the plan); none in the interpreter."""
    be = get_backend("gpu")
    if not CUDA:
        assert be.available_memory() is None
        return
    held = torch.zeros(1 << 20, device=DEVICE)             # 4 MiB of this process's own
    assert be.available_memory() >= torch.cuda.mem_get_info()[0] + held.nbytes


def test_sum_squares(case):
    # float32 accumulation: 100003 ones would stop at 256 in bf16 (2048 in fp16)
    assert gpu.sum_squares(case.zeros(100003) + 1) == 100003
    x, x64 = case.randn(5000)
    assert abs(gpu.sum_squares(x) / (x64 @ x64) - 1) <= TOL[torch.float32]


def test_adamw_master_weights(case):
    n, kw = 3001, dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    p, p64 = case.randn(n)
    master = gpu.master_weights(p)
    assert (master is None) == (case.dtype == torch.float32)
    m, v = case.zeros(n, dtype=torch.float32), case.zeros(n, dtype=torch.float32)
    m64, v64 = np.zeros(n), np.zeros(n)
    for step in range(1, 4):
        g, g64 = case.randn(n)
        gpu.adamw_update(p, g, m, v, step, **kw, grad_scale=0.5, master=master)
        ref.adamw_update(p64, g64, m64, v64, step, **kw, grad_scale=0.5)
    if master is not None:                           # float32 arithmetic on the master weights
        err = np.abs(master.double().cpu().numpy() - p64).max() / np.abs(p64).max()
        assert err <= TOL[torch.float32], err
        assert torch.equal(p, master.to(p.dtype)), "params are the master weights, rounded"
    case.check(p, p64, "adamw params")
    case.check(m, m64, "adamw m")                   # shows grad_scale, which p hardly does


# ----------------------------------------------------------------------------- whole model

CFG = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=2, num_heads=3, channels=48)


def numpy_and_gpu_models(cfg, dtype, monkeypatch, recompute_gelu=False):
    """A NumPy model and a gpu model computing in dtype, with the same random weights: those of
    the gpu model's params, so rounded to dtype."""
    np_model = GPT2(cfg, get_backend("numpy"))
    gpu_model = GPT2(cfg, get_backend("gpu", dtype=dtype_name(dtype)), recompute_gelu)
    load_params(gpu_model, random_weights(cfg))
    load_params(np_model, gpu.to_host(gpu_model.params.buf))
    return np_model, gpu_model


@pytest.fixture(params=DTYPES, ids=dtype_name)
def model_dtype(request):
    return request.param


def test_model_matches_numpy(model_dtype, monkeypatch):
    """Loss and all 16 gradients; errors compound through the layers, so the tolerance is the
    kernels' times 2."""
    np_model, gpu_model = numpy_and_gpu_models(CFG, model_dtype, monkeypatch)
    x, y = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 2, 13))
    losses = []
    for model in (np_model, gpu_model):
        losses.append(model.forward(x, y))
        model.zero_grad()
        model.backward()
    tol = 2 * TOL[model_dtype]
    assert abs(losses[1] - losses[0]) <= tol * losses[0], losses
    for name, _ in param_shapes(CFG):
        want = getattr(np_model.grads, name)
        got = gpu.to_host(getattr(gpu_model.grads, name))
        err = np.abs(got - want).max() / np.abs(want).max()
        assert err <= tol, f"{name}: relative error {err:.3g}"


@needs_cuda
def test_bf16_training_tracks_fp32(monkeypatch):
    """20 AdamW steps of the tiny preset on Shakespeare: bf16 on the GPU (fp32 master weights,
    GELU recomputed, clipping fused into AdamW, as train.py can run) against the float32
    NumPy model. Each step's loss within 2% of float32's, and both learn."""
    cfg = preset("tiny", max_seq_len=64)
    np_model, gpu_model = numpy_and_gpu_models(cfg, torch.bfloat16, monkeypatch,
                                               recompute_gelu=True)
    losses = {}
    for model in (np_model, gpu_model):
        opt = AdamW(model, AdamWConfig(lr=1e-3))
        loader = DataLoader(bundled_data("shakespeare_train.bin"), 4, 64, cfg.vocab_size)
        losses[model.backend.name] = out = []
        for _ in range(20):
            out.append(model.forward(*loader.next_batch()))
            model.zero_grad()
            model.backward()
            opt.update(grad_scale=clip_scale(global_norm(model.grads.buf, model.backend), 1.0))
    want, got = np.array(losses["numpy"]), np.array(losses["gpu"])
    print("test_gpu: losses fp32", np.round(want, 4).tolist(), "bf16", np.round(got, 4).tolist())
    assert np.all(np.abs(got - want) <= 0.02 * want), np.abs(got - want) / want
    assert got[-1] < got[0] - 1.0 and want[-1] < want[0] - 1.0


# ----------------------------------------------------------------------------- no GPU

def run_cli(*args, env=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    return subprocess.run([sys.executable, "-m", "llmpy", *args], capture_output=True, text=True,
                          env=env)


@pytest.mark.skipif(CUDA, reason="checks a machine without a GPU")
def test_backend_unavailable_without_gpu_or_interpreter():
    r = run_cli("train", "--backend", "gpu", "--steps", "1")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "llmpy: error: backend 'gpu' is not available: no CUDA GPU (TRITON_INTERPRET=1 runs the "
        "Triton kernels on the CPU)"]


@pytest.mark.skipif(CUDA, reason="checks a machine without a GPU")
def test_bench_gpu_needs_cuda():
    r = run_cli("bench", "gpu", env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["llmpy: error: bench gpu needs a CUDA GPU "
                                             "(torch.cuda.is_available() is False)"]


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "64", "0"], "--batch-size must be >= 1, got 0"),
    (["--steps", "4", "--block", "5"], "--steps 4 must be at least --block 5"),
    (["--track-steps", "-1"], "--track-steps must be >= 0, got -1"),
    (["--model", "d13"], "--model d13: not a preset (d6, d12, d24, d36, d48, tiny, llama-tiny, "
                         "smollm2-135m, llama-3.2-1b, gemma3-270m) nor a Hugging Face model "
                         "directory")])
def test_bench_gpu_checks_arguments_first(args, message):
    r = run_cli("bench", "gpu", *args, env={"TRITON_INTERPRET": "1"})
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"llmpy: error: bench gpu: {message}"]
