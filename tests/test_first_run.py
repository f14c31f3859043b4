"""A first run as a new user meets it: the embedded default trains into a run directory that it
names at the start, announces its checkpoints, says where it is (elapsed, ETA, val lines with
their step), ends in a summary with the next commands, and those commands work on it: sample
names the checkpoint it continues from, a resumed finished run says so, eval's JSON carries its
perplexity. Also --version, and the bundled corpus by its short name."""
import io
import json
import math
import os
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

import llmpy
from llmpy.cli import main
from llmpy.data.loader import bundled_data
from llmpy.model.build import PRESETS, PRETRAINED

ROOT = Path(llmpy.__file__).resolve().parent.parent


def run(cwd, *args):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])}
    return subprocess.run([sys.executable, "-m", "llmpy", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_embedded_default_saves_its_run_and_says_what_next(tmp_path):
    r = run(tmp_path, "train", "--backend", "numpy", "--steps", "4", "--val-every", "2",
            "--val-batches", "1", "--sample-every", "4", "--sample-tokens", "24",
            "--checkpoint-every", "2")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"shakespeare-\d{8}-\d{6}", run_dir.name)
    rel = f"runs/{run_dir.name}"
    assert f"saved in {rel}" in out.splitlines()[0]
    assert re.search(r"step    3/4 \|.*\| [\d.]+s elapsed, ETA [\d.]+s", out)
    assert "step 2: val loss" in out and "step 4: val loss" in out
    assert f"saved checkpoint {rel}/ckpt_00000002" in out
    assert f"saved checkpoint {rel}/ckpt_00000004" in out
    sample = out.split("--- sample at step 4 ---\n")[1].split("\n---")[0]
    assert "<|endoftext|>" not in sample
    summary = out[out.index("done: 4 steps"):]
    last = json.loads((run_dir / "log.jsonl").read_text().splitlines()[-1])
    assert f"final train loss {last['train_loss']:.4f}" in summary
    assert f"val loss {last['val_loss']:.4f} over 1 batches" in summary
    assert f"{rel}/ckpt_00000004/model.bin" in summary and f"{rel}/log.jsonl" in summary
    assert f"llmpy sample --model {rel}" in summary and f"llmpy plot {rel}" in summary
    assert f"plot   {rel}/plot.png" in summary and (run_dir / "plot.png").exists()

    s = run(tmp_path, "sample", "--model", rel, "--backend", "numpy", "--tokens", "8")
    assert s.returncode == 0, s.stderr
    assert f"sampling from {rel}/ckpt_00000004" in s.stderr and "<|endoftext|>" not in s.stdout

    again = run(tmp_path, "train", "--run-dir", rel, "--resume")
    assert again.returncode == 0, again.stderr
    assert "already finished at step 4 (--steps 4)" in again.stdout
    assert "step    1/" not in again.stdout

    e = run(tmp_path, "eval", "--model", rel, "--json")
    assert e.returncode == 0, e.stderr
    res = json.loads(e.stdout)
    assert res["val_perplexity"] == math.exp(res["val_loss"])
    # the run's val batches (1), as its log has the last val loss
    assert abs(res["val_loss"] - last["val_loss"]) < 1e-5 * last["val_loss"]
    text = run(tmp_path, "eval", "--model", rel)
    assert f"perplexity {res['val_perplexity']:.2f}" in text.stdout
    assert f"L={res['num_layers']} C={res['channels']}" in text.stdout


def test_version():
    r = run(ROOT, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmpy {llmpy.__version__}"


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def test_bundled_corpus_by_short_name(tmp_path):
    """--train-data/--val-data shakespeare: the bundled files, as the run's config records."""
    rc, out, err = cli("train", "--model", "tiny", "--train-data", "shakespeare", "--val-data",
                       "shakespeare", "--backend", "numpy", "--steps", "1", "--val-batches", "1",
                       "--sample-every", "0", "--run-dir", tmp_path / "r",
                       "--checkpoint-every", "1")
    assert rc == 0, err
    flags = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert flags["train_data"] == bundled_data("shakespeare_train.bin")
    assert flags["val_data"] == bundled_data("shakespeare_val.bin")
    rc, out, err = cli("eval", "--model", tmp_path / "r", "--val-data", "shakespeare",
                       "--val-batches", "2", "--json")
    assert rc == 0 and json.loads(out)["val_data"] == bundled_data("shakespeare_val.bin")


def test_local_paths_are_checked_before_the_hub(tmp_path, monkeypatch):
    """A missing data file fails at once, before --model gpt2 goes to the hub; an unknown
    model name lists the names there are."""
    from llmpy.io import hf
    monkeypatch.setattr(hf, "download", lambda name: pytest.fail(f"{name} went to the hub"))
    for cmd in (["train", "--model", "gpt2", "--train-data", tmp_path / "nope.bin"],
                ["train", "--model", "gpt2", "--train-data", "shakespeare", "--val-data",
                 tmp_path / "nope.bin"],
                ["eval", "--model", "gpt2", "--val-data", tmp_path / "nope.bin"]):
        rc, out, err = cli(*cmd)
        assert rc == 1 and err.strip() == f"llmpy: error: {tmp_path / 'nope.bin'}: no such file"
    rc, out, err = cli("train", "--model", "gpt3", "--train-data", "shakespeare")
    assert rc == 1 and len(err.strip().splitlines()) == 1
    assert "gpt3: no such file or directory" in err
    for name in PRESETS + tuple(PRETRAINED):
        assert name in err
