"""The training loop's optimisation against PyTorch: llm.c's lr schedules vs torch's schedulers;
AdamW with weight decay on the 2-D weights only, global-norm clipping and a schedule vs
torch.optim.AdamW (two param groups) + clip_grad_norm_; gradient accumulation vs one big batch;
the outlier guard (a NaN gradient, a z-score outlier); --overfit-single-batch; the plot."""
import json
import math
import shutil
import types

import numpy as np
import pytest
import torch

from llmpy import cli
from llmpy.model.layout import GPT2Config
from llmpy.train.config import TrainConfig
from llmpy.errors import LlmpyError
from llmpy.model.gpt2 import GPT2, flops_per_token
from llmpy.train.optim import AdamW, OutlierDetector, get_lr
from llmpy.train.config import MEMORY_MARGIN, default_recompute_gelu
from llmpy.train.loop import train
from test_gpt2 import (key_bias, key_bias_bound, random_weights, rel_err, write_llmc_model,
                       write_llmc_tokens)
from test_resume import records
from torchref.gpt2 import from_flat

CFG = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=2, num_heads=2, channels=16)
# the 2-D tensors llm.c decays, written out here rather than taken from llmpy.optim
DECAYED = {"wte", "wpe", "qkvw", "attprojw", "fcw", "fcprojw"}


@pytest.fixture
def files(tmp_path):
    flat = random_weights(CFG, seed=7)
    write_llmc_model(tmp_path / "model.bin", CFG, flat)
    tokens = np.random.default_rng(8).integers(0, CFG.vocab_size, 4000)
    write_llmc_tokens(tmp_path / "train.bin", tokens)
    return tmp_path, flat, tokens


def run(tmp_path, **kw):
    """Train in this process; returns (model, log records)."""
    log = tmp_path / f"log{len(list(tmp_path.glob('log*')))}.jsonl"
    args = dict(model=str(tmp_path / "model.bin"), train_data=str(tmp_path / "train.bin"),
                backend="numpy", batch_size=2, seq_len=8, steps=10, val_every=0,
                sample_every=0)
    args.update(kw)
    if "run_dir" in kw:
        log = tmp_path / kw["run_dir"] / "log.jsonl"
    else:
        args["log_jsonl"] = str(log)
    model = train(TrainConfig(**args), set(args))
    return model, [json.loads(line) for line in log.read_text().splitlines()]


def after_backward(monkeypatch, n, fault):
    """Inject a fault: fault(grads) right after the n-th backward pass."""
    calls = []
    backward = GPT2.backward

    def patched(self, *args, **kwargs):
        backward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == n:
            fault(self.grads.buf)
    monkeypatch.setattr(GPT2, "backward", patched)


def loss_spike(monkeypatch, n, factor):
    """Multiply the loss the n-th forward pass returns; its gradients stay as they were."""
    calls = []
    forward = GPT2.forward

    def patched(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs) * (factor if len(calls) == n else 1.0)
    monkeypatch.setattr(GPT2, "forward", patched)


def lrs_of(scheduler, n):
    out = []
    for _ in range(n):
        out.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()            # no gradients: changes nothing
        scheduler.step()
    return out


def test_schedules_match_torch():
    lr, W, N, frac = 1e-3, 5, 50, 0.1
    opt = lambda: torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)  # noqa: E731
    warm = [lr * (t + 1) / W for t in range(W)]
    cos = lrs_of(torch.optim.lr_scheduler.CosineAnnealingLR(opt(), N - W, eta_min=lr * frac), N - W)
    lin = lrs_of(torch.optim.lr_scheduler.LinearLR(opt(), 1.0, frac, total_iters=N - W), N - W)
    for name, expected in (("cosine", warm + cos), ("linear", warm + lin)):
        ours = [get_lr(t, lr, name, W, N, frac) for t in range(N)]
        np.testing.assert_allclose(ours, expected, rtol=1e-9, err_msg=name)
    # constant ignores warmup, as llm.c's get_learning_rate_constant
    assert [get_lr(t, lr, "constant", W, N, frac) for t in range(N)] == [lr] * N
    # WSD (arXiv 2405.18392, llm.c): warmup, flat until 80% of the steps, then 1 - sqrt decay
    wsd = [get_lr(t, lr, "wsd", W, N, frac) for t in range(N)]
    assert wsd[:W] == warm and wsd[W:40] == [lr] * (40 - W)
    assert all(a > b for a, b in zip(wsd[40:], wsd[41:]))
    assert wsd[45] == pytest.approx(lr * frac + (1 - math.sqrt(0.5)) * lr * (1 - frac))


