"""Data-parallel training over torch.distributed: 2 ranks (gloo, CPU, launched by torchrun)
against one process. Two ranks with micro-batch B train like one process with 2B, or with
twice the micro-steps of gradient accumulation: the same losses, gradient norms and final
weights to fp32 precision.
ZeRO-1 (launched as two torchrun "nodes", the README's multi-node command) trains like plain
data-parallel, its gathered checkpoint holds the whole AdamW state, and a resume from it is
bit-exact. A rank that is killed, or that hangs, ends the job with one clear line and exit 1."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from llmpy import cli
from llmpy.io.modelfile import read_model
from llmpy.model.layout import GPT2Config
from llmpy.train.config import TrainConfig
from llmpy.errors import LlmpyError
from llmpy.model.gpt2 import param_shapes
from llmpy.train.config import grad_accum_steps
from test_gpt2 import random_weights, rel_err, write_llmc_model, write_llmc_tokens

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed")

# An odd parameter count: ZeRO-1's last rank also owns the remainder of the split.
CFG = GPT2Config(max_seq_len=16, vocab_size=100, num_layers=3, num_heads=3, channels=15)
B, T, STEPS = 2, 8, 10
TIMEOUT = 10            # --dist-timeout of the failure tests, seconds


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    write_llmc_model(d / "model.bin", CFG, random_weights(CFG, seed=7))
    write_llmc_tokens(d / "train.bin", np.random.default_rng(8).integers(0, CFG.vocab_size, 4000))
    return d


def train_args(d, name, b=B, steps=STEPS, **flags):
    """`llmpy train` flags: 4*B*T tokens per step (with 2 ranks of micro-batch B: 2 micro-steps
    each), AdamW with weight decay and clipping."""
    args = ["--model", str(d / "model.bin"), "--train-data", str(d / "train.bin"),
            "--backend", "numpy", "-b", str(b), "-t", str(T), "--steps", str(steps),
            "--total-batch-size", str(4 * B * T), "--lr", "1e-3", "--weight-decay", "0.1",
            "--grad-clip", "0.5",               # below the norms (0.75-0.94): every step clips
            "--val-every", "0", "--sample-every", "0",
            "--log-jsonl", str(d / f"{name}.jsonl"), "--save", str(d / f"{name}.bin")]
    for k, v in flags.items():
        args += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return args


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(launchers, args):
    """Run `python -m torch.distributed.run LAUNCHER -m llmpy train ARGS` once per launcher
    (several: one per "node"), all at once. Returns rank 0's node's (stdout, stderr)."""
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launcher,
                               "-m", "llmpy", "train", *args], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for launcher in launchers]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return outs[0]


def single(d, name, **kw):
    """One process, in this one: the reference."""
    assert cli.main(["train"] + train_args(d, name, **kw)) == 0


def log(d, name, key="train_loss"):
    return np.array([json.loads(line)[key] for line in (d / f"{name}.jsonl").read_text()
                     .splitlines()])


def weights(d, name):
    return read_model(str(d / f"{name}.bin"))[1]


@pytest.fixture(scope="module")
def dp(files):
    """Plain data-parallel on one node, parameters checked identical across ranks each step."""
    out, _ = torchrun([["--standalone", "--nproc-per-node", "2"]],
                      train_args(files, "dp", dist_check_every=1, run_dir=files / "dp_run",
                                 checkpoint_every=5))
    return out


@pytest.fixture(scope="module")
def zero(files):
    """ZeRO-1, as two nodes of one process each (static rendezvous)."""
    port = str(free_port())
    nodes = [["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i),
              "--master-addr", "127.0.0.1", "--master-port", port] for i in range(2)]
    return torchrun(nodes, train_args(files, "zero", zero=1, dist_check_every=1,
                                      run_dir=files / "zero_run", checkpoint_every=5))[0]


def test_two_ranks_match_one_process(files, dp):
    single(files, "accum")            # B, 4 micro-steps of gradient accumulation
    single(files, "big", b=2 * B)     # 2B, 2 micro-steps, as each of the 2 ranks
    for ref in ("accum", "big"):
        assert np.abs(log(files, "dp") - log(files, ref)).max() < 1e-5, ref
        assert np.abs(log(files, "dp", "grad_norm") - log(files, ref, "grad_norm")).max() < 1e-5
        assert rel_err(weights(files, "dp"), weights(files, ref)) < 1e-5, ref
    assert len(log(files, "dp")) == STEPS
    assert (log(files, "dp", "grad_norm") > 0.5).all(), "every step must clip (--grad-clip 0.5)"
    # rank 0 alone prints: one line per step, not one per rank
    assert sum(line.startswith("step ") for line in dp.splitlines()) == STEPS, dp
    assert "2 ranks" in dp


def test_zero1_matches_data_parallel(files, dp, zero):
    assert sum(int(np.prod(s)) for _, s in param_shapes(CFG)) % 2 == 1
    assert "2 ranks, ZeRO-1" in zero
    assert np.abs(log(files, "zero") - log(files, "dp")).max() < 1e-5
    assert rel_err(weights(files, "zero"), weights(files, "dp")) < 1e-5
    # the checkpoint holds every rank's shard of AdamW's moments, as plain DP's whole ones
    for moment in ("adamw_m.bin", "adamw_v.bin"):
        z, p = (np.fromfile(files / run / "ckpt_00000010" / moment, dtype="<f4")
                for run in ("zero_run", "dp_run"))
        assert z.shape == p.shape and rel_err(z, p) < 1e-5, moment      # measured ~4e-7


def test_zero1_resume_is_exact(files, zero):
    run = files / "zero_resumed"
    shutil.copytree(files / "zero_run", run)
    shutil.rmtree(run / "ckpt_00000010")
    out, _ = torchrun([["--standalone", "--nproc-per-node", "2"]],
                      train_args(files, "resumed", zero=1, run_dir=run, checkpoint_every=5,
                                 resume=True))
    assert "resuming from" in out and "(step 5)" in out
    assert np.array_equal(log(files, "resumed"), log(files, "zero")[5:])
    assert np.array_equal(weights(files, "resumed"), weights(files, "zero"))


def two_ranks_at_step_3(args, rank1_out):
    """`llmpy train ARGS` as rank 0 and rank 1 of a job, as torchrun starts them on two nodes
    (its environment), without an agent; returned once rank 0 has printed step 3. rank 1's
    stdout and stderr go to rank1_out."""
    env = dict(os.environ, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               OMP_NUM_THREADS="1")
    ranks = [subprocess.Popen([sys.executable, "-m", "llmpy", "train", *args],
                              env=dict(env, RANK=str(r), LOCAL_RANK="0"), text=True,
                              stdout=subprocess.PIPE if r == 0 else rank1_out,
                              stderr=subprocess.PIPE if r == 0 else rank1_out)
             for r in range(2)]
    for line in ranks[0].stdout:
        if line.startswith("step    3/"):
            return ranks
    for p in ranks:
        p.kill()
    pytest.fail("rank 0 never reached step 3: " + ranks[0].stderr.read())


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_job(files, sig):
    """The ranks run as torchrun starts them on two nodes (its environment), without an agent
    that would stop the survivor: rank 0 itself must notice rank 1's death (a closed
    connection) or hang (the timeout), and exit 1 with one line."""
    args = train_args(files, f"killed_{sig}", steps=100000, dist_timeout=TIMEOUT)
    ranks = two_ranks_at_step_3(args, subprocess.DEVNULL)
    try:
        ranks[1].send_signal(getattr(signal, sig))
        t0 = time.monotonic()
        _, err = ranks[0].communicate(timeout=TIMEOUT + 60)
        elapsed = time.monotonic() - t0
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert ranks[0].returncode == 1
    assert elapsed < TIMEOUT + 30
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmpy: error: rank 0: "), err
    assert "across 2 ranks failed" in lines[0] and f"--dist-timeout {TIMEOUT} s" in lines[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
@pytest.mark.parametrize("zero", [0, 1])
def test_nccl_on_one_gpu_matches_one_process(files, zero):
    """The NCCL path on the gpu backend (the README's torchrun command, with one GPU): the process
    group, the per-layer all-reduces or ZeRO-1's reduce-scatter and all-gather on CUDA tensors
    change nothing against the same backend without a process group."""
    single(files, "gpu", backend="gpu")
    out, _ = torchrun([["--standalone", "--nproc-per-node", "1"]],
                      train_args(files, f"nccl{zero}", backend="gpu", dist=True, zero=zero,
                                 dist_check_every=1))
    assert "backend gpu" in out
    assert np.abs(log(files, f"nccl{zero}") - log(files, "gpu")).max() < 1e-5
    assert rel_err(weights(files, f"nccl{zero}"), weights(files, "gpu")) < 1e-5


def test_total_batch_size_counts_the_ranks():
    cfg = TrainConfig(batch_size=B, seq_len=T, total_batch_size=8 * B * T)
    assert grad_accum_steps(cfg, 1) == 8 and grad_accum_steps(cfg, 2) == 4
    cfg.total_batch_size = 3 * B * T
    with pytest.raises(LlmpyError, match=r"not a multiple of B\*T\*ranks = 2\*8\*2 = 32"):
        grad_accum_steps(cfg, 2)


def test_bad_flags(files, monkeypatch, capsys):
    assert cli.main(["train"] + train_args(files, "bad", zero=2)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--zero 2" in err[0], err
    # --dist outside torchrun: no process group to join
    assert cli.main(["train"] + train_args(files, "bad", dist=True)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot join the process group (launch with torchrun)" in err[0], err
    # WORLD_SIZE > 1 needs torch, and says so in one line when it is missing
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setitem(sys.modules, "torch", None)
    assert cli.main(["train"] + train_args(files, "bad")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["llmpy: error: distributed training (WORLD_SIZE=2) needs PyTorch: "
                   "pip install torch"], err


def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(files, tmp_path):
    """SIGTERM to rank 1 alone (a scheduler may reach the ranks a step apart): every rank
    finishes the same step, rank 0 saves a checkpoint at it, and each exits 143 in one line."""
    run_dir = tmp_path / "run"
    args = train_args(files, "preempted", steps=100000, dist_timeout=TIMEOUT, run_dir=run_dir)
    ranks = two_ranks_at_step_3(args, subprocess.PIPE)
    try:
        ranks[1].send_signal(signal.SIGTERM)
        errs = [p.communicate(timeout=TIMEOUT + 60)[1] for p in ranks]
    finally:
        for p in ranks:
            p.kill()
            p.wait()
    assert [p.returncode for p in ranks] == [143, 143], errs
    step = len((files / "preempted.jsonl").read_text().splitlines())
    saved = run_dir / f"ckpt_{step:08d}"
    assert errs == [f"llmpy: SIGTERM: stopped after step {step}; saved {saved}; continue with "
                    "--resume\n"] * 2
    assert json.loads((saved / "manifest.json").read_text())["step"] == step
