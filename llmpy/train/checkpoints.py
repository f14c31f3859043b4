"""A run directory and its checkpoints, so that a killed run resumes exactly where it was.

RUN_DIR/
  config.json             the full TrainConfig, the model shape, the git commit
  log.jsonl               one JSON object per step
  ckpt_00000100/          one directory per checkpoint, complete once it has this name:
    model.bin             GPT-2's weights, an llm.c model file (llmpy sample/train read it)
    model/                or the Llama / Gemma decoder's: a Hugging Face directory (io/weights.py)
    adamw_m.bin           AdamW's first moment, raw little-endian float32, layout of model.bin
    adamw_v.bin           AdamW's second moment, the same
    adamw_master.bin      float32 master weights, when the backend keeps bf16 params
    manifest.json         step, file sizes, DataLoader position, RNG and outlier-window state

A checkpoint is written into ckpt_XXXXXXXX.tmp/ (every file fsync'ed, the manifest last), then
renamed into place and the run directory fsync'ed: a crash at any moment leaves either no new
checkpoint or a complete one, never a half-written one under a checkpoint's name.
"""
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np

from ..io.weights import file_sizes, read_weights, write_weights
from ..errors import LlmpyError
from ..io.files import atomic_write, ensure_dir, file_size, write_json
from ..model.gpt2 import load_params

FORMAT, VERSION = "llmpy-checkpoint", 1
CKPT = re.compile(r"^ckpt_(\d{8})$")
# Test hook: seconds to sleep inside a checkpoint write, so a test can kill the process there.
SLEEP_ENV = "LLMPY_TEST_CHECKPOINT_SLEEP"


def _fsync_dir(path):
    """Make the names in directory `path` durable. Windows cannot open a directory (nor needs
    to: NTFS journals its metadata)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def git_commit():
    """The commit of the llmpy checkout that runs, or None outside git."""
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(__file__),
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def prepare(run_dir, resume):
    """Create the run directory; refuse to mix a new run into old checkpoints unless
    resuming."""
    ensure_dir(run_dir, "run directory")
    if not resume and checkpoints(run_dir):
        raise LlmpyError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to "
                         "continue it, or choose another --run-dir")


def write_config(run_dir, config):
    """config.json: the run's flags (saved_flags reads them back), model shape and commit."""
    write_json(os.path.join(run_dir, "config.json"), config)


def saved_flags(run_dir):
    """The training flags config.json recorded for the run in run_dir ({} if it has none yet),
    so that `--resume` continues with them."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            flags = json.load(f)["train"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmpyError(f"{path}: unreadable run configuration: {e!r}") from None
    if not isinstance(flags, dict):
        raise LlmpyError(f"{path}: unreadable run configuration: 'train' is not an object")
    return flags


def checkpoints(run_dir):
    """{step: path} of the complete checkpoints."""
    out = {}
    for name in os.listdir(run_dir):
        m = CKPT.match(name)
        if m and os.path.exists(os.path.join(run_dir, name, "manifest.json")):
            out[int(m.group(1))] = os.path.join(run_dir, name)
    return out


def newest_checkpoint(run_dir):
    """The path of run_dir's newest complete checkpoint, or None."""
    done = checkpoints(run_dir)
    return done[max(done)] if done else None


def newest_weights(run_dir):
    """(model config, (num_params,) float32) of run_dir's newest complete checkpoint: its float32
    master weights where a bf16 run saved them (its model.bin holds them rounded to bf16)."""
    path = newest_checkpoint(run_dir)
    if path is None:
        raise LlmpyError(f"{run_dir}: a directory with no complete checkpoint (ckpt_*/ with "
                         "a manifest.json) to load a model from")
    manifest = _manifest(path)
    cfg, params = read_weights(path)
    if "adamw_master.bin" in manifest["files"]:
        params = np.fromfile(os.path.join(path, "adamw_master.bin"), "<f4")
    return cfg, params


def _remove(path):
    """Delete a checkpoint directory; it stops counting as complete with its manifest."""
    manifest = os.path.join(path, "manifest.json")
    if os.path.exists(manifest):
        os.remove(manifest)
    shutil.rmtree(path)


