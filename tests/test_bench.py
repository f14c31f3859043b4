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

import numpy as np
import pytest

from llmpy.backends import set_thread_env
from llmpy.cli import main
from llmpy.model.layout import GPT2Config
from llmpy.model.build import PRESETS, preset
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
    # the matmuls replayed after each step leave training as it was
    for impl in ("cpu", "numpy"):
        assert out[impl]["losses"] == pytest.approx(out["torch"]["losses"], rel=1e-5), impl
        assert len(out[impl]["matmuls_s"]) == 2
    assert out["cpu_vs_matmuls_alone"] > 0
    assert set(out["cpu"]["ops"]) >= {"matmul_forward", "matmul_backward", "adamw_update"}
    assert out["torch_over_cpu"] > 0 and out["cpu_vs_sgemm_bound"] > 0


@pytest.mark.parametrize("spec", ["tiny", "llama-tiny"])
def test_replayed_matmuls_leave_training_as_it_was(spec):
    """bench cpu replays each step's matmul calls after it: the losses of the steps that follow
    are those of training without the replay, bit for bit, for GPT-2 and the decoder."""
    import llmpy.bench as bench
    from llmpy.backends import get_backend
    from llmpy.model.build import build_model
    from llmpy.train.optim import AdamW
    from llmpy.train.step import train_step
    records, _ = bench.train_llmpy(spec, "numpy", 2, 8, 0, 3)
    model = build_model(spec, get_backend("numpy"))
    opt, batch = AdamW(model), bench.make_batch(model.config, 2, 8)
    assert [r[0] for r in records] == [train_step(model, opt, [batch]).loss for _ in range(3)]
    assert all(r[3] > 0 for r in records)


def test_bench_gpu_ours_and_summary():
    """`bench gpu`'s own side, op table included, and its report, on a small model (in
    Triton's interpreter where there is no GPU); the baseline needs a GPU."""
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    B, T = 2, 16
    family, cfg, flat = bench.bench_config("d12", T, dry_run=True)     # d12's family, tiny
    assert family == "gpt2" and cfg.num_layers == 1
    step, details, info = bench.ours(family, cfg, flat)(B, T)
    data = bench.batches(cfg, B, T, 2)
    losses = [step(*xy) for xy in data]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    extra = details(*data[-1])
    ops = extra["ops"]
    assert ops["attention_backward"][0] == cfg.num_layers
    assert ops["residual_layernorm_forward"][0] == 2 * cfg.num_layers
    # the GPU's time per kernel; none in the interpreter
    assert (extra["kernels"] is None) == (bench.DEVICE.type != "cuda")
    # three kernels, one overlapping another, and two gaps: 2 us after a, 5 us after b
    gaps = bench.idle_gaps([(12, 20, "b"), (0, 10, "a"), (15, 18, "c"), (25, 30, "d")])
    assert gaps == {"span_ms": 0.03, "idle_ms": 0.007,
                    "largest": [[0.005, "b", "d"], [0.002, "a", "b"]]}
    side = {"ms_per_step": 1.0, "tokens_per_s": B * T / 1e-3, "mfu": 0.0,
            "peak_memory_gib": None, "first_loss": losses[0], "last_loss": losses[-1],
            "kernels": {"nvjet_tst_128x256": [3, 5.0], "_layernorm_forward_kernel": [2, 1.5],
                        "Memset (Device)": [1, 0.25]}, "gaps": gaps}
    timing = {"ms": 1.0, "tflops": 1.0}
    spread = {"min": 0.9, "median": 1.0, "max": 1.2}
    r = {
        "device": "cpu", "date": "today", "commit": "abc", "torch": "t", "triton": "t",
        "model": "d12", "family": "gpt2",
        "tracking": {"B": 4, "T": 256, "steps": 20, "dtype": "bfloat16", "max_abs_diff": 0.0123,
                     "tolerance": 0.01, "within": False},
        "training": {"B": B, "T": T, "mode": "alternating runs", "block": 5, "blocks": 4,
                     "did_not_fit": [64], "ours": {**side, **info, **extra},
                     "ours_stored_gelu": {**side, **info, **extra}, "baseline": side,
                     "speedup": 1.0, "speedup_spread": spread, "speedup_stored_gelu": 1.1,
                     "speedup_stored_gelu_spread": spread},
        "attention": {"B": B, "T": T, "NH": 4, "NKV": 4, "hs": 32, "ours_fwd": timing,
                      "sdpa_fwd": timing, "ours_fwd_bwd": timing, "sdpa_fwd_bwd": timing},
        "tuned": {**bench.tuned_configs(), "_k (64,)": "BLOCK: 64"}}
    report = bench.summary(r)
    assert "largest loss difference 0.0123 (OVER 0.01)" in report
    assert "4 blocks of 5 timed steps a side, alternating whole runs; did not fit at B=[64]" \
        in report
    assert ("speedup (tokens/s, ours / nanoGPT + torch.compile): 1.000x (per block of 5 steps: "
            "min 0.900x, median 1.000x, max 1.200x)") in report
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


