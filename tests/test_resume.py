"""Crash safety: a training process SIGKILLed at random moments (one of them inside a
checkpoint write) and resumed with --resume logs the same per-step losses, bit for bit, as an
uninterrupted run; checkpoints rotate (keep-last K, major ones kept); bad checkpoints and run
directories give one line and exit 1."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import llmpy.train.checkpoints
import llmpy.train.loop
from conftest import BACKENDS
from llmpy import cli
from llmpy.backends import get_backend
from llmpy.io.modelfile import num_params, read_model, write_model
from llmpy.model.layout import GPT2Config
from llmpy.train.config import TrainConfig
from llmpy.data.loader import write_tokens
from llmpy.train.optim import get_lr
from llmpy.train.checkpoints import SLEEP_ENV
from llmpy.model.build import build_model

# the GPT-2 vocab, so that samples can start at <|endoftext|>
CFG = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=8)
STEPS = 80
TRAIN = ["--backend", "numpy", "-b", "2", "-t", "8", "--steps", str(STEPS), "--lr", "3e-3",
         "--shuffle",
         "--lr-schedule", "wsd", "--warmup-steps", "10", "--final-lr-frac", "0.0",
         "--val-every", "20", "--val-batches", "2", "--sample-every", "30", "--sample-tokens", "8",
         "--skip-update-lossz", "3", "--checkpoint-every", "5", "--keep-last", "2",
         "--major-every", "30"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    write_model(d / "model.bin", CFG, np.random.default_rng(0).normal(0, 0.05, num_params(CFG)))
    rng = np.random.default_rng(1)
    write_tokens(d / "train.bin", rng.integers(0, CFG.vocab_size, 500))   # ~31 steps an epoch
    write_tokens(d / "val.bin", rng.integers(0, CFG.vocab_size, 100))
    return d


def argv(files, run_dir, *extra):
    return ["train", "--model", str(files / "model.bin"), "--train-data", str(files / "train.bin"),
            "--val-data", str(files / "val.bin"), "--run-dir", str(run_dir), *TRAIN, *extra]


def spawn(args, env=None, quiet=False):
    out = subprocess.DEVNULL if quiet else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "llmpy", *args], stdout=out, stderr=out,
                            text=True, env={**os.environ, **(env or {})})


def records(run_dir):
    """The log's records, without the timings (which differ from run to run)."""
    out = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    for r in out:
        del r["ms"], r["tokens_per_s"]
    return out


def log_lines(run_dir):
    try:
        return (run_dir / "log.jsonl").read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for(cond, proc, timeout=60):
    end = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < end, "timed out"
        time.sleep(0.002)


def sample_at(stdout, step):
    return stdout.split(f"--- sample at step {step} ---\n")[1].split("\n---")[0]


def test_sigkill_anywhere_then_resume_is_bit_identical(files, tmp_path):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    ref = spawn(argv(files, ref_dir))
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err

    seed = int(time.time())
    print(f"kill moments from seed {seed}")
    rng = random.Random(seed)
    kills = 0
    for i in range(5):
        if i == 2:   # the process sleeps inside a checkpoint write: kill it there
            p = spawn(argv(files, run_dir, "--resume"), {SLEEP_ENV: "30"}, quiet=True)
            wait_for(lambda: any((d / "model.bin").exists() for d in run_dir.glob("ckpt_*.tmp")),
                     p)
            assert not list(run_dir.glob("ckpt_*.tmp/manifest.json"))
        else:        # after a random number of logged steps: in a step, an eval or a write
            p = spawn(argv(files, run_dir, "--resume"), quiet=True)
            target = log_lines(run_dir) + rng.randint(1, 15)
            wait_for(lambda: log_lines(run_dir) >= target, p)
        p.send_signal(signal.SIGKILL)
        p.communicate()
        kills += p.returncode == -signal.SIGKILL
    assert kills == 5
    final = spawn(argv(files, run_dir, "--resume"))
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert "resuming from" in out

    assert records(run_dir) == records(ref_dir)            # losses, lr, grad norms, val losses
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))
    assert sample_at(out, STEPS) == sample_at(ref_out, STEPS)   # the sampling RNG resumed too
    # keep the newest 2, plus the majors at multiples of 30; no debris of the killed writes
    assert sorted(d.name for d in run_dir.iterdir() if d.name.startswith("ckpt_")) == \
        [f"ckpt_{s:08d}" for s in (30, 60, 75, 80)]
    assert (run_dir / "ckpt_00000080" / "model.bin").read_bytes() == \
        (ref_dir / "ckpt_00000080" / "model.bin").read_bytes()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["total_batch_size"] == 0 and config["model"]["channels"] == 8
    assert "git_commit" in config


