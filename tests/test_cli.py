"""The command line as a user meets it: help, the embedded default, and bad input (one line on
stderr naming the problem, exit code 1, never a traceback)."""
import io
import os
import struct
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

from llmpy.io.modelfile import num_params
from llmpy.cli import main
from llmpy.data.loader import bundled_data
from llmpy.model.layout import GPT2Config
from test_gpt2 import write_llmc_model, write_llmc_tokens

CFG = GPT2Config(max_seq_len=16, vocab_size=90, num_layers=1, num_heads=2, channels=8)


def llmpy(*args):
    return subprocess.run([sys.executable, "-m", "llmpy", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def cli(*args):
    """`llmpy ARGS` in this process: starting Python, numpy and torch is most of a small
    command's time. A few tests run the real console command, llmpy(), as well."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def assert_one_line_error(r, *words):
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpy: error: "), r.stderr
    for w in words:
        assert str(w) in lines[0], (w, lines[0])


@pytest.fixture
def files(tmp_path):
    flat = np.random.default_rng(0).normal(0, 0.02, num_params(CFG))
    write_llmc_model(tmp_path / "m.bin", CFG, flat)
    write_llmc_tokens(tmp_path / "d.bin", np.arange(500) % CFG.vocab_size)
    return tmp_path


def train(files, *extra, model="m.bin", data="d.bin"):
    return llmpy("train", "--model", files / model, "--train-data", files / data,
                 "--val-every", "0", "--sample-every", "0", "--steps", "1", "-b", 2, "-t", 8, *extra)


@pytest.mark.parametrize("cmd", [[], ["train"], ["eval"], ["sample"]])
def test_help(cmd):
    r = llmpy(*cmd, "--help")
    assert r.returncode == 0 and "usage: llmpy" in r.stdout


def test_embedded_default_trains_and_samples(tmp_path):
    r = llmpy("train", "--steps", "2", "--val-every", "1", "--val-batches", "1",
              "--sample-every", "2", "--sample-tokens", "16", "--run-dir", tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert "embedded default" in r.stdout and "val loss" in r.stdout
    sample = r.stdout.split("--- sample at step 2 ---\n")[1].split("\n---")[0]
    assert sum(c.isalpha() for c in sample) >= 16     # decoded text, not token ids


def test_train_runs_on_llmc_files(files):
    r = train(files, "--save", files / "out.bin")
    assert r.returncode == 0, r.stderr
    assert "step    1/1" in r.stdout and (files / "out.bin").stat().st_size == \
        (files / "m.bin").stat().st_size


def test_missing_files(files):
    assert_one_line_error(train(files, model="nope.bin"), "nope.bin", "no such file")
    assert_one_line_error(train(files, data="nope.bin"), "nope.bin", "no such file")


def test_bad_model_files(files):
    raw = (files / "m.bin").read_bytes()
    (files / "magic.bin").write_bytes(struct.pack("<i", 1234) + raw[4:])
    assert_one_line_error(train(files, model="magic.bin"), "magic.bin", "bad magic", 1234)
    (files / "version.bin").write_bytes(raw[:4] + struct.pack("<i", 4) + raw[8:])
    assert_one_line_error(train(files, model="version.bin"), "version.bin", "version 4")
    (files / "short.bin").write_bytes(raw[:-10])
    assert_one_line_error(train(files, model="short.bin"), "short.bin", "truncated")
    (files / "header.bin").write_bytes(raw[:100])
    assert_one_line_error(train(files, model="header.bin"), "header.bin", "truncated")
    (files / "heads.bin").write_bytes(raw[:20] + struct.pack("<i", 0) + raw[24:])   # NH = 0
    assert_one_line_error(train(files, model="heads.bin"), "heads.bin", "num_heads 0")


def test_bad_data_files(files):
    write_llmc_tokens(files / "big.bin", [1, 2, CFG.vocab_size, 3] * 5)     # 20: one batch
    assert_one_line_error(train(files, data="big.bin"), "big.bin", f"token id {CFG.vocab_size}")
    (files / "magic.bin").write_bytes(struct.pack("<256i", 20240521, 1, 4, *[0] * 253) + b"\0" * 8)
    assert_one_line_error(train(files, data="magic.bin"), "magic.bin", "bad magic")
    raw = (files / "d.bin").read_bytes()
    (files / "short.bin").write_bytes(raw[:-2])
    assert_one_line_error(train(files, data="short.bin"), "short.bin", "500 tokens")
    (files / "empty.bin").write_bytes(b"")
    assert_one_line_error(train(files, data="empty.bin"), "empty.bin", "empty")
    np.r_[np.arange(20), -3].astype("<i4").tofile(files / "legacy.bin")   # headerless int32
    assert_one_line_error(train(files, data="legacy.bin"), "legacy.bin", "negative token id")


def test_bad_shapes(files):
    assert_one_line_error(train(files, "-t", 17), "17", "max_seq_len 16")
    # the first sample may come hours in: its problems are found before the first step
    assert_one_line_error(train(files, "--sample-every", 5, "--sample-tokens", 17),
                          "--sample-tokens 17", "max_seq_len 16")
    assert_one_line_error(train(files, "--sample-every", 5, "--sample-tokens", 8),
                          "vocabulary has 90 tokens", "--sample-every 0")
    assert_one_line_error(train(files, "-b", 40, "-t", 16), "d.bin", "too few", "641")


def test_nan_loss_stops(files):
    write_llmc_model(files / "nan.bin", CFG, np.full(num_params(CFG), np.nan))
    assert_one_line_error(train(files, "--save", files / "out.bin", model="nan.bin"),
                          "step 1", "nan")
    assert not (files / "out.bin").exists()


def test_bad_flags_fail_before_training(files):
    assert_one_line_error(train(files, "-b", 0), "--batch-size must be at least 1")
    assert_one_line_error(train(files, "--save", files), str(files), "names a directory")
    (files / "afile").write_text("")
    # before the first step, not when the run ends and writes it
    r = train(files, "--save", files / "afile" / "out.bin")
    assert_one_line_error(r, f"{files / 'afile'}: is a file, not a directory")
    assert "step" not in r.stdout


def test_debug_state_checks_its_output_before_the_reference_runs(files, monkeypatch):
    import llmpy.debugstate

    def no_reference(what):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(llmpy.debugstate, "_torchref", no_reference)
    out = files / "none" / "s.bin"
    assert_one_line_error(cli("debug-state", files / "m.bin", "--out", out), str(out),
                          "no such directory")
    assert_one_line_error(cli("debug-state", files / "m.bin", "--out", files), str(files),
                          "is a directory")


# every numeric flag has its range (TrainConfig's bounds): (flag, value, words of the error)
OUT_OF_RANGE = [("--steps", -1, "at least 0"), ("--lr", "nan", "finite"),
                ("--final-lr-frac", "inf", "finite"), ("--warmup-steps", -5, "at least 0"),
                ("--grad-clip", -1, "at least 0"), ("--beta1", 2, "less than 1"),
                ("--beta2", 1, "less than 1"), ("--eps", 0, "greater than 0"),
                ("--weight-decay", -0.1, "at least 0"), ("--dist-timeout", 0, "greater than 0"),
                ("--checkpoint-every", -1, "at least 0"), ("--keep-last", -1, "at least 0"),
                ("--major-every", -1, "at least 0"), ("--val-every", -1, "at least 0"),
                ("--sample-every", -1, "at least 0"), ("--val-batches", -1, "at least 0"),
                ("--seed", -1, "at least 0"), ("--sample-temperature", "nan", "finite"),
                ("--sample-top-k", -1, "at least 0"), ("--total-batch-size", -1, "at least 0"),
                ("--skip-update-lossz", -1, "at least 0")]


@pytest.mark.parametrize("flag, value, words", OUT_OF_RANGE, ids=[c[0] for c in OUT_OF_RANGE])
def test_flags_out_of_range_fail_before_any_work(files, flag, value, words):
    r = cli("train", "--model", files / "m.bin", "--train-data", files / "d.bin", "--run-dir",
            files / "run", flag, value)
    assert_one_line_error(r, flag, words)
    assert r.stdout == "" and not (files / "run").exists()


def test_sample_tokens_and_val_batches_when_used(files):
    """--sample-tokens counts only when sampling; --val-batches must fit in the val data, as
    eval has it (the loader would wrap around and count windows twice)."""
    assert_one_line_error(cli("train", "--model", files / "m.bin", "--train-data",
                              files / "d.bin", "--sample-tokens", 0), "--sample-tokens", "got 0")
    r = cli("train", "--model", files / "m.bin", "--train-data", files / "d.bin", "--steps", 0,
            "-b", 2, "-t", 8, "--sample-every", 0, "--sample-tokens", -3)
    assert r.returncode == 0, r.stderr
    r = cli("train", "--model", files / "m.bin", "--train-data", files / "d.bin", "--val-data",
            files / "d.bin", "-b", 2, "-t", 8, "--val-batches", 32, "--sample-every", 0)
    assert_one_line_error(r, "d.bin", "--val-batches 32", "holds 31 batches")  # 499 // 16
    assert "step" not in r.stdout


def help_text(*cmd):
    """`llmpy CMD --help`, its whitespace made single spaces (argparse wraps the lines)."""
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        main([*cmd, "--help"])
    return " ".join(out.getvalue().split())


def test_help_says_what_runs():
    """train --help lists what the embedded default changes, as train applies it; the model
    arguments that take any model say so; eval's --model is required."""
    from llmpy.train.config import EMBEDDED_DEFAULT, TrainConfig
    from llmpy.train.config import apply_embedded_default
    text = help_text("train")
    listed = text.split("bundled Shakespeare, with ")[1].split(" in place of")[0].split(" --")
    cfg = TrainConfig()
    apply_embedded_default(cfg, set())
    assert {f.lstrip("-").split()[0].replace("-", "_") for f in listed} == set(EMBEDDED_DEFAULT)
    for flag in listed:
        name, *value = flag.lstrip("-").split()       # a bare --flag is a True boolean
        assert str(getattr(cfg, name.replace("-", "_"))) == (value or ["True"])[0], flag
    assert "flags not given come from RUN_DIR/config.json" in text
    for cmd in (["sample"], ["test-model"]):
        assert "run directory" in help_text(*cmd) and "preset" in help_text(*cmd), cmd
    assert "llm.c model file" not in help_text("sample")
    assert "usage: llmpy eval [-h] --model MODEL" in help_text("eval")


def test_without_posix_only_calls(files, tmp_path):
    """What Windows lacks (os.fchmod before Python 3.13, os.getloadavg, the resource module),
    taken away in every process through a sitecustomize: training with checkpoints and --save,
    and both CPU benchmarks, still run (the benchmarks print n/a where a number is missing)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\n"
        "for name in ('fchmod', 'getloadavg'):\n"
        "    if hasattr(os, name):\n"
        "        delattr(os, name)\n"
        "sys.modules['resource'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    run = lambda *args: subprocess.run([sys.executable, "-m", "llmpy", *map(str, args)],  # noqa: E731
                                       capture_output=True, text=True, timeout=600, env=env)
    r = run("train", "--model", files / "m.bin", "--train-data", files / "d.bin", "--val-every",
            0, "--sample-every", 0, "--steps", 2, "-b", 2, "-t", 8, "--run-dir", tmp_path / "run",
            "--checkpoint-every", 1, "--save", tmp_path / "out.bin")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out.bin").exists() and (tmp_path / "run" / "ckpt_00000002").is_dir()
    r = run("bench", "cpu", "--model", "tiny", "-b", 2, "-t", 8, "--steps", 1, "--warmup", 0,
            "--impls", "numpy")
    assert r.returncode == 0, r.stderr
    assert "load average n/a" in r.stdout and "n/a MB" in r.stdout
    r = run("bench", "sample", "--model", "tiny", "--tokens", 2)
    assert r.returncode == 0 and "load average n/a" in r.stdout, r.stderr


def test_spawned_workers_and_a_narrow_console(tmp_path):
    """Two things a Windows or macOS laptop meets: tokenizer processes started by spawn (the
    default there) instead of fork, and a console whose encoding lacks characters of the text
    (replaced, instead of ending the run)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import multiprocessing\n"
                                           "multiprocessing.set_start_method('spawn')\n")
    text = (tmp_path / "big.txt")
    text.write_bytes(Path(bundled_data("shakespeare.txt")).read_bytes() * 2)  # 2 workers' worth
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH",
                                                                                  "")])}
    r = subprocess.run([sys.executable, "-m", "llmpy", "prepro", "text", str(text), "--out",
                        str(tmp_path / "out"), "--workers", "2"], capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["big_train_000001.bin", "big_val_000000.bin"]
    r = subprocess.run([sys.executable, "-m", "llmpy", "sample", "--model", "tiny", "--prompt",
                        "caf\u00e9 \u2603", "--tokens", "2", "--backend", "numpy"],
                       capture_output=True, timeout=600,
                       env={**os.environ, "PYTHONIOENCODING": "ascii"})
    assert r.returncode == 0 and r.stdout.startswith(b"caf? ?"), r.stderr