def test_adamw_decay_clip_schedule_match_torch(files, monkeypatch):
    tmp_path, flat, tokens = files
    B, T, steps, lr, wd, clip = 2, 8, 10, 3e-3, 0.1, 1.8
    noise = [0.0]                 # the largest key-bias gradient any backward pass gave
    backward = GPT2.backward

    def recording(self, *args, **kwargs):
        backward(self, *args, **kwargs)
        noise[0] = max(noise[0], np.abs(self.grads.buf[key_bias(self)]).max())
    monkeypatch.setattr(GPT2, "backward", recording)
    model, log = run(tmp_path, steps=steps, lr=lr, weight_decay=wd, grad_clip=clip,
                     lr_schedule="cosine", warmup_steps=3, final_lr_frac=0.1, beta2=0.95)
    kb = key_bias(model)
    ref = from_flat(CFG, flat)
    decay = [t for name, ts in ref._layout() if name in DECAYED for t in ts]
    rest = [t for name, ts in ref._layout() if name not in DECAYED for t in ts]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                             {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    clipped = 0
    for step in range(steps):
        window = torch.from_numpy(tokens[step * B * T: (step + 1) * B * T + 1].astype(np.int64))
        opt.zero_grad()
        _, loss = ref(window[:-1].view(B, T), window[1:].view(B, T))
        loss.backward()
        noise[0] = max(noise[0], np.abs(ref.flat(grads=True)[kb]).max())
        norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip).item()
        clipped += norm > clip
        lr_t = lr * (step + 1) / 3 if step < 3 else \
            0.1 * lr + 0.5 * (1 + math.cos(math.pi * (step - 3) / (steps - 3))) * 0.9 * lr
        for g in opt.param_groups:
            g["lr"] = lr_t
        opt.step()
        assert log[step]["lr"] == pytest.approx(lr_t, rel=1e-12)
        assert log[step]["train_loss"] == pytest.approx(loss.item(), rel=1e-5), step
        assert log[step]["grad_norm"] == pytest.approx(norm, rel=1e-5), step
    assert 0 < clipped < steps, "the test must exercise both clipped and unclipped steps"
    ours, theirs = model.backend.to_host(model.params.buf).copy(), ref.flat()
    # the key bias has an exactly-zero true gradient: only rounding noise, which AdamW (eps
    # 1e-8) turns into steps of at most lr * noise / eps (test_gpt2.key_bias_bound); clipping
    # only shrinks the gradients
    assert noise[0] < 1e-8
    assert np.abs(ours[kb] - theirs[kb]).max() <= key_bias_bound(
        [r["lr"] for r in log], noise[0], 1e-8, np.abs(theirs[kb]).max())
    ours[kb] = theirs[kb] = 0
    assert rel_err(ours, theirs) <= 1e-5


def test_grad_accumulation_equals_one_big_batch(files):
    tmp_path = files[0]
    big, big_log = run(tmp_path, batch_size=4, steps=4, lr=1e-3)
    acc, acc_log = run(tmp_path, batch_size=2, total_batch_size=2 * 2 * 8, steps=4, lr=1e-3)
    for a, b in zip(acc_log, big_log):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    assert rel_err(acc.params.buf, big.params.buf) <= 1e-5


def test_nan_gradient_skips_the_update(files, monkeypatch, capsys):
    tmp_path = files[0]
    ref, _ = run(tmp_path, steps=2, lr=1e-3)
    after_backward(monkeypatch, 3, lambda g: g.__setitem__(5, np.nan))
    model, log = run(tmp_path, steps=3, lr=1e-3)
    assert "skipped" not in log[1] and log[2]["skipped"] == "the gradient norm is nan"
    assert log[2]["grad_norm"] is None
    assert "warning: step 3: update skipped: the gradient norm is nan" in capsys.readouterr().out
    assert np.array_equal(model.params.buf, ref.params.buf)   # step 3 changed nothing


def test_nonfinite_steps_in_a_row_stop_the_run(files, monkeypatch, capsys):
    """The weights stay finite, but every loss is NaN: two skipped steps, then one error."""
    tmp_path = files[0]
    forward = GPT2.forward
    monkeypatch.setattr(GPT2, "forward", lambda self, *a: forward(self, *a) * math.nan)
    rc = cli.main(["train", "--model", str(tmp_path / "model.bin"), "--train-data",
                   str(tmp_path / "train.bin"), "--backend", "numpy", "-b", "2", "-t", "8",
                   "--val-every", "0", "--sample-every", "0", "--save", str(tmp_path / "out.bin")])
    out, err = capsys.readouterr()
    assert rc == 1 and out.count("update skipped: the loss is nan") == 2
    assert err.strip().splitlines() == ["llmpy: error: step 3: the loss is nan, 3 steps in a row; "
                                        "stopping with the weights of the last good update "
                                        "(try a lower --lr)"]
    assert not (tmp_path / "out.bin").exists()