def test_bench_gpu_model_from_a_hf_directory(tmp_path):
    """--model DIR: its family from config.json, its config and weights as written; a T past
    its max_position_embeddings is one line."""
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    from llmpy.io.hf import write_hf
    from llmpy.io.llama3 import write_llama_hf
    from llmpy.model import llama
    cfg = llama.preset("llama-tiny", max_seq_len=64)
    flat = bench.initial_weights("decoder", cfg, seed=3)
    write_llama_hf(str(tmp_path / "llama"), cfg, flat)
    gcfg = GPT2Config(max_seq_len=32, num_layers=1, num_heads=2, channels=32)
    gflat = bench.initial_weights("gpt2", gcfg, seed=4)
    write_hf(str(tmp_path / "gpt2"), gcfg, gflat)
    family, got_cfg, got = bench.bench_config(str(tmp_path / "llama"), 64)
    assert family == "decoder" and got_cfg.num_kv_heads == 2 and np.array_equal(got, flat)
    family, got_cfg, got = bench.bench_config(str(tmp_path / "gpt2"), 32)
    assert family == "gpt2" and got_cfg == gcfg and np.array_equal(got, gflat)
    with pytest.raises(bench.LlmpyError, match="--seq-len 128 is longer than .* 64$"):
        bench.bench_config(str(tmp_path / "llama"), 128)


class FakeGPU:
    """Sides whose models take `size` units of memory per batch row on a GPU of `capacity`
    units, each freed when the driver lets go of its step: what run_at and throughput see."""

    def __init__(self, capacity, sizes):
        self.capacity, self.sizes, self.held, self.log = capacity, sizes, {}, []

    def side(self, name):
        import weakref
        import torch

        def make(B, T):
            if sum(self.held.values()) + self.sizes[name] * B > self.capacity:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            model = type("Model", (), {})()        # the memory, held by the step
            self.held[name] = self.sizes[name] * B
            weakref.finalize(model, self.held.pop, name)
            self.log.append(f"build {name}")

            def step(x, y):
                model.steps = getattr(model, "steps", 0) + 1
                self.log.append(name)
                return 1.0
            return step, lambda x, y: {"details": name}, {}
        return make


def fake_throughput(bench, gpu, batch_sizes, steps=4, block=2):
    cfg = GPT2Config(max_seq_len=8, num_layers=1, num_heads=1, channels=8)
    named = [(name, gpu.side(name), name == "ours_extra") for name in gpu.sizes]
    return bench.throughput("gpt2", cfg, None, batch_sizes, 8, steps, 1, block,
                            make_sides=lambda *_: named)


def test_bench_gpu_interleaves_sides_that_fit_together():
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    gpu = FakeGPU(capacity=10, sizes={"baseline": 2, "ours": 1, "ours_extra": 2})
    r = fake_throughput(bench, gpu, [2])
    assert r["mode"] == "interleaved" and r["B"] == 2 and r["did_not_fit"] == []
    # each built once, warmed up, then blocks of 2 steps, the order reversed every block
    assert gpu.log == ["build baseline", "baseline", "build ours", "ours", "build ours_extra",
                       "ours_extra"] + ["baseline"] * 2 + ["ours"] * 2 + ["ours_extra"] * 4 + \
        ["ours"] * 2 + ["baseline"] * 2
    assert gpu.held == {}                                   # all freed
    for name in ("ours", "baseline", "ours_extra"):
        assert len(r[name]["block_ms"]) == 2 and r[name]["details"] == name
    base, ours = r["baseline"]["block_ms"], r["ours"]["block_ms"]
    assert r["speedup"] == pytest.approx(sum(base) / sum(ours))
    ratios = sorted(b / o for b, o in zip(base, ours))
    assert r["speedup_spread"] == pytest.approx({"min": ratios[0], "median": sum(ratios) / 2,
                                                 "max": ratios[1]})
    assert "speedup_extra" in r