def save(run_dir, step, model, opt, state, keep_last=0, major_every=0):
    """Write checkpoint `step`; state: the JSON-able rest (DataLoader, RNG, outlier windows).
    Then keep the newest keep_last (0: all) plus every multiple of major_every."""
    be = model.backend
    params = be.to_host(model.params.buf)
    if not np.isfinite(params).all():
        raise LlmpyError(f"step {step}: the weights are not finite; not writing a checkpoint")
    name = f"ckpt_{step:08d}"
    final, tmp = os.path.join(run_dir, name), os.path.join(run_dir, name + ".tmp")
    for leftover in os.listdir(run_dir):      # a crashed write, or a crashed delete
        path = os.path.join(run_dir, leftover)
        if leftover.startswith("ckpt_") and os.path.isdir(path) and (
                not CKPT.match(leftover) or not os.path.exists(os.path.join(path, "manifest.json"))):
            shutil.rmtree(path)
    os.makedirs(tmp)
    write_weights(tmp, model, params)
    atomic_write(os.path.join(tmp, "adamw_m.bin"), [np.asarray(be.to_host(opt.m), dtype="<f4")])
    atomic_write(os.path.join(tmp, "adamw_v.bin"), [np.asarray(be.to_host(opt.v), dtype="<f4")])
    if opt.master is not None:   # bf16 params: their float32 master copy is the real state
        atomic_write(os.path.join(tmp, "adamw_master.bin"),
                     [np.asarray(be.to_host(opt.master), dtype="<f4")])
    time.sleep(float(os.environ.get(SLEEP_ENV, 0)))
    sizes = file_sizes(tmp)
    manifest = {"format": FORMAT, "version": VERSION, "step": step, "adamw_step": opt.step,
                "files": sizes, **state}
    write_json(os.path.join(tmp, "manifest.json"), manifest)
    for d, _, _ in os.walk(tmp):              # the files' names, before the directory's
        _fsync_dir(d)
    os.replace(tmp, final)
    _fsync_dir(run_dir)
    done = sorted(checkpoints(run_dir))
    for s in done[:-keep_last] if keep_last else []:
        if not (major_every and s % major_every == 0):
            _remove(os.path.join(run_dir, f"ckpt_{s:08d}"))


def _manifest(path):
    """Checkpoint `path`'s manifest, once every file it lists has the size it records."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise LlmpyError(f"{path}/manifest.json: unreadable checkpoint manifest: {e}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise LlmpyError(f"{path}/manifest.json: not an {FORMAT} version {VERSION} manifest")
    for fname, size in manifest["files"].items():
        have = file_size(os.path.join(path, fname))
        if have != size:
            raise LlmpyError(f"{path}/{fname}: {'truncated' if have < size else 'grown'}: "
                             f"{have} bytes, the manifest says {size}; delete {path} to resume "
                             "from the checkpoint before it")
    return manifest


def load_latest(run_dir, model, opt):
    """Load the newest complete checkpoint into model and opt. Returns its manifest (with the
    step, the DataLoader position and the RNG state), or None when there is none yet."""
    path = newest_checkpoint(run_dir)
    if path is None:
        return None
    manifest = _manifest(path)
    cfg, params = read_weights(path)
    mc = model.config
    if cfg != mc:
        shape = ("L={0.num_layers} NH={0.num_heads} C={0.channels} V={0.vocab_size} "
                 "maxT={0.max_seq_len}")
        raise LlmpyError(f"{path}: the checkpoint is a model with {shape.format(cfg)}, but this "
                         f"run's model has {shape.format(mc)}")
    load_params(model, params)
    be = model.backend
    for fname, buf in (("adamw_m.bin", opt.m), ("adamw_v.bin", opt.v)):
        buf[:] = be.to_device(np.fromfile(os.path.join(path, fname), dtype="<f4"))
    if "adamw_master.bin" in manifest["files"]:
        master = np.fromfile(os.path.join(path, "adamw_master.bin"), "<f4")
        if be.caps.master_weights:
            opt.master = be.to_device(master)
        else:                   # a float32 backend: the master copy is the precise weights
            load_params(model, master)
    opt.step = manifest["adamw_step"]
    print(f"resuming from {path} (step {manifest['step']})")
    return manifest


def trim_log(path, step):
    """Keep the log's records up to `step`: the steps after the checkpoint will be redone.
    A torn last line (the process died while writing it) goes too."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                pass
    atomic_write(path, [np.frombuffer("".join(keep).encode(), dtype=np.uint8)])