@pytest.mark.parametrize("backend", [be.name for be in BACKENDS if be.name in ("numpy", "cpu")])
def test_resume_is_bit_identical_on_every_cpu_backend(backend, tmp_path, monkeypatch):
    """A run that dies between checkpoints (an exception at step 7) and resumes logs the
    losses of an uninterrupted run exactly, on each CPU backend."""
    cfg = GPT2Config(max_seq_len=16, vocab_size=64, num_layers=2, num_heads=2, channels=16)
    write_model(tmp_path / "model.bin", cfg, np.random.default_rng(2).normal(0, 0.1,
                                                                              num_params(cfg)))
    write_tokens(tmp_path / "train.bin", np.random.default_rng(3).integers(0, 64, 300))
    args = dict(model=str(tmp_path / "model.bin"), train_data=str(tmp_path / "train.bin"),
                backend=backend, batch_size=2, seq_len=8, steps=12, lr=3e-3, shuffle=True,
                total_batch_size=32, lr_schedule="linear", val_every=0, sample_every=0,
                checkpoint_every=4, resume=True)
    llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "ref")))
    calls = []
    train_step = llmpy.train.loop.train_step

    def crash_at_7(*a):
        calls.append(1)
        if len(calls) == 7:
            raise RuntimeError("crash")
        return train_step(*a)
    monkeypatch.setattr(llmpy.train.loop, "train_step", crash_at_7)
    with pytest.raises(RuntimeError):
        llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "run")))
    monkeypatch.undo()
    assert len(records(tmp_path / "run")) == 6
    llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "run")))
    assert records(tmp_path / "run") == records(tmp_path / "ref")


def cli_error(capsys, args):
    rc = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("llmpy: error: "), err
    return err[0]


@pytest.fixture
def run4(files, tmp_path, capsys):
    """A finished 4-step run with checkpoints at steps 2 and 4."""
    run_dir = tmp_path / "run"
    args = argv(files, run_dir, "--steps", "4", "--checkpoint-every", "2", "--sample-every", "0")
    assert cli.main(args) == 0
    capsys.readouterr()
    return run_dir, args


def test_resume_takes_the_flags_it_is_not_given(run4, capsys, tmp_path):
    """`--run-dir D --resume` alone continues with the run's own flags (D/config.json): the
    same records as resuming with the whole command line again."""
    run_dir, args = run4
    shutil.copytree(run_dir, tmp_path / "again")
    assert cli.main(args + ["--resume", "--steps", "6"]) == 0
    assert cli.main(["train", "--run-dir", str(tmp_path / "again"), "--resume", "--steps",
                     "6"]) == 0
    out = capsys.readouterr().out
    assert "--lr 0.003" in out and "--shuffle" in out and "--steps" not in out.split(
        "resume: flags")[1].splitlines()[0]
    assert [r["step"] for r in records(run_dir)] == list(range(1, 7))
    assert records(tmp_path / "again") == records(run_dir)


def test_sample_from_a_run_directory(run4, capsys, tmp_path):
    """--model RUN_DIR: the newest complete checkpoint's weights."""
    run_dir, _ = run4
    args = ["sample", "--tokens", "6", "--seed", "3", "--backend", "numpy", "--model"]
    assert cli.main(args + [str(run_dir / "ckpt_00000004" / "model.bin")]) == 0
    want = capsys.readouterr().out
    assert cli.main(args + [str(run_dir)]) == 0
    assert capsys.readouterr().out == want
    (tmp_path / "empty").mkdir()
    msg = cli_error(capsys, args + [str(tmp_path / "empty")])
    assert str(tmp_path / "empty") in msg and "no complete checkpoint" in msg


def test_model_from_a_run_directory_takes_the_master_weights(run4, capsys):
    """A bf16 run's checkpoint holds its float32 master weights beside the rounded model.bin:
    --model RUN_DIR starts from those, as --resume does."""
    run_dir, _ = run4
    ckpt = run_dir / "ckpt_00000004"
    _, params = read_model(str(ckpt / "model.bin"))
    exact = params + np.float32(1e-3)
    exact.astype("<f4").tofile(ckpt / "adamw_master.bin")
    manifest = json.loads((ckpt / "manifest.json").read_text())    # listed, as save() does
    manifest["files"]["adamw_master.bin"] = exact.nbytes
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    model = build_model(str(run_dir), get_backend("numpy"))
    assert np.array_equal(model.params.buf, exact)
    (ckpt / "adamw_master.bin").write_bytes(bytes(8))
    msg = cli_error(capsys, ["sample", "--model", str(run_dir)])
    assert str(ckpt / "adamw_master.bin") in msg and "8 bytes" in msg