def test_bench_gpu_alternates_runs_and_searches_down():
    """At B=4 the baseline alone does not fit: the next B. At B=2 each fits alone but not
    together: the baseline goes on alone with the first half of its blocks, ours runs both its
    halves, then the baseline again (ABBA); an optional side that does not fit alone is
    reported, not retried."""
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    gpu = FakeGPU(capacity=5, sizes={"baseline": 2, "ours": 2, "ours_extra": 3})
    r = fake_throughput(bench, gpu, [2, 4], steps=8)
    assert r["B"] == 2 and r["did_not_fit"] == [4] and r["mode"] == "alternating runs"
    # B=4 built nothing; at B=2 ours did not fit beside the baseline, ours_extra not alone;
    # ours is built anew for its second half (ours_extra's runs came between)
    assert gpu.log == ["build baseline", "baseline"] + ["baseline"] * 4 + 2 * (
        ["build ours", "ours"] + ["ours"] * 4) + ["build baseline", "baseline"] + ["baseline"] * 4
    assert gpu.held == {}
    assert r["ours_extra"]["oom"] and "speedup_extra" not in r
    assert len(r["ours"]["block_ms"]) == len(r["baseline"]["block_ms"]) == 4
    assert r["baseline"]["details"] == "baseline" and r["ours"]["details"] == "ours"
    # nothing fits: one line
    with pytest.raises(bench.LlmpyError, match=r"no batch size in \[8\] fits"):
        fake_throughput(bench, FakeGPU(capacity=5, sizes={"baseline": 1, "ours": 1}), [8])


