"""Smoke tests of `llmpy bench cpu` and `llmpy bench sample` on the tiny preset: they run, the
implementations they compare start from the same weights and batch, and the FLOP count is
right; bench/bench_fineweb.py on a small corpus. (The benchmarks' numbers are recorded in
bench/RESULTS.md, never asserted.)"""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

from llmpy.cli import main
from llmpy.model.layout import GPT2Config
from llmpy.model.build import preset
from test_cli import assert_one_line_error, cli, help_text, llmpy


def test_bench_cpu_runs_all_three_on_the_same_weights():
    B, T = 2, 8
    r = llmpy("bench", "cpu", "--model", "tiny", "-b", B, "-t", T, "--steps", 2, "--warmup", 0,
              "--threads", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = preset("tiny")
    C, L = cfg.channels, cfg.num_layers
    # each weight costs 2 FLOPs per token forward and 4 backward; a layer holds 12 C^2 weights
    assert out["matmul_gflop"] == pytest.approx(6 * B * T * (L * 12 * C * C
                                                             + cfg.padded_vocab_size * C) / 1e9)
    first = out["torch"]["losses"][0]
    for impl in ("cpu", "torch", "numpy"):
        res = out[impl]
        assert len(res["step_s"]) == 2 and res["peak_rss_mb"] > 0
        assert res["losses"][0] == pytest.approx(first, rel=1e-5), impl  # same start
    assert set(out["cpu"]["ops"]) >= {"matmul_forward", "matmul_backward", "adamw_update"}
    assert out["torch_over_cpu"] > 0 and out["cpu_vs_sgemm_bound"] > 0


def test_bench_gpu_ours_and_summary():
    """`bench gpu`'s own side, op table included, and its report, on a small model (in
    Triton's interpreter where there is no GPU); the baseline needs a GPU."""
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    # GPT-2's vocabulary (the data's token ids), everything else small: the interpreter is slow
    cfg, B, T = GPT2Config(max_seq_len=16, num_layers=2, num_heads=2, channels=32), 2, 16
    data = bench.batches(cfg, B, T, 2)          # one untimed step and one timed
    host = bench.GPT2(cfg, bench.get_backend("numpy"))
    bench.init_weights(host, 0)
    seconds, losses, extra = bench.ours(cfg, host.params.buf, data, warmup=1)
    assert seconds > 0 and len(losses) == 2 and all(math.isfinite(x) for x in losses)
    ops = extra["ops"]
    assert ops["attention_backward"][0] == cfg.num_layers
    assert ops["residual_layernorm_forward"][0] == 2 * cfg.num_layers
    # the GPU's time per kernel; none in the interpreter
    assert (extra["kernels"] is None) == (bench.DEVICE.type != "cuda")
    # three kernels, one overlapping another, and two gaps: 2 us after a, 5 us after b
    gaps = bench.idle_gaps([(12, 20, "b"), (0, 10, "a"), (15, 18, "c"), (25, 30, "d")])
    assert gaps == {"span_ms": 0.03, "idle_ms": 0.007,
                    "largest": [[0.005, "b", "d"], [0.002, "a", "b"]]}
    side = {"ms_per_step": 1e3 * seconds, "tokens_per_s": B * T / seconds, "mfu": 0.0,
            "peak_memory_gib": 0.0, "first_loss": losses[0], "last_loss": losses[-1],
            "kernels": {"nvjet_tst_128x256": [3, 5.0], "_layernorm_forward_kernel": [2, 1.5],
                        "Memset (Device)": [1, 0.25]}, "gaps": gaps}
    timing = {"ms": 1.0, "tflops": 1.0}
    r = {
        "device": "cpu", "date": "today", "commit": "abc", "torch": "t", "triton": "t",
        "model": "tiny", "training": {"B": B, "T": T, "ours": {**side, **extra},
                                      "ours_stored_gelu": {**side, **extra}, "baseline": side,
                                      "speedup": 1.0, "speedup_stored_gelu": 1.1},
        "attention": {"B": B, "T": T, "NH": 4, "hs": 32, "ours_fwd": timing,
                      "sdpa_fwd": timing, "ours_fwd_bwd": timing, "sdpa_fwd_bwd": timing},
        "tuned": {**bench.tuned_configs(), "_k (64,)": "BLOCK: 64"}}
    report = bench.summary(r)
    assert "ours_stored_gelu" in report
    assert "every GELU output kept (--no-recompute-gelu): 1.100x" in report
    # the interpreter has no GPU memory to fill: train.py recomputes there, as llm.c by default;
    # on a GPU this small model fits with every GELU output kept
    assert ("train's default at this B on this GPU: every GELU output kept (they fit): 1.100x"
            if bench.DEVICE.type == "cuda" else
            "train's default at this B on this GPU: GELU recomputed: 1.000x") in report
    assert "tuned: _k (64,): BLOCK: 64" in report
    assert "attention_backward" in report and "(outside the ops)" in report
    assert "queued by the host" in report
    assert "6.75 ms in kernels, 5.00 ms of them in matmuls" in report
    assert re.search(r"1.50 ms +2x _layernorm_forward_kernel\n +0.25 ms +1x Memset", report)
    assert "idle between its kernels: 0.01 ms of the 0.03 ms" in report
    assert re.search(r"0.005 ms after b \| before d\n +0.002 ms after a \| before b", report)
    assert extra["planned_memory_gib"] > 0 and "the buffers' own sizes" in report
    # a side that failed on the GPU is reported, and the rest of the report still printed
    assert bench.survive(lambda: 1 / 0) == {"error": "ZeroDivisionError: division by zero",
                                            "oom": False}
    assert bench.survive(torch_oom)["oom"]
    failed = bench.summary({**r, "training": {**r["training"], "baseline": {"error": "E: x"}},
                            "attention": {**r["attention"], "sdpa_fwd": {"error": "E: y"}}})
    assert re.search("baseline +failed: E: x", failed) and "vs SDPA failed" in failed


def torch_oom():
    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")


def test_bench_sample_runs():
    r = llmpy("bench", "sample", "--model", "tiny", "--tokens", 4, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["same_tokens"] and out["speedup"] > 0
    if importlib.util.find_spec("transformers") is None:
        assert "transformers" in out["hf_skipped"]
        return
    assert out["hf_skipped"] is None
    assert out["hf_tokens_per_s"] == pytest.approx(4 / out["hf_s"])
    assert out["hf_over_kv_cache"] == pytest.approx(out["hf_s"] / out["kv_cache_s"])


def test_bench_sample_without_transformers(monkeypatch, capsys):
    """The HF baseline is skipped with its reason, in one line, and the rest still runs."""
    monkeypatch.setitem(sys.modules, "transformers", None)        # import fails
    assert main(["bench", "sample", "--model", "tiny", "--tokens", "2"]) == 0
    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "skipped: needs transformers (pip install" in skipped[0]
    assert "KV cache is" in out and "HF generate takes" not in out


def test_bench_cpu_bad_model():
    assert_one_line_error(llmpy("bench", "cpu", "--model", "d13"), "--model d13")


@pytest.mark.parametrize("args, words", [
    (["sample", "--tokens", 0], ["--tokens", "got 0"]),
    (["sample", "--tokens", 2, "-b", 0], ["--batch-size", "got 0"]),
    (["sample", "--tokens", 2, "-t", -1], ["--seq-len", "got -1"]),
    (["sample", "--seed", -1], ["--seed"]),
    (["cpu", "-b", 0, "--impls", "numpy"], ["--batch-size", "got 0"]),
    (["cpu", "-t", 0, "--impls", "numpy"], ["--seq-len", "got 0"]),
    (["cpu", "--warmup", -1, "--impls", "numpy"], ["--warmup"]),
    (["cpu", "--threads", -2, "--impls", "numpy"], ["--threads"])])
def test_bench_bad_flags_fail_before_any_work(args, words):
    r = cli("bench", *args[:1], "--model", "tiny", *args[1:])
    assert_one_line_error(r, *words)
    assert r.stdout == ""


def test_bench_help():
    """Each benchmark's own description; bench sample's -b and -t are its baseline's shape."""
    cpu, sample = help_text("bench", "cpu"), help_text("bench", "sample")
    assert "bench cpu: a training step" in cpu and "bench sample" not in cpu
    assert "B of the full recompute" in sample and "clamped to the model's maxT" in sample


def test_bench_fineweb_runs_on_every_token(tmp_path, gpt2_reference):
    """bench_fineweb.py on ~200 KB: it exits 0 only when every case wrote llm.c's bytes, and the
    shards hold the corpus's tokens, counted here with tiktoken's own GPT-2."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet  # noqa: F401
    bench = os.path.join(os.path.dirname(__file__), "..", "bench", "bench_fineweb.py")
    r = subprocess.run([sys.executable, bench, "--mb", "0.2", "--shard-tokens", "20000",
                        "--repeats", "1", "--json"], capture_output=True, text=True,
                       env={**os.environ, "TMPDIR": str(tmp_path)})   # the corpus cache
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    texts = pa.parquet.read_table(out["corpus"]["folder"], columns=["text"])["text"].to_pylist()
    tokens = sum(len(gpt2_reference.encode_ordinary(t)) + 1 for t in texts)
    assert out["corpus"]["tokens"] == tokens and out["same_bytes"]
    assert out["corpus"]["shards"] == -(-tokens // 20000) > 1
    assert any(not t.isascii() for t in texts) and out["corpus"]["files"] > 1
    # llm.c's cores - 2 processes, all cores where that differs, ours
    assert len(out["cases"]) == (2 if os.cpu_count() > 1 else 1) + 1
    for case in out["cases"].values():
        assert case["median_s"] > 0 and case["tokens_per_s"] == tokens / case["median_s"]


def test_a_failing_worker_is_one_line():
    """A worker that runs out of memory (a batch no machine holds): one line naming the job and
    the error, not the worker's traceback and then the parent's."""
    r = llmpy("bench", "cpu", "--model", "tiny", "-b", 10 ** 12, "-t", 8, "--impls", "numpy")
    assert_one_line_error(r, "the sgemm worker on --model tiny failed: ", "MemoryError")
    assert "Traceback" not in r.stdout


def test_the_worker_imports_this_llmpy(tmp_path, monkeypatch):
    """Run from a directory holding another `llmpy` (a clone's, say), the worker still imports
    the llmpy that runs the benchmark, as the parent does."""
    fake = tmp_path / "llmpy" / "bench"
    fake.mkdir(parents=True)
    (tmp_path / "llmpy" / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "__main__.py").write_text("raise SystemExit('the llmpy of the current directory')")
    monkeypatch.chdir(tmp_path)
    r = cli("bench", "cpu", "--model", "tiny", "-b", 2, "-t", 8, "--steps", 1, "--warmup", 0,
            "--threads", 1, "--impls", "numpy", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["numpy"]["step_s"][0] > 0