def test_debris_of_crashed_writes_and_deletes(run4, capsys, monkeypatch):
    """A checkpoint directory without its manifest is debris: a write that died before the
    manifest (which goes last), or a delete that died after the manifest (which goes first).
    --resume neither loads it nor keeps it."""
    run_dir, args = run4
    (run_dir / "ckpt_00000005").mkdir()                # a dead write, newer than step 4
    shutil.copy(run_dir / "ckpt_00000004" / "model.bin", run_dir / "ckpt_00000005")

    def rmtree_dies(path):                             # a process killed inside the delete
        os.remove(os.path.join(path, "model.bin"))
        raise KeyboardInterrupt
    monkeypatch.setattr(llmpy.train.checkpoints.shutil, "rmtree", rmtree_dies)
    with pytest.raises(KeyboardInterrupt):
        llmpy.train.checkpoints._remove(str(run_dir / "ckpt_00000002"))
    monkeypatch.undo()
    assert sorted(llmpy.train.checkpoints.checkpoints(run_dir)) == [4]
    assert cli.main(args + ["--resume", "--steps", "6"]) == 0
    assert f"resuming from {run_dir / 'ckpt_00000004'} (step 4)" in capsys.readouterr().out
    assert sorted(d.name for d in run_dir.iterdir() if d.name.startswith("ckpt_")) == \
        ["ckpt_00000004", "ckpt_00000006"]


def test_unreadable_run_config(run4, capsys):
    run_dir, args = run4
    config = run_dir / "config.json"
    saved = json.loads(config.read_text())
    config.write_text("{")
    msg = cli_error(capsys, ["train", "--run-dir", str(run_dir), "--resume"])
    assert str(config) in msg and "unreadable" in msg
    saved["train"]["steps"] = "10"                  # a hand edit: a string for an int
    config.write_text(json.dumps(saved))
    msg = cli_error(capsys, ["train", "--run-dir", str(run_dir), "--resume"])
    assert str(config) in msg and "steps: expected int, got '10'" in msg


def test_resume_from_python_keeps_what_the_config_sets(run4, capsys):
    """train(TrainConfig(...)) without `explicit`: the fields set (those that differ from the
    defaults) count as given, so --resume does not overwrite them."""
    run_dir, _ = run4
    cfg = TrainConfig(run_dir=str(run_dir), resume=True, steps=5, lr=1e-3)
    llmpy.train.loop.train(cfg)
    assert cfg.steps == 5 and cfg.lr == 1e-3 and cfg.batch_size == 2    # -b 2: from the run
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 5]
    # lr as given, the schedule as the run had it (wsd, 10 warm-up steps)
    assert records(run_dir)[-1]["lr"] == pytest.approx(get_lr(4, 1e-3, "wsd", 10, 5, 0.0))


def test_truncated_checkpoint(run4, capsys):
    run_dir, args = run4
    path = run_dir / "ckpt_00000004" / "adamw_v.bin"
    path.write_bytes(path.read_bytes()[:-4])
    msg = cli_error(capsys, args + ["--resume"])
    assert str(path) in msg and "truncated" in msg


def test_checkpoint_of_another_model_size(run4, capsys, files, tmp_path):
    run_dir, args = run4
    big = GPT2Config(max_seq_len=16, vocab_size=50257, num_layers=1, num_heads=2, channels=16)
    write_model(tmp_path / "big.bin", big, np.zeros(num_params(big)))
    msg = cli_error(capsys, args + ["--resume", "--model", str(tmp_path / "big.bin")])
    assert "ckpt_00000004" in msg and "C=8" in msg and "C=16" in msg


@pytest.mark.parametrize("flags", [["--model", "tiny"], ["-b", "4"]])
def test_refused_resume_keeps_the_run_config(run4, capsys, flags):
    """A --resume that the checkpoint refuses (another model, another batch shape) leaves
    config.json as it was, so that a plain --resume still continues the run."""
    run_dir, _ = run4
    config = (run_dir / "config.json").read_bytes()
    cli_error(capsys, ["train", "--run-dir", str(run_dir), "--resume", *flags])
    assert (run_dir / "config.json").read_bytes() == config
    assert cli.main(["train", "--run-dir", str(run_dir), "--resume", "--steps", "5"]) == 0
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4, 5]


def test_resume_with_another_batch_shape(run4, capsys):
    run_dir, args = run4
    msg = cli_error(capsys, args + ["--resume", "-b", "4"])
    assert "-b 2 -t 8" in msg


def test_fresh_run_into_old_checkpoints(run4, capsys):
    run_dir, args = run4
    msg = cli_error(capsys, args)
    assert str(run_dir) in msg and "--resume" in msg


def test_unwritable_run_dir(files, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    msg = cli_error(capsys, argv(files, tmp_path / "file" / "run"))
    assert str(tmp_path / "file" / "run") in msg and "cannot create the run directory" in msg


def test_resume_without_checkpoints_starts_fresh(files, tmp_path, capsys):
    args = argv(files, tmp_path / "run", "--steps", "3", "--sample-every", "0")
    assert cli.main(args + ["--resume"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]
