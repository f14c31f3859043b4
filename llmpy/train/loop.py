"""The training loop, as llm.c's train_gpt2.cu runs it: each step (step.py) accumulates the
gradients of total_batch_size / (B*T*ranks) micro-batches on each data-parallel rank
(distributed.py), then makes one AdamW update under an lr schedule, with the gradients clipped
to a global norm, unless the outlier guard skips it. After each step the loop calls its hooks,
each on its own schedule: validation, HellaSwag, a sample, the JSONL log, a checkpoint in a run
directory that a killed run resumes from exactly (checkpoints.py)."""
import contextlib
import dataclasses
import json
import os
import time

import numpy as np

from ..backends import get_backend
from ..data.loader import DataLoader
from ..errors import LlmpyError
from ..evals import hellaswag, read_hellaswag, val_loss
from ..generate import generate
from ..model.build import (build_model, check_save, flops_per_token,
                           model_source, require_tokenizer, save_model, start_ids)
from . import checkpoints, distributed, signals
from .config import (apply_embedded_default, check_flags, check_inputs, check_seq_len,
                     grad_accum_steps, is_embedded, resolve_recompute_gelu, restore_flags)
from .optim import AdamW, AdamWConfig, get_lr
from .report import progress, readable, summary
from .step import Guard, train_step


def finite_or_none(x):
    return x if np.isfinite(x) else None


class RunState:
    """What a checkpoint must hold besides the weights and AdamW's moments to continue exactly."""

    def __init__(self, cfg, loader, accum):
        self.cfg, self.loader, self.accum = cfg, loader, accum
        self.rng = np.random.default_rng(cfg.seed)        # sampling
        self.guard = Guard(cfg.skip_update_lossz, cfg.skip_update_gradz)

    def batch_shape(self):
        c, world = self.cfg, self.loader.world
        return {"batch_size": c.batch_size, "seq_len": c.seq_len, "ranks": world,
                "total_batch_size": c.batch_size * c.seq_len * world * self.accum}

    def state(self):
        g = self.guard
        return {"batch": self.batch_shape(), "train_loader": self.loader.state(),
                "rng": self.rng.bit_generator.state, "loss_window": g.losses.values,
                "grad_window": g.norms.values, "nonfinite": g.nonfinite}

    def load_state(self, s, where):
        if s["batch"] != self.batch_shape():
            b = s["batch"]
            raise LlmpyError(f"{where}: written with -b {b['batch_size']} -t {b['seq_len']} "
                             f"--total-batch-size {b['total_batch_size']} on {b['ranks']} "
                             "data-parallel rank(s); resume with those")
        self.loader.load_state(s["train_loader"])
        self.rng.bit_generator.state = s["rng"]
        g = self.guard
        g.losses.values, g.norms.values, g.nonfinite = (s["loss_window"], s["grad_window"],
                                                        s["nonfinite"])


# ----------------------------------------------------------------------------- hooks
# Each hook is made once, before the first step, so that its files are read and checked before
# any work; None where it is off. The loop calls hook(step, rec) after the steps its schedule
# names (every N steps, and the last), in this order; rec is the step's log record, which a
# hook may add to. Only rank 0 has the first four.

def val_hook(cfg, model, loader, batches):
    """The mean loss over `batches` of the val loader (--val-batches, 0: all of --val-data),
    the first at step 0 (not logged)."""
    loader.require_batches(batches, cfg.val_data)

    def hook(step, rec):
        loss = val_loss(model, loader, batches)
        if step:
            rec["val_loss"] = loss
        print(f"step {step}: val loss {loss:.6f}")
    return hook


def hellaswag_hook(cfg, model):
    examples = read_hellaswag(cfg.hellaswag_data, model)

    def hook(step, rec):
        correct, total = hellaswag(model, examples, cfg.batch_size, cfg.seq_len)
        rec["hellaswag_acc"] = correct / total
        print(f"HellaSwag: {correct}/{total} = {correct / total:.4f}")
    return hook


def sample_hook(cfg, model, tokenizer, run):
    """--sample-tokens from the start of a document, drawn with the run's generator (which
    checkpoints keep, so that a resumed run samples what the uninterrupted one did)."""
    def hook(step, rec):
        ids = generate(model, start_ids(tokenizer, []), cfg.sample_tokens, run.rng,
                       cfg.sample_temperature, cfg.sample_top_k)
        print(f"--- sample at step {step} ---\n{readable(tokenizer, list(ids))}\n---",
              flush=True)
    return hook


