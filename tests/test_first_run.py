"""A first run as a new user meets it: the embedded default trains into a run directory that it
names at the start, announces its checkpoints, says where it is (elapsed, ETA, val lines with
their step), ends in a summary with the next commands, and those commands work on it: sample
names the checkpoint it continues from, a resumed finished run says so, eval's JSON carries its
perplexity. Also --version, and the bundled corpus by its short name."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import llmpy

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
