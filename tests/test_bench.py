"""Smoke tests of `llmpy bench cpu` and `llmpy bench sample` on the tiny preset: they run, the
implementations they compare start from the same weights and batch, and the FLOP count is
right. (The benchmarks' numbers are recorded in bench/RESULTS.md, never asserted.)"""
import json

import pytest

from llmpy.config import preset
from test_cli import assert_one_line_error, llmpy


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


def test_bench_sample_runs():
    r = llmpy("bench", "sample", "--model", "tiny", "--tokens", 4, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["same_tokens"] and out["speedup"] > 0


def test_bench_cpu_bad_model():
    assert_one_line_error(llmpy("bench", "cpu", "--model", "d13"), "--model d13")
