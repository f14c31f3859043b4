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
    manifest.json         step, each file's size and sha256, DataLoader position, RNG and
                          outlier-window state, and a sha256 of the manifest's own fields
  lock                    the PID of the process that trains in the directory (see lock())
  corrupt_ckpt_00000100/  a checkpoint that failed its checks on load, set aside, never deleted

A checkpoint is written into ckpt_XXXXXXXX.tmp/ (every file fsync'ed, the manifest last), then
renamed into place and the run directory fsync'ed: a crash at any moment leaves either no new
checkpoint or a complete one, never a half-written one under a checkpoint's name. What a crash
cannot do, a disk can: bits rot and files get truncated or overwritten in place at the same
size. So a resume checks every file against its sha256 and every manifest field, sets a
checkpoint that fails aside and resumes from the newest one that passes.
"""
import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np

from ..errors import LlmpyError
from ..io.files import atomic_write, ensure_dir, write_json
from ..io.weights import file_sizes, read_weights, write_weights
from ..model.gpt2 import load_params

FORMAT, VERSION = "llmpy-checkpoint", 2     # 2: sha256 of every file and of the manifest
CKPT = re.compile(r"^ckpt_(\d{8})$")
LOCK = "lock"
REQUIRED = ("adamw_m.bin", "adamw_v.bin")     # adamw_master.bin is optional
# The model: GPT-2's model.bin, or the decoder's HF directory (io/weights.py), whose tokenizer
# files are optional.
MODEL_FILES = (("model.bin",), ("model/config.json", "model/model.safetensors"))
MODEL_OPTIONAL = ("model/tokenizer.json", "model/tokenizer_config.json")
# The manifest fields besides the files, with their JSON types: loop.RunState.state() writes them
STATE_FIELDS = {"batch": dict, "train_loader": dict, "rng": dict, "loss_window": list,
                "grad_window": list, "nonfinite": int}
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


_held = []      # the open lock files of the run directories this process trains in


def lock(run_dir):
    """Take RUN_DIR/lock for as long as this process trains there (until release_locks): a
    second writer would trim the first one's log and race it for the checkpoint names. flock
    belongs to the open file, so the OS drops it when the process dies however it dies, and a
    crash never leaves a stale lock behind. The file holds the holder's PID for the message.
    Windows has no flock: there, one writer per directory is the user's care."""
    if os.name == "nt":
        return
    import fcntl
    path = os.path.join(run_dir, LOCK)
    try:
        f = open(path, "a+")          # a+: never truncate the PID of a process that holds it
    except OSError as e:
        raise LlmpyError(f"{path}: cannot open the run directory's lock: {e.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "unknown"
        f.close()
        raise LlmpyError(f"{run_dir}: another process (PID {pid}) is training in this run "
                         "directory; wait for it to end, or choose another --run-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held.append(f)


@contextlib.contextmanager
def locks_released():
    """Release the locks taken inside when it ends, by an exception too: a train() that failed
    frees its run directory for the next one in this process (tests, notebooks)."""
    n = len(_held)
    try:
        yield
    finally:
        while len(_held) > n:
            _held.pop().close()


def prepare(run_dir, resume):
    """Create the run directory and lock it; refuse to mix a new run into an earlier run's
    checkpoints, or to overwrite its log and config, unless resuming."""
    ensure_dir(run_dir, "run directory")
    lock(run_dir)
    if resume:
        return
    if checkpoints(run_dir):
        raise LlmpyError(f"{run_dir}: holds checkpoints of an earlier run; pass --resume to "
                         "continue it, or choose another --run-dir")
    earlier = [f for f in ("log.jsonl", "config.json") if os.path.exists(os.path.join(run_dir, f))]
    if earlier:
        raise LlmpyError(f"{run_dir}: holds {' and '.join(earlier)} of an earlier run; pass "
                         "--resume to continue it (from its start, as it has no checkpoint), "
                         "or choose another --run-dir")


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
    """(model config, (num_params,) float32) of run_dir's newest checkpoint that verifies: its
    float32 master weights where a bf16 run saved them (its model.bin holds them rounded to
    bf16). A reader sets nothing aside: the run may be going on."""
    if not checkpoints(run_dir):
        raise LlmpyError(f"{run_dir}: a directory with no complete checkpoint (ckpt_*/ with "
                         "a manifest.json) to load a model from")
    path, manifest = verified(run_dir, set_aside_bad=False)
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


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2 ** 20), b""):
            h.update(block)
    return h.hexdigest()


def _self_hash(manifest):
    """The sha256 of a manifest's fields but "sha256_manifest" itself, in a canonical form
    (json.dumps writes floats by repr, which reads back to the same float)."""
    rest = {k: v for k, v in manifest.items() if k != "sha256_manifest"}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def write_manifest(path, fields):
    """Checkpoint directory `path`'s manifest.json: fields plus the size and sha256 of every
    other file in it, and the manifest's own sha256."""
    sizes = {f: n for f, n in sorted(file_sizes(path).items()) if f != "manifest.json"}
    manifest = {**fields, "files": sizes,
                "sha256": {f: sha256(os.path.join(path, f)) for f in sizes}}
    manifest["sha256_manifest"] = _self_hash(manifest)
    write_json(os.path.join(path, "manifest.json"), manifest)


def save(run_dir, step, model, opt, state, keep_last=0, major_every=0):
    """Write checkpoint `step`; state: the JSON-able rest (DataLoader, RNG, outlier windows).
    Then keep the newest keep_last (0: all) plus every multiple of major_every. A write that
    fails (a full disk) leaves the checkpoints before it as they were, and removes its own
    partial files, whose space the next attempt needs."""
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
    try:
        os.makedirs(tmp)
        write_weights(tmp, model, params)
        atomic_write(os.path.join(tmp, "adamw_m.bin"),
                     [np.asarray(be.to_host(opt.m), dtype="<f4")])
        atomic_write(os.path.join(tmp, "adamw_v.bin"),
                     [np.asarray(be.to_host(opt.v), dtype="<f4")])
        if opt.master is not None:   # bf16 params: their float32 master copy is the real state
            atomic_write(os.path.join(tmp, "adamw_master.bin"),
                         [np.asarray(be.to_host(opt.master), dtype="<f4")])
        time.sleep(float(os.environ.get(SLEEP_ENV, 0)))
        write_manifest(tmp, {"format": FORMAT, "version": VERSION, "step": step,
                             "adamw_step": opt.step, **state})
        for d, _, _ in os.walk(tmp):          # the files' names, before the directory's
            _fsync_dir(d)
        os.replace(tmp, final)
        _fsync_dir(run_dir)
    except (LlmpyError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = str(e) if isinstance(e, LlmpyError) else f"{e.filename}: {e.strerror}"
        before = newest_checkpoint(run_dir)
        raise LlmpyError(f"{final}: checkpoint not written: {why}; "
                         + (f"{before} is intact" if before else "no earlier checkpoint")) from None
    done = sorted(checkpoints(run_dir))
    for s in done[:-keep_last] if keep_last else []:
        if not (major_every and s % major_every == 0):
            _remove(os.path.join(run_dir, f"ckpt_{s:08d}"))
    return final


class Corrupt(Exception):
    """A checkpoint that fails its checks: set aside, and the one before it used."""


def _check(cond, what):
    if not cond:
        raise Corrupt(what)


def _is_int(x):
    return type(x) is int


def read_manifest(path):
    """Checkpoint `path`'s manifest, once its fields and every file it lists check out
    (sizes, then sha256). Raises Corrupt naming the first problem."""
    try:
        with open(os.path.join(path, "manifest.json"), "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise Corrupt(f"unreadable manifest.json: {e}") from None
    _check(isinstance(manifest, dict), f"manifest.json holds {type(manifest).__name__}, not an "
           "object")
    _check(manifest.get("format") == FORMAT and manifest.get("version") == VERSION,
           f"manifest.json is not an {FORMAT} version {VERSION} manifest")
    _check(manifest.get("sha256_manifest") == _self_hash(manifest),
           "manifest.json does not match its own sha256 (edited or damaged)")
    step = manifest.get("step")
    _check(_is_int(step) and f"ckpt_{step:08d}" == os.path.basename(os.path.normpath(path)),
           f"manifest step {step!r} is not the directory's")
    _check(_is_int(manifest.get("adamw_step")) and 0 <= manifest["adamw_step"] <= step,
           f"adamw_step {manifest.get('adamw_step')!r} is not an int in 0..{step}")
    files, hashes = manifest.get("files"), manifest.get("sha256")
    _check(isinstance(files, dict) and isinstance(hashes, dict) and set(files) == set(hashes)
           and any(set(REQUIRED) | set(model) <= set(files) <= set(REQUIRED) | set(model)
                   | {"adamw_master.bin"} | (set(MODEL_OPTIONAL) if len(model) > 1 else set())
                   for model in MODEL_FILES)
           and all(_is_int(n) for n in files.values()),
           f"manifest files {files!r} are not {', '.join(REQUIRED)}, a model (model.bin or "
           "model/) and adamw_master.bin with their sizes and sha256")
    for field, typ in STATE_FIELDS.items():
        _check(type(manifest.get(field)) is typ, f"manifest field {field!r} is "
               f"{type(manifest.get(field)).__name__}, not {typ.__name__}")
    loader = manifest["train_loader"]
    _check(all(_is_int(loader.get(k)) and loader[k] >= 0
               for k in ("epoch", "shard_pos", "window_pos")),
           f"train_loader {loader!r} is not a position of ints >= 0")
    _check(all(type(x) is float for x in manifest["loss_window"] + manifest["grad_window"]),
           "the outlier windows hold more than floats")
    for fname, size in files.items():
        have = os.path.getsize(os.path.join(path, fname)) if os.path.isfile(
            os.path.join(path, fname)) else None
        _check(have is not None, f"{fname} is missing")
        _check(have == size, f"{fname} is {'truncated' if have < size else 'grown'}: {have} "
               f"bytes, the manifest says {size}")
        _check(sha256(os.path.join(path, fname)) == hashes[fname],
               f"{fname} does not match its sha256 (its bytes changed since it was written)")
    return manifest


def set_aside(path):
    """Rename a bad checkpoint out of the checkpoints' names (never delete it: it may be
    all there is of some run): corrupt_ckpt_XXXXXXXX, or .1, .2, ... after it."""
    base = os.path.join(os.path.dirname(path), "corrupt_" + os.path.basename(path))
    new, i = base, 0
    while os.path.exists(new):
        i += 1
        new = f"{base}.{i}"
    os.replace(path, new)
    return new


def verified(run_dir, set_aside_bad=True):
    """(path, manifest) of run_dir's newest checkpoint that verifies, or None when it has no
    checkpoint. Each newer one that fails is reported in one line (stderr) and, with
    set_aside_bad, renamed. None verifying is an error."""
    done = checkpoints(run_dir)
    for step in sorted(done, reverse=True):
        path = done[step]
        try:
            return path, read_manifest(path)
        except (Corrupt, OSError) as e:
            why = e if isinstance(e, Corrupt) else f"{e.filename}: {e.strerror}"
            note = f"set aside as {set_aside(path)}" if set_aside_bad else "skipped"
            print(f"llmpy: warning: {path}: {why}; {note}", file=sys.stderr, flush=True)
    if done:
        raise LlmpyError(f"{run_dir}: none of its {len(done)} checkpoint(s) verifies (each "
                         "reported above)" + ("; they are set aside, so --resume now starts the "
                                              "run afresh" if set_aside_bad else ""))
    return None


def load_latest(run_dir, model, opt, set_aside_bad=True):
    """Load the newest checkpoint that verifies into model and opt (see verified). Returns its
    manifest (with the step, the DataLoader position and the RNG state), or None when there
    is none yet. Under torchrun only rank 0 sets bad ones aside; the others skip them."""
    found = verified(run_dir, set_aside_bad)
    if found is None:
        return None
    path, manifest = found
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
    A torn last line (the process died while writing it) goes too. A log that is no regular
    file (/dev/stdout, a pipe) is left as it is: reading it could block or never end."""
    if not os.path.isfile(path):
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