def test_outlier_detector_z_scores():
    x = np.random.default_rng(0).normal(size=30)
    x[20] = 40.0
    det = OutlierDetector(window=8)
    z = [det.update(float(v)) for v in x]
    assert all(math.isnan(v) for v in z[:8])
    for i in range(8, 30):   # z of x[i] within the newest 8 values, x[i] included (llm.c)
        w = x[i - 7:i + 1]
        assert z[i] == pytest.approx((x[i] - w.mean()) / w.std(), rel=1e-12)
    # Samuelson's inequality: a z-score among n values is at most sqrt(n - 1); a value d from
    # the mean of the n - 1 others, of spread s, has z = sqrt(n - 1) / sqrt(1 + n s^2 / d^2):
    # x[20] = 40 against N(0, 1) noise comes within 1% of the bound
    assert 0.99 * math.sqrt(7) < z[20] <= math.sqrt(7)
    flat = OutlierDetector(window=2)
    assert [flat.update(1.0) for _ in range(3)][2] == 0.0    # zero spread: z 0, as llm.c


def test_outliers_skip_the_update(files, monkeypatch):
    """llm.c's -sl and -sg: after 64 ordinary steps (a full window), a loss 10x larger and a
    gradient 1000x larger are skipped, each by its own guard: one value far from 63 others
    has a z-score near sqrt(63) = 7.9 (test_outlier_detector_z_scores), well over 5."""
    tmp_path = files[0]
    loss_spike(monkeypatch, 68, 10.0)
    after_backward(monkeypatch, 70, lambda g: g.__imul__(1000.0))
    _, log = run(tmp_path, steps=72, batch_size=1, seq_len=4, lr=1e-4, skip_update_lossz=5.0,
                 skip_update_gradz=5.0)
    assert [r["step"] for r in log if "skipped" in r] == [68, 70]
    assert log[67]["skipped"].startswith("loss z-score")
    assert log[69]["skipped"].startswith("grad norm z-score")


def test_resume_after_skipped_updates_is_exact(files, monkeypatch):
    """A run whose updates were skipped (NaN gradients at steps 69 and 70) resumes from a
    checkpoint taken just after them exactly as it went on uninterrupted: AdamW's step (68
    updates in 70 steps: its bias corrections), both outlier windows (a gradient spike at
    step 71 and a loss spike at 72 are skipped only against the 64 values before them) and
    the count of non-finite steps in a row (a third at step 71 stops the run) come back from
    the checkpoint."""
    tmp_path = files[0]
    args = dict(steps=73, batch_size=1, seq_len=4, lr=1e-3, skip_update_lossz=5.0,
                skip_update_gradz=5.0, checkpoint_every=70, resume=True)
    nan = lambda g: g.__setitem__(5, np.nan)            # noqa: E731
    spike = lambda g: g.__imul__(1000.0)                 # noqa: E731
    after_backward(monkeypatch, 69, nan)
    after_backward(monkeypatch, 70, nan)
    after_backward(monkeypatch, 71, spike)
    loss_spike(monkeypatch, 72, 10.0)
    ref, log = run(tmp_path, run_dir=str(tmp_path / "ref"), **args)
    monkeypatch.undo()
    assert [r["step"] for r in log if "skipped" in r] == [69, 70, 71, 72]
    manifest = json.loads((tmp_path / "ref" / "ckpt_00000070" / "manifest.json").read_text())
    assert (manifest["adamw_step"], manifest["nonfinite"]) == (68, 2)
    for name in ("run", "nan"):
        shutil.copytree(tmp_path / "ref", tmp_path / name)
        shutil.rmtree(tmp_path / name / "ckpt_00000073")
        after_backward(monkeypatch, 1, nan if name == "nan" else spike)   # at step 71
        if name == "nan":
            with pytest.raises(LlmpyError, match="step 71: the gradient norm is nan, 3 steps "
                                                 "in a row"):
                run(tmp_path, run_dir=str(tmp_path / name), **args)
        else:
            loss_spike(monkeypatch, 2, 10.0)
            model, _ = run(tmp_path, run_dir=str(tmp_path / name), **args)
            assert records(tmp_path / name) == records(tmp_path / "ref")
            assert np.array_equal(model.params.buf, ref.params.buf)
        monkeypatch.undo()