def test_gpu_session_dry_run(tmp_path):
    """bench/gpu_session.sh --dry-run: the GPU session's script end to end on the CPU, in
    Triton's interpreter at tiny shapes of each model it benchmarks (about 45 s of CPU). Each
    model's raw JSON: both sides trained from the same weights on the same batches, in
    interleaved blocks, and ours in float16 tracked float32."""
    bench = pytest.importorskip("llmpy.bench.gpu", reason="needs torch and triton")
    pytest.importorskip("transformers")
    if bench.DEVICE.type == "cuda":
        pytest.skip("the dry run is for machines without a GPU; on one, run the session")
    root = os.path.join(os.path.dirname(__file__), "..")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET",
                                                            "LLMPY_GPU_DTYPE")}
    r = subprocess.run(["bash", "bench/gpu_session.sh", "--dry-run"], cwd=root,
                       env={**env, "OUT": str(tmp_path)}, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "tests collected" in (tmp_path / "tests.log").read_text()
    session = (tmp_path / "session.txt").read_text()
    configs = {}
    for model in ("d12", "llama-3.2-1b", "gemma3-270m"):
        out = json.loads((tmp_path / f"bench_{model}.json").read_text())
        assert out["dry_run"] and out["model"] == model
        t, configs[model] = out["training"], out["config"]
        assert (t["B"], t["T"], t["mode"], t["blocks"], t["block"]) == (1, 8, "interleaved",
                                                                         2, 1)
        names = ["ours", "baseline"] + (["ours_stored_gelu"] if model == "d12" else [])
        for name in names:
            side = t[name]
            assert "error" not in side and "details_error" not in side, (model, name, side)
            assert len(side["block_ms"]) == 2 and side["tokens_per_s"] > 0
            # the same weights and first batch: the same first loss, to the baseline's bf16
            # autocast
            assert side["first_loss"] == pytest.approx(t["ours"]["first_loss"], rel=1e-3)
            assert 0 < side["last_loss"] < side["first_loss"] + 1
        assert t["speedup"] == pytest.approx(sum(t["baseline"]["block_ms"])
                                             / sum(t["ours"]["block_ms"]))
        s = t["speedup_spread"]
        assert 0 < s["min"] <= s["median"] <= s["max"]
        k = out["tracking"]
        assert k["dtype"] == "float16" and len(k["losses"]["float32"]) == 2 and k["within"]
        assert out["attention"]["ours_fwd_bwd"]["ms"] > 0
        assert f"--- bench {model}:" in session and f"{model} B=1 T=8 | DRY RUN" in session
    # each model's tiny shape keeps what its kernels branch on
    llama_cfg, gemma_cfg = configs["llama-3.2-1b"], configs["gemma3-270m"]
    assert llama_cfg["num_heads"] // llama_cfg["num_kv_heads"] == 4
    assert llama_cfg["layer_types"] == ["full"] and llama_cfg["rope_scaling"]
    assert gemma_cfg["layer_types"] == ["sliding", "full"] and gemma_cfg["sliding_window"] == 4
    assert gemma_cfg["qk_norm"] and gemma_cfg["post_norms"] and gemma_cfg["head_dim"] == 16


def test_gpu_session_models_are_compiled_for_an_h100():
    """tests/gpu_compile.py compiles the decoder's kernels as bench/gpu_session.sh's decoders
    launch them: the same presets at the same T."""
    root = os.path.join(os.path.dirname(__file__), "..")
    script = open(os.path.join(root, "bench", "gpu_session.sh")).read()
    models = re.search(r"^models=\((.*)\)$", script, re.M).group(1)
    session = {spec.split()[0]: int(re.search(r"-t (\d+)", spec).group(1))
               for spec in re.findall(r'"([^"]+)"', models)}
    assert set(session) == {"d12", "llama-3.2-1b", "gemma3-270m"}
    # imported in a process of its own: it makes torch see a GPU
    r = subprocess.run([sys.executable, "-c", "import json, gpu_compile as g; print(json.dumps("
                        "[g.BENCH_T, list(g.DECODERS)]))"], cwd=os.path.dirname(__file__),
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": root})
    assert r.returncode == 0, r.stderr
    T, compiled = json.loads(r.stdout)
    decoders = {m: t for m, t in session.items() if m not in PRESETS}
    assert decoders and set(decoders) <= set(compiled) and set(decoders.values()) == {T}


def torch_oom():
    raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate")


def test_bench_sample_runs():
    r = llmpy("bench", "sample", "--model", "tiny", "--tokens", 4, "--repeats", 2, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["same_tokens"] and out["speedup"] > 0
    assert len(out["kv_cache_runs_s"]) == 2 and out["kv_cache_s"] == min(out["kv_cache_runs_s"])
    if importlib.util.find_spec("transformers") is None:
        assert "transformers" in out["hf_skipped"]
        return
    assert out["hf_skipped"] is None
    assert len(out["hf_runs_s"]) == 2 and out["hf_s"] == min(out["hf_runs_s"])
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
    (["sample", "--repeats", 0], ["--repeats", "got 0"]),
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


def test_baseline_workers_run_without_our_thread_settings(monkeypatch):
    """PyTorch's process gets the user's environment, not the OpenMP spin count that
    set_thread_env chose for ours; ours and the sgemm bound get it."""
    import llmpy.bench as bench
    seen = {}

    def run(cmd, env, **kw):
        seen[json.loads(cmd[-1])["impl"]] = env
        return subprocess.CompletedProcess(cmd, 0, stdout="{}\n", stderr="")
    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("LLMPY_THREAD_ENV", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    set_thread_env()
    for impl in ("torch", "hf_sample", "cpu", "sgemm"):
        bench.run_worker({"impl": impl, "threads": 2, "model": "tiny"})
    for impl in ("torch", "hf_sample"):
        assert "GOMP_SPINCOUNT" not in seen[impl] and seen[impl]["OMP_NUM_THREADS"] == "2"
    for impl in ("cpu", "sgemm"):
        assert seen[impl]["GOMP_SPINCOUNT"] == "500"


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