def log_hook(cfg, start):
    """The JSONL log: --log-jsonl, else RUN_DIR/log.jsonl; a resumed run drops the records of
    the steps it will redo. Returns (hook, the file to close)."""
    path = cfg.log_jsonl or (os.path.join(cfg.run_dir, "log.jsonl") if cfg.run_dir else "")
    if not path:
        return None, None
    if cfg.resume:
        checkpoints.trim_log(path, start)
    try:
        log = open(path, "a" if cfg.resume else "w")
    except OSError as e:
        raise LlmpyError(f"{path}: cannot write the log: {e.strerror}") from None

    def hook(step, rec):
        try:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        except OSError as e:      # a full disk: stop here, before this step's checkpoint
            raise LlmpyError(f"{path}: cannot write the log at step {step}: {e.strerror}"
                             + ("; --resume continues from the last checkpoint"
                                if cfg.run_dir else "")) from None
    return hook, log


def checkpoint_hook(cfg, model, opt, run, dist):
    """Every rank calls it: with ZeRO-1, AdamW's state is gathered from every rank's shard."""
    def hook(step, rec):
        full = dist.full_optimizer(opt)
        if dist.rank == 0:
            path = checkpoints.save(cfg.run_dir, step, model, full, run.state(), cfg.keep_last,
                                    cfg.major_every)
            print(f"saved checkpoint {path}", flush=True)
    return hook


def report(step, r, rec, cfg, where):
    """The step's line on stdout: r, train_step's result; rec, its log record; where, the
    elapsed time and ETA (report.progress)."""
    print(f"step {step:4d}/{cfg.steps} | loss {r.loss:.6f} | lr {rec['lr']:.2e} | norm "
          f"{r.norm:.4f} | {rec['ms']:8.1f} ms | {rec['tokens_per_s']:8.0f} tok/s"
          + (f" | {rec['mfu']:.1%} MFU" if "mfu" in rec else "") + where, flush=True)
    if r.skipped:
        print(f"warning: step {step}: update skipped: {r.skipped}", flush=True)


# ----------------------------------------------------------------------------- the loop

@contextlib.contextmanager
def quiet(on):
    """stdout to /dev/null while inside, if on; restored on the way out."""
    if not on:
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def train(cfg, explicit=None):
    """explicit: the fields given on the command line (cli.py); for a config built in Python,
    the fields that differ from TrainConfig's defaults. The embedded default and --resume fill
    in the others. SIGTERM or SIGINT ends it after the current step with signals.Stopped."""
    with checkpoints.locks_released(), signals.Preemption() as preempt:
        return _train(cfg, explicit, preempt)


def _train(cfg, explicit, preempt):
    if explicit is None:
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    explicit = set(explicit)
    restored = (restore_flags(cfg, explicit, cfg.run_dir,
                              {f.name for f in dataclasses.fields(cfg)} - {"resume"})
                if cfg.resume and cfg.run_dir else [])
    check_flags(cfg)
    dist = distributed.init(cfg)          # one process, or a rank of a torchrun job
    with quiet(dist.rank != 0):           # rank 0 alone prints, logs, evaluates and saves
        if restored:
            print(f"resume: flags from {cfg.run_dir}/config.json: {' '.join(restored)}")
        model = run(cfg, explicit, dist, preempt)
    dist.close()
    return model


