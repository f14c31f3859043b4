"""Crash safety: a training process SIGKILLed at random moments (one of them inside a
checkpoint write) and resumed with --resume logs the same per-step losses, bit for bit, as an
uninterrupted run; checkpoints rotate (keep-last K, major ones kept); bad checkpoints and run
directories give one line and exit 1."""
import errno
import json
import os
import random
import re
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


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """An uninterrupted run: (its run directory, its stdout, seconds from its start to its
    first logged step, its median step in seconds)."""
    ref_dir = tmp_path_factory.mktemp("reference") / "ref"
    t0 = time.time()
    ref = spawn(argv(files, ref_dir))
    wait_for(lambda: log_lines(ref_dir) >= 1, ref, timeout=300)
    startup = time.time() - t0
    out, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    ms = sorted(json.loads(line)["ms"] for line in (ref_dir / "log.jsonl").read_text().splitlines())
    return ref_dir, out, startup, ms[len(ms) // 2] / 1e3


def same_checkpoint(a, b):
    """Every file of two checkpoints, byte for byte: the weights, AdamW's moments and the
    manifest (step, DataLoader position, RNG and outlier windows, sha256s)."""
    names = sorted(os.listdir(a))
    assert names == sorted(os.listdir(b)) and "adamw_m.bin" in names and "manifest.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), (a, name)


def test_sigkill_anywhere_then_resume_is_bit_identical(files, reference, tmp_path):
    ref_dir, ref_out, startup, step_s = reference
    run_dir = tmp_path / "run"
    seed = int(time.time())
    print(f"kill moments from seed {seed}")
    rng = random.Random(seed)
    # where each kill lands: while starting (fresh, then resuming: the checkpoint being read, the
    # log trimmed), inside a checkpoint write, or at a random moment of a random step (not just
    # after a log write: within one median step of it)
    moments = ["startup", "step", "checkpoint", "startup", "step", "step"]
    for moment in moments:
        if moment == "checkpoint":   # the process sleeps inside a checkpoint write: kill it there
            p = spawn(argv(files, run_dir, "--resume"), {SLEEP_ENV: "30"}, quiet=True)
            wait_for(lambda: any((d / "model.bin").exists() for d in run_dir.glob("ckpt_*.tmp")),
                     p)
            assert not list(run_dir.glob("ckpt_*.tmp/manifest.json"))
        elif moment == "startup":    # well before the first step, whose startup it measured
            before = log_lines(run_dir)
            p = spawn(argv(files, run_dir, "--resume"), quiet=True)
            time.sleep(rng.uniform(0.05, 0.5) * startup)
        else:
            p = spawn(argv(files, run_dir, "--resume"), quiet=True)
            target = log_lines(run_dir) + rng.randint(1, 15)
            wait_for(lambda: log_lines(run_dir) >= target, p)
            time.sleep(rng.uniform(0, step_s))
        p.send_signal(signal.SIGKILL)
        p.communicate()
        assert p.returncode == -signal.SIGKILL, moment
        if moment == "startup":
            assert log_lines(run_dir) <= before      # killed before a step (a torn line goes)
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
    for s in (75, 80):
        same_checkpoint(run_dir / f"ckpt_{s:08d}", ref_dir / f"ckpt_{s:08d}")
    config = json.loads((run_dir / "config.json").read_text())
    assert config["train"]["total_batch_size"] == 0 and config["model"]["channels"] == 8
    assert "git_commit" in config


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_preempted_run_saves_and_resumes_bit_identical(files, reference, tmp_path, sig, code):
    """SIGTERM (a scheduler's preemption) or SIGINT: the step under way finishes, a checkpoint
    is written at it (off the --checkpoint-every schedule), one line says where, and the exit
    status is a signal's; --resume then continues as if nothing had happened."""
    ref_dir, ref_out, _, _ = reference
    run_dir = tmp_path / "run"
    p = spawn(argv(files, run_dir, "--checkpoint-every", "50"))
    wait_for(lambda: log_lines(run_dir) >= 12, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, err
    step = log_lines(run_dir)
    saved = run_dir / f"ckpt_{step:08d}"
    assert err.splitlines() == [f"llmpy: {signal.Signals(sig).name}: stopped after step {step}; "
                                f"saved {saved}; continue with --resume"]
    assert 12 <= step < 50 and llmpy.train.checkpoints.read_manifest(str(saved))["step"] == step
    final = spawn(argv(files, run_dir, "--resume"))
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    assert f"resuming from {saved} (step {step})" in out
    assert records(run_dir) == records(ref_dir)
    assert sample_at(out, STEPS) == sample_at(ref_out, STEPS)
    same_checkpoint(run_dir / f"ckpt_{STEPS:08d}", ref_dir / f"ckpt_{STEPS:08d}")


def test_a_second_writer_is_refused(files, tmp_path):
    """Two processes training in one run directory: the second ends at once in one line naming
    the first's PID, and leaves the first's log alone. The lock dies with its holder: once the
    first is SIGKILLed, a resume takes the directory."""
    run_dir = tmp_path / "run"
    first = spawn(argv(files, run_dir, "--resume"), {SLEEP_ENV: "60"}, quiet=True)
    wait_for(lambda: any((d / "model.bin").exists() for d in run_dir.glob("ckpt_*.tmp")), first)
    log = (run_dir / "log.jsonl").read_bytes()
    second = spawn(argv(files, run_dir, "--resume"))
    out, err = second.communicate(timeout=300)
    assert second.returncode == 1 and err.splitlines() == [
        f"llmpy: error: {run_dir}: another process (PID {first.pid}) is training in this run "
        "directory; wait for it to end, or choose another --run-dir"], err
    assert "step" not in out and (run_dir / "log.jsonl").read_bytes() == log
    assert first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.communicate()
    third = spawn(argv(files, run_dir, "--resume", "--steps", "7", "--sample-every", "0"))
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert [r["step"] for r in records(run_dir)] == list(range(1, 8))


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


def reseal(ckpt, edit=lambda manifest: manifest):
    """Rewrite a checkpoint's manifest for its files as they are now, then edit(manifest), with
    its own sha256 made to match: a change that only the checks of the fields can see."""
    ck, path = llmpy.train.checkpoints, ckpt / "manifest.json"
    manifest = json.loads(path.read_text())
    ck.write_manifest(str(ckpt), {k: v for k, v in manifest.items()
                                  if k not in ("files", "sha256", "sha256_manifest")})
    manifest = edit(json.loads(path.read_text()))
    manifest["sha256_manifest"] = ck._self_hash(manifest)
    path.write_text(json.dumps(manifest))


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
    reseal(ckpt)                                                   # listed, as save() does
    model = build_model(str(run_dir), get_backend("numpy"))
    assert np.array_equal(model.params.buf, exact)
    # a damaged one: the checkpoint before it, and a word on stderr; nothing renamed, as the
    # run may be going on
    (ckpt / "adamw_master.bin").write_bytes(bytes(8))
    model = build_model(str(run_dir), get_backend("numpy"))
    assert np.array_equal(model.params.buf,
                          read_model(str(run_dir / "ckpt_00000002" / "model.bin"))[1])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and str(ckpt) in err[0] and "adamw_master.bin is truncated: 8 bytes" \
        in err[0] and "skipped" in err[0], err
    assert ckpt.is_dir()


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


def zero_inside(path):
    """800 KB of zeros over the middle of the file, at the same size."""
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 4:len(raw) // 4 + 800_000] = bytes(800_000)
    path.write_bytes(bytes(raw))


def edit_manifest(ckpt, edit):
    manifest = json.loads((ckpt / "manifest.json").read_text())
    (ckpt / "manifest.json").write_text(json.dumps(edit(manifest)))


def drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def at_window(pos):
    return lambda m: {**m, "train_loader": {**m["train_loader"], "window_pos": pos}}


# a damage to the newest checkpoint -> the words of its one-line report
DAMAGES = {
    "same-size zeros in model.bin": (lambda c: zero_inside(c / "model.bin"),
                                     "model.bin does not match its sha256"),
    "truncated adamw_v.bin": (lambda c: (c / "adamw_v.bin").write_bytes(
        (c / "adamw_v.bin").read_bytes()[:-4]), "adamw_v.bin is truncated"),
    "adamw_m.bin deleted": (lambda c: (c / "adamw_m.bin").unlink(), "adamw_m.bin is missing"),
    "manifest without files": (lambda c: edit_manifest(c, drop("files")), "own sha256"),
    "manifest without train_loader": (lambda c: edit_manifest(c, drop("train_loader")),
                                      "own sha256"),
    "manifest a list": (lambda c: edit_manifest(c, lambda m: [m]), "holds list, not an object"),
    "manifest window_pos 1e9": (lambda c: edit_manifest(c, at_window(1e9)), "own sha256"),
    "manifest not JSON": (lambda c: (c / "manifest.json").write_text("{"),
                          "unreadable manifest.json"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_checkpoint_is_set_aside_and_the_one_before_used(run4, capsys, damage):
    """A checkpoint whose files or manifest changed since they were written: one line names it
    and the problem, it is renamed (kept), and the run resumes from the checkpoint before it,
    bit for bit as if nothing had happened."""
    run_dir, args = run4
    want, ckpt = records(run_dir), run_dir / "ckpt_00000004"
    shutil.copytree(ckpt, run_dir.parent / "good")
    damage_it, words = DAMAGES[damage]
    damage_it(ckpt)
    damaged = {f.name: f.read_bytes() for f in ckpt.iterdir()}
    assert cli.main(args + ["--resume"]) == 0
    out, err = capsys.readouterr()
    aside = run_dir / "corrupt_ckpt_00000004"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmpy: warning: {ckpt}: "), err
    assert words in err and lines[0].endswith(f"; set aside as {aside}"), err
    assert f"resuming from {run_dir / 'ckpt_00000002'} (step 2)" in out
    assert {f.name: f.read_bytes() for f in aside.iterdir()} == damaged
    assert records(run_dir) == want
    same_checkpoint(ckpt, run_dir.parent / "good")


# a field save() would never write, in a manifest sealed as if it had -> words of the report
FIELDS = {
    "no files": (drop("files"), "manifest files None"),
    "no train_loader": (drop("train_loader"), "'train_loader' is NoneType, not dict"),
    "adamw_step past step": (lambda m: {**m, "adamw_step": 5}, "adamw_step 5 is not an int"),
    "another step": (lambda m: {**m, "step": 3}, "step 3 is not the directory's"),
    "window_pos a float": (at_window(1e9), "not a position of ints"),
    "a string in the loss window": (lambda m: {**m, "loss_window": ["1.0"]}, "more than floats"),
    "rng not an object": (lambda m: {**m, "rng": 7}, "'rng' is int, not dict"),
}


@pytest.mark.parametrize("field", FIELDS)
def test_every_manifest_field_is_checked(run4, field):
    run_dir, _ = run4
    edit, words = FIELDS[field]
    ckpt = run_dir / "ckpt_00000004"
    reseal(ckpt, edit)
    with pytest.raises(llmpy.train.checkpoints.Corrupt, match=re.escape(words)):
        llmpy.train.checkpoints.read_manifest(str(ckpt))


def test_a_position_outside_the_data_is_an_error(run4, capsys):
    """A window past the data's, in a manifest that verifies (another --train-data, say): one
    line, not a wrap-around to some other window; the checkpoint stays."""
    run_dir, args = run4
    reseal(run_dir / "ckpt_00000004", at_window(10 ** 9))
    msg = cli_error(capsys, args + ["--resume"])
    assert "train.bin" in msg and "window 1000000000" in msg and "outside" in msg
    assert (run_dir / "ckpt_00000004").is_dir()


def test_no_checkpoint_verifies(run4, capsys):
    run_dir, args = run4
    for s in (2, 4):
        zero_inside(run_dir / f"ckpt_{s:08d}" / "model.bin")
    assert cli.main(args + ["--resume"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all("set aside" in line for line in err[:2])
    assert err[2] == f"llmpy: error: {run_dir}: none of its 2 checkpoint(s) verifies (each " \
        "reported above); they are set aside, so --resume now starts the run afresh"


def test_disk_full_during_a_checkpoint(files, tmp_path, capsys, monkeypatch):
    """ENOSPC in the middle of checkpoint 4 (model.bin written, adamw_m.bin not): one line, the
    partial checkpoint removed, checkpoint 2 intact; --resume continues from it."""
    run_dir = tmp_path / "run"
    args = argv(files, run_dir, "--steps", "4", "--checkpoint-every", "2", "--sample-every", "0")
    write_model = llmpy.io.weights.write_model
    full = []

    def write_then_fill(path, *a, **kw):
        write_model(path, *a, **kw)
        full.append("ckpt_00000004.tmp" in path)

    def fsync(fd, fsync=os.fsync):
        if any(full):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)
    monkeypatch.setattr(llmpy.io.weights, "write_model", write_then_fill)
    monkeypatch.setattr(os, "fsync", fsync)
    msg = cli_error(capsys, args)
    monkeypatch.undo()
    ckpt = run_dir / "ckpt_00000004"
    assert msg == (f"llmpy: error: {ckpt}: checkpoint not written: {ckpt}.tmp/adamw_m.bin: "
                   f"cannot write: No space left on device; {run_dir / 'ckpt_00000002'} is "
                   "intact")
    assert sorted(d.name for d in run_dir.iterdir()) == ["ckpt_00000002", "config.json", "lock",
                                                         "log.jsonl"]
    llmpy.train.checkpoints.read_manifest(str(run_dir / "ckpt_00000002"))
    assert cli.main(args + ["--resume"]) == 0
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_while_logging(files, tmp_path, capsys):
    """A log that cannot be written (/dev/full: ENOSPC on every write) stops the run at that
    step in one line, before the step's checkpoint; the checkpoint before it is intact, and
    --resume with a writable log continues from it."""
    run_dir = tmp_path / "run"
    args = argv(files, run_dir, "--steps", "4", "--checkpoint-every", "2", "--sample-every", "0")
    ok = argv(files, tmp_path / "ok", "--steps", "2", "--checkpoint-every", "2",
              "--sample-every", "0")
    assert cli.main(ok) == 0                  # the first two steps, logged and checkpointed
    shutil.copytree(tmp_path / "ok", run_dir)
    msg = cli_error(capsys, args + ["--resume", "--log-jsonl", "/dev/full"])
    assert msg == ("llmpy: error: /dev/full: cannot write the log at step 3: No space left on "
                   "device; --resume continues from the last checkpoint")
    assert llmpy.train.checkpoints.newest_checkpoint(str(run_dir)).endswith("ckpt_00000002")
    # (--log-jsonl given again: --resume would take /dev/full from the run's config.json)
    assert cli.main(args + ["--resume", "--log-jsonl", str(run_dir / "log.jsonl")]) == 0
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3, 4]


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


def test_fresh_run_into_an_old_log(files, tmp_path, capsys):
    """A run directory with an earlier run's log and config but no checkpoint: a run without
    --resume does not overwrite them."""
    run_dir = tmp_path / "run"
    args = argv(files, run_dir, "--steps", "2", "--checkpoint-every", "0", "--sample-every", "0")
    assert cli.main(args) == 0
    kept = {f: (run_dir / f).read_bytes() for f in ("log.jsonl", "config.json")}
    msg = cli_error(capsys, args + ["--steps", "3"])
    assert msg == (f"llmpy: error: {run_dir}: holds log.jsonl and config.json of an earlier run; "
                   "pass --resume to continue it (from its start, as it has no checkpoint), or "
                   "choose another --run-dir")
    assert kept == {f: (run_dir / f).read_bytes() for f in kept}


def test_unwritable_run_dir(files, tmp_path, capsys):
    (tmp_path / "file").write_text("")
    msg = cli_error(capsys, argv(files, tmp_path / "file" / "run"))
    assert str(tmp_path / "file" / "run") in msg and "cannot create the run directory" in msg


def test_resume_without_checkpoints_starts_fresh(files, tmp_path, capsys):
    args = argv(files, tmp_path / "run", "--steps", "3", "--sample-every", "0")
    assert cli.main(args + ["--resume"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert [r["step"] for r in records(tmp_path / "run")] == [1, 2, 3]