def test_overfit_single_batch(files):
    _, log = run(files[0], steps=4, lr=0.0, overfit_single_batch=True)
    assert len({r["train_loss"] for r in log}) == 1       # lr 0 and the same batch each step
    _, log = run(files[0], steps=4, lr=0.0)
    assert len({r["train_loss"] for r in log}) == 4


def test_plot(files, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    run(files[0], steps=3, run_dir=str(run_dir))
    assert cli.main(["plot", str(run_dir)]) == 0
    assert (run_dir / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plot_that_cannot_be_drawn_does_not_fail_the_run(files, capsys):
    """The summary draws the plot after training; a log it cannot plot says why in the plot's
    line instead of ending a finished run in an error (or waiting on a pipe)."""
    pytest.importorskip("matplotlib")
    tmp_path = files[0]
    train(TrainConfig(model=str(tmp_path / "model.bin"), train_data=str(tmp_path / "train.bin"),
                      backend="numpy", batch_size=2, seq_len=8, steps=2, val_every=0,
                      sample_every=0, log_jsonl="/dev/null"), set())
    out = capsys.readouterr().out
    assert "plot   not drawn: /dev/null is not a file" in out and "llmpy plot" not in out


def test_plot_bad_logs(tmp_path):
    """A log that is not train's: one line naming it (and the line), and no PNG."""
    from test_cli import assert_one_line_error
    from test_cli import cli as run_cli
    cases = {
        "binary.bin": (b"\xc6\x00\x01", "not a log.jsonl (not UTF-8 text)"),
        "list.jsonl": (b'{"step": 1, "train_loss": 2.0}\n[1, 2]\n', "line 2 is not a JSON object"),
        "nostep.jsonl": (b'{"train_loss": 2.0}\n', 'line 1: "step" is missing'),
        "strloss.jsonl": (b'{"step":1,"train_loss":"a"}\n', "line 1: train_loss is not a number"),
        "nolosses.jsonl": (b'{"step": 1}\n{"step": 2, "val_loss": null}\n', "no losses to plot")}
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert_one_line_error(run_cli("plot", tmp_path / name), f"{name}: {words}")
    assert not list(tmp_path.glob("*.png"))


def test_mfu_per_step_where_the_backend_knows_its_peak(files, monkeypatch, capsys):
    from llmpy.backends.base import Backend
    _, log = run(files[0], steps=2)
    assert "mfu" not in log[0] and "MFU" not in capsys.readouterr().out   # no peak: no MFU
    monkeypatch.setattr(Backend, "peak_flops", lambda self: 1e9)
    _, log = run(files[0], steps=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    for rec, line in zip(log, lines, strict=True):
        assert rec["mfu"] == pytest.approx(flops_per_token(CFG, 8) * rec["tokens_per_s"] / 1e9)
        assert f" | {rec['mfu']:.1%} MFU | " in line


def test_gelu_recomputed_by_default_only_where_keeping_it_would_not_fit():
    """--recompute-gelu's default: on a GPU, keep every GELU output where the buffers' own sizes
    with them, plus the margin, fit in the memory the GPU has for the process; else recompute.
    In Triton's interpreter (no such figure) recompute, as llm.c; on the CPU keep them."""
    from llmpy.backends import Capabilities, get_backend
    backend = get_backend("numpy")
    model = GPT2(GPT2Config(max_seq_len=16, vocab_size=64, num_layers=2, num_heads=2,
                            channels=16), backend)
    opt, B, T = AdamW(model), 4, 16
    keep = sum(model.memory(B, T, recompute_gelu=False).values()) + opt.state_bytes()
    assert keep > sum(model.memory(B, T, recompute_gelu=True).values()) + opt.state_bytes()
    needed = keep * MEMORY_MARGIN[0] + MEMORY_MARGIN[1]

    def gpu(free):
        return types.SimpleNamespace(name="gpu", caps=Capabilities(fused=True),
                                     available_memory=lambda: free)
    assert default_recompute_gelu(keep, gpu(int(needed) + 1)) is False
    assert default_recompute_gelu(keep, gpu(int(needed) - 1)) is True
    assert default_recompute_gelu(keep, gpu(None)) is True
    assert default_recompute_gelu(keep, backend) is False
    assert model.recompute_gelu is False                # the plan is not the model's setting