def run(cfg, explicit, dist, preempt):
    """train() on this rank, once its flags are settled and its stdout is chosen."""
    main = dist.rank == 0
    if is_embedded(cfg):
        apply_embedded_default(cfg, explicit)
        print(f"embedded default: model {cfg.model} from scratch on the bundled Shakespeare, "
              f"saved in {cfg.run_dir}")
    if not cfg.train_data:
        raise LlmpyError("--train-data is required when --model is given (--train-data "
                         "shakespeare: the bundled Shakespeare)")
    check_inputs(cfg)
    accum = grad_accum_steps(cfg, dist.world)
    backend = get_backend(cfg.backend)
    source = model_source(cfg.model or "tiny")
    mc = source[0]
    B, T = cfg.batch_size, cfg.seq_len
    check_seq_len(T, mc)
    resolve_recompute_gelu(cfg, explicit, mc, backend, dist)
    model = build_model(cfg.model or "tiny", backend, seed=cfg.seed,
                        recompute_gelu=cfg.recompute_gelu, source=source)
    if cfg.save:
        check_save(cfg.save, model)
    tokenizer = None
    if cfg.sample_every:    # now, not at the first sample, which may come after hours
        check_seq_len(cfg.sample_tokens, mc, "--sample-tokens")
        tokenizer = require_tokenizer(model, f"--sample-every {cfg.sample_every} (or pass "
                                             "--sample-every 0)")
    opt = AdamW(model, AdamWConfig(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay),
                decayed=model.layout.decayed(), shard=dist.shard(model.num_parameters()))
    print(f"model: L={mc.num_layers} NH={mc.num_heads} C={mc.channels} V={mc.vocab_size} "
          f"Vp={mc.padded_vocab_size} maxT={mc.max_seq_len}, {model.num_parameters():,} "
          f"parameters | backend {backend.name}"
          f"{' (GELU recomputed)' if cfg.recompute_gelu else ''} | "
          f"B={B} T={T} grad accum {accum}"
          + (f" | {dist.world} ranks" + (", ZeRO-1" if dist.zero else "") if dist.world > 1
             else ""))
    loader = DataLoader(cfg.train_data, B, T, mc.vocab_size, cfg.shuffle, cfg.shuffle_seed,
                        dist.rank, dist.world)
    state = RunState(cfg, loader, accum)
    start = 0
    # (every N steps, hook), each made here, so that its files are read before any work
    val_loader = DataLoader(cfg.val_data, B, T, mc.vocab_size) if cfg.val_data and main else None
    val_batches = (cfg.val_batches or sum(val_loader.windows)) if val_loader else 0
    val = val_hook(cfg, model, val_loader, val_batches) if val_loader and cfg.val_every else None
    hooks = [(cfg.val_every, val)]
    if main and cfg.hellaswag_every:
        hooks += [(cfg.hellaswag_every, hellaswag_hook(cfg, model))]
    if main and cfg.sample_every:
        hooks += [(cfg.sample_every, sample_hook(cfg, model, tokenizer, state))]
    mem = {**model.memory(B, T), "AdamW state": opt.state_bytes()}
    print("memory: " + ", ".join(f"{k} {v / 2 ** 20:,.1f}" for k, v in mem.items())
          + f" MiB; {sum(mem.values()) / 2 ** 20:,.1f} MiB in all")
    if cfg.run_dir:
        if main:
            checkpoints.prepare(cfg.run_dir, cfg.resume)
        manifest = None
        if cfg.resume:     # ZeRO-1 keeps this rank's shard of AdamW's state; rank 0 alone
            # sets a damaged checkpoint aside
            manifest = (dist.load_sharded(cfg.run_dir, model, opt) if dist.zero else
                        checkpoints.load_latest(cfg.run_dir, model, opt, main))
        if manifest:
            state.load_state(manifest, cfg.run_dir)
            start = manifest["step"]
            if main and start >= cfg.steps:
                print(f"{cfg.run_dir}: already finished at step {start} (--steps {cfg.steps}): "
                      f"nothing to train; pass a larger --steps to continue it")
        if main:    # once the checkpoint fits these flags: a refused --resume leaves it as it was
            checkpoints.write_config(cfg.run_dir, {"train": dataclasses.asdict(cfg),
                                                   "model": dataclasses.asdict(mc),
                                                   "backend": backend.name,
                                                   "git_commit": checkpoints.git_commit()})
    log, logfile = log_hook(cfg, start) if main else (None, None)
    hooks += [(1, log)]
    save = checkpoint_hook(cfg, model, opt, state, dist) if cfg.run_dir else None
    hooks += [(cfg.checkpoint_every, save)]
    hooks = [(every, hook) for every, hook in hooks if hook and every]
    dist.broadcast(model.params.buf)      # every rank starts from rank 0's weights
    # model FLOPs utilization per GPU, as llm.c prints it, where the backend knows its peak
    peak = backend.peak_flops()
    t_start, rec = time.perf_counter(), {}
    try:
        if val and start == 0:
            val(0, {})
        t_loop = time.perf_counter()
        for step in range(start + 1, cfg.steps + 1):
            t0 = time.perf_counter()
            if cfg.overfit_single_batch:
                loader.reset()
            lr = get_lr(step - 1, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.steps,
                        cfg.final_lr_frac)
            r = train_step(model, opt, [loader.next_batch() for _ in range(accum)], lr,
                           cfg.grad_clip, state.guard, dist, step)
            ms = (time.perf_counter() - t0) * 1e3
            rec = {"step": step, "train_loss": finite_or_none(r.loss), "ms": ms,
                   "tokens_per_s": B * T * accum * dist.world / ms * 1e3, "lr": lr,
                   "grad_norm": finite_or_none(r.norm)}
            if peak:
                rec["mfu"] = flops_per_token(mc, T) * rec["tokens_per_s"] / dist.world / peak
            if r.skipped:
                rec["skipped"] = r.skipped
            now = time.perf_counter()
            report(step, r, rec, cfg, progress(now - t_start, now - t_loop, step, start,
                                               cfg.steps))
            last = step == cfg.steps
            for every, hook in hooks:
                if step % every == 0 or last:
                    hook(step, rec)
            if not last and preempt.agreed(dist):     # every rank agrees, or none stops
                if save and not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    save(step, rec)
                dist.close()
                raise preempt.stopped(step, cfg.run_dir and os.path.join(cfg.run_dir,
                                                                         f"ckpt_{step:08d}"))
    finally:
        if logfile:
            with contextlib.suppress(OSError):    # what a full disk left in its buffer
                logfile.close()
    if cfg.save and main:
        save_model(cfg.save, model, backend.to_host(model.params.buf))
        print(f"saved {cfg.save}")
    if main and rec:
        print("\n".join(summary(cfg, time.perf_counter() - t_start, rec, val_batches,
                                cfg.run_dir and checkpoints.newest_checkpoint(cfg.run_dir))))
    return model
