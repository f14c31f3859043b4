"""The training loop, as llm.c's train_gpt2.cu runs it: each step accumulates the gradients of
total_batch_size / (B*T*ranks) micro-batches on each data-parallel rank (distributed.py),
then makes one AdamW update under an lr schedule, with the gradients clipped to a global norm,
unless the outlier guard skips it. Validation, HellaSwag and samples every so often; a JSONL
log; and checkpoints in a run directory that a killed run resumes from exactly (see
checkpoints.py)."""
import dataclasses
import json
import math
import os
import sys
import time

import numpy as np

from ..backends import get_backend
from ..data.loader import DataLoader
from ..errors import LlmpyError
from ..evals import hellaswag, read_evalfile, val_loss
from ..generate import generate
from ..io.modelfile import write_model
from ..io.tokenizer import EOT, Tokenizer
from ..model.build import build_model
from ..model.gpt2 import flops_per_token
from . import checkpoints, distributed
from .config import (apply_embedded_default, check_flags, check_inputs, check_seq_len,
                     grad_accum_steps, restore_flags)
from .optim import AdamW, AdamWConfig, OutlierDetector, clip_scale, get_lr
from .report import progress, readable, summary

MAX_NONFINITE = 3   # steps in a row with a NaN/inf loss or grad norm before a run gives up


# Room kept beyond the buffers' own sizes (GPT2.memory, AdamW.state_bytes) before a run keeps
# every GELU output: cuBLAS's workspace, the allocator's rounding, the kernels' temporaries
# (0.2 GiB over 27.9 measured at GPT-2 124M, B=64, T=1024 on an H200: bench/RESULTS.md).
MEMORY_MARGIN = 1.1, 2 ** 30            # (times the plan, plus bytes)


def default_recompute_gelu(model, opt, backend, B, T):
    """--recompute-gelu's default. On a GPU: recompute GELU in the backward pass (llm.c's -r 1)
    only when the memory plan with every layer's output kept would not fit in what the GPU has
    for this process, as keeping them saves a GELU a layer (1-2 ms a step at GPT-2 124M, B=64 on
    an H200). On the gpu backend in Triton's interpreter, which has no GPU memory to fill:
    recompute, as llm.c does by default. On the CPU: keep them (memory is rarely the limit).
    Each rank of a distributed run decides for its own GPU; both ways give the same numbers."""
    if not backend.caps.fused:            # the CPU backends: llm.c's CPU trainer keeps them
        return False
    available = backend.available_memory()
    if available is None:                 # no device memory to fill: llm.c's CUDA default
        return True
    scale, extra = MEMORY_MARGIN
    need = sum(model.memory(B, T, recompute_gelu=False).values()) + opt.state_bytes()
    return need * scale + extra > available


def sample_text(model, tokenizer, cfg, rng):
    ids = list(generate(model, [], cfg.sample_tokens, rng, cfg.sample_temperature,
                        cfg.sample_top_k))
    return readable(tokenizer, ids)


def forward_backward(model, loader, accum, dist):
    """Gradients of the mean loss over `accum` micro-batches, as one batch of accum*B rows would
    give them, averaged over the data-parallel ranks. Returns this rank's mean loss."""
    model.zero_grad()
    loss = 0.0
    for i in range(accum):
        loss += model.forward(*loader.next_batch())
        # adds d(micro-batch mean loss / (accum * ranks)) into model.grads, so that the ranks'
        # sum is the mean's gradient; in the last micro-step the ranks start summing each
        # layer's gradients as soon as they are final
        model.backward(dist.layer_hook(model) if i == accum - 1 else None,
                       scale=1.0 / (accum * dist.world))
    dist.sync_grads(model)
    return loss / accum


def skip_reason(loss, norm, zloss, zgrad, cfg):
    """Why this step's update must not happen (llm.c's -sl/-sg, and NaN/inf), or None."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(norm):
        return f"the gradient norm is {norm}"
    if cfg.skip_update_lossz and zloss > cfg.skip_update_lossz:
        return f"loss z-score {zloss:.2f} > {cfg.skip_update_lossz}"
    if cfg.skip_update_gradz and zgrad > cfg.skip_update_gradz:
        return f"grad norm z-score {zgrad:.2f} > {cfg.skip_update_gradz}"
    return None


def finite_or_none(x):
    return x if math.isfinite(x) else None


class RunState:
    """What a checkpoint must hold besides the weights and AdamW's moments to continue exactly."""

    def __init__(self, cfg, loader, accum):
        self.cfg, self.loader, self.accum = cfg, loader, accum
        self.rng = np.random.default_rng(cfg.seed)        # sampling
        self.loss_z, self.grad_z = OutlierDetector(), OutlierDetector()
        self.nonfinite = 0                                 # steps in a row

    def batch_shape(self):
        c, world = self.cfg, self.loader.world
        return {"batch_size": c.batch_size, "seq_len": c.seq_len, "ranks": world,
                "total_batch_size": c.batch_size * c.seq_len * world * self.accum}

    def state(self):
        return {"batch": self.batch_shape(), "train_loader": self.loader.state(),
                "rng": self.rng.bit_generator.state, "loss_window": self.loss_z.values,
                "grad_window": self.grad_z.values, "nonfinite": self.nonfinite}

    def load_state(self, s, where):
        if s["batch"] != self.batch_shape():
            b = s["batch"]
            raise LlmpyError(f"{where}: written with -b {b['batch_size']} -t {b['seq_len']} "
                             f"--total-batch-size {b['total_batch_size']} on {b['ranks']} "
                             "data-parallel rank(s); resume with those")
        self.loader.load_state(s["train_loader"])
        self.rng.bit_generator.state = s["rng"]
        self.loss_z.values, self.grad_z.values = s["loss_window"], s["grad_window"]
        self.nonfinite = s["nonfinite"]


def open_log(cfg, start):
    """The JSONL log: --log-jsonl, else RUN_DIR/log.jsonl; a resumed run drops the records of
    the steps it will redo."""
    path = cfg.log_jsonl or (os.path.join(cfg.run_dir, "log.jsonl") if cfg.run_dir else "")
    if not path:
        return None
    if cfg.resume:
        checkpoints.trim_log(path, start)
    try:
        return open(path, "a" if cfg.resume else "w")
    except OSError as e:
        raise LlmpyError(f"{path}: cannot write the log: {e.strerror}") from None


def guard(step, loss, norm, model, run, cfg):
    """The outlier guard: the reason to skip this step's update, or None. Stops the run when
    the weights themselves are broken, or after MAX_NONFINITE non-finite steps in a row."""
    zloss = run.loss_z.update(loss) if math.isfinite(loss) else math.nan
    zgrad = run.grad_z.update(norm) if math.isfinite(norm) else math.nan
    reason = skip_reason(loss, norm, zloss, zgrad, cfg)
    finite = math.isfinite(loss) and math.isfinite(norm)
    run.nonfinite = 0 if finite else run.nonfinite + 1
    if not math.isfinite(loss) and not math.isfinite(float(model.params.buf.sum())):
        raise LlmpyError(f"step {step}: the loss is {loss}: the model's weights are not finite")
    if run.nonfinite >= MAX_NONFINITE:
        raise LlmpyError(f"step {step}: {reason}, {MAX_NONFINITE} steps in a row; stopping with "
                         "the weights of the last good update (try a lower --lr)")
    return reason


def train(cfg, explicit=None):
    """explicit: the fields given on the command line (cli.py); for a config built in Python,
    the fields that differ from TrainConfig's defaults. The embedded default and --resume fill
    in the others."""
    if explicit is None:
        explicit = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != f.default}
    restored = (restore_flags(cfg, explicit, cfg.run_dir,
                              {f.name for f in dataclasses.fields(cfg)} - {"resume"})
                if cfg.resume and cfg.run_dir else [])
    check_flags(cfg)
    dist = distributed.init(cfg)          # one process, or a rank of a torchrun job
    main = dist.rank == 0                 # rank 0 alone prints, logs, evaluates and saves
    if not main:
        sys.stdout = open(os.devnull, "w")
    if restored:
        print(f"resume: flags from {cfg.run_dir}/config.json: {' '.join(restored)}")
    if not cfg.model and not cfg.train_data:
        apply_embedded_default(cfg, explicit)
        print(f"embedded default: model {cfg.model} from scratch on the bundled Shakespeare, "
              f"saved in {cfg.run_dir}")
    if not cfg.train_data:
        raise LlmpyError("--train-data is required when --model is given (--train-data "
                         "shakespeare: the bundled Shakespeare)")
    check_inputs(cfg)
    accum = grad_accum_steps(cfg, dist.world)
    backend = get_backend(cfg.backend)
    model = build_model(cfg.model or "tiny", backend, seed=cfg.seed,
                        recompute_gelu=bool(cfg.recompute_gelu))
    mc = model.config
    B, T = cfg.batch_size, cfg.seq_len
    check_seq_len(T, mc)
    if cfg.sample_every:    # now, not at the first sample, which may come after hours
        check_seq_len(cfg.sample_tokens, mc, "--sample-tokens")
        if mc.vocab_size <= EOT:
            raise LlmpyError(f"--sample-every {cfg.sample_every}: samples start from "
                             f"<|endoftext|> ({EOT}) and decode with GPT-2's tokenizer, but the "
                             f"model's vocabulary has {mc.vocab_size} tokens: pass "
                             "--sample-every 0")
    opt = AdamW(model, AdamWConfig(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay),
                decayed=model.layout.decayed(), shard=dist.shard(model.num_parameters()))
    if cfg.recompute_gelu is None:        # config.json then records what ran
        cfg.recompute_gelu = default_recompute_gelu(model, opt, backend, B, T)
        model.recompute_gelu = cfg.recompute_gelu   # before the first forward sizes the buffers
    print(f"model: L={mc.num_layers} NH={mc.num_heads} C={mc.channels} V={mc.vocab_size} "
          f"Vp={mc.padded_vocab_size} maxT={mc.max_seq_len}, {model.num_parameters():,} "
          f"parameters | backend {backend.name}"
          f"{' (GELU recomputed)' if cfg.recompute_gelu else ''} | "
          f"B={B} T={T} grad accum {accum}"
          + (f" | {dist.world} ranks" + (", ZeRO-1" if dist.zero else "") if dist.world > 1
             else ""))
    train_loader = DataLoader(cfg.train_data, B, T, mc.vocab_size, cfg.shuffle,
                              cfg.shuffle_seed, dist.rank, dist.world)
    val_loader = DataLoader(cfg.val_data, B, T, mc.vocab_size) if cfg.val_data and main else None
    val_batches = (cfg.val_batches or sum(val_loader.windows)) if val_loader else 0
    if val_loader and cfg.val_every:
        val_loader.require_batches(val_batches, cfg.val_data)
    hella = (read_evalfile(cfg.hellaswag_data, mc.vocab_size) if cfg.hellaswag_every and main
             else None)
    tokenizer = Tokenizer() if cfg.sample_every and main else None
    mem = {**model.memory(B, T), "AdamW state": opt.state_bytes()}
    print("memory: " + ", ".join(f"{k} {v / 2 ** 20:,.1f}" for k, v in mem.items())
          + f" MiB; {sum(mem.values()) / 2 ** 20:,.1f} MiB in all")
    # model FLOPs utilization per GPU, as llm.c prints it, where the backend knows its peak
    peak = backend.peak_flops()
    run = RunState(cfg, train_loader, accum)
    start = 0
    if cfg.run_dir:
        if main:
            checkpoints.prepare(cfg.run_dir, cfg.resume)
        manifest = dist.load_checkpoint(cfg.run_dir, model, opt) if cfg.resume else None
        if manifest:
            run.load_state(manifest, cfg.run_dir)
            start = manifest["step"]
            if main and start >= cfg.steps:
                print(f"{cfg.run_dir}: already finished at step {start} (--steps {cfg.steps}): "
                      f"nothing to train; pass a larger --steps to continue it")
        if main:    # once the checkpoint fits these flags: a refused --resume leaves it as it was
            checkpoints.write_config(cfg.run_dir, {"train": dataclasses.asdict(cfg),
                                              "model": dataclasses.asdict(mc),
                                              "backend": backend.name,
                                              "git_commit": checkpoints.git_commit()})
    dist.broadcast(model.params.buf)      # every rank starts from rank 0's weights
    log = open_log(cfg, start) if main else None
    do_val = val_loader is not None and cfg.val_every > 0
    t_start, rec = time.perf_counter(), {}
    try:
        if do_val and start == 0:
            print(f"step 0: val loss {val_loss(model, val_loader, val_batches):.6f}")
        for step in range(start + 1, cfg.steps + 1):
            last = step == cfg.steps
            t0 = time.perf_counter()
            if cfg.overfit_single_batch:
                train_loader.reset()
            lr = get_lr(step - 1, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.steps,
                        cfg.final_lr_frac)
            loss = dist.mean(forward_backward(model, train_loader, accum, dist))
            norm = dist.grad_norm(model)
            reason = guard(step, loss, norm, model, run, cfg)
            if reason is None:
                opt.update(lr, clip_scale(norm, cfg.grad_clip))
                dist.sync_params(model.params.buf)
            dist.check_params(model.params.buf, step)
            ms = (time.perf_counter() - t0) * 1e3
            rec = {"step": step, "train_loss": finite_or_none(loss), "ms": ms,
                   "tokens_per_s": B * T * accum * dist.world / ms * 1e3, "lr": lr,
                   "grad_norm": finite_or_none(norm)}
            if peak:
                rec["mfu"] = flops_per_token(mc, T) * rec["tokens_per_s"] / dist.world / peak
            print(f"step {step:4d}/{cfg.steps} | loss {loss:.6f} | lr {lr:.2e} | norm "
                  f"{norm:.4f} | {ms:8.1f} ms | {rec['tokens_per_s']:8.0f} tok/s"
                  + (f" | {rec['mfu']:.1%} MFU" if peak else "")
                  + progress(time.perf_counter() - t_start, step, start, cfg.steps), flush=True)
            if reason:
                rec["skipped"] = reason
                print(f"warning: step {step}: update skipped: {reason}", flush=True)
            if do_val and (step % cfg.val_every == 0 or last):
                rec["val_loss"] = val_loss(model, val_loader, val_batches)
                print(f"step {step}: val loss {rec['val_loss']:.6f}")
            if hella and (step % cfg.hellaswag_every == 0 or last):
                correct, total = hellaswag(model, hella, B, T)
                rec["hellaswag_acc"] = correct / total
                print(f"HellaSwag: {correct}/{total} = {correct / total:.4f}")
            if tokenizer and (step % cfg.sample_every == 0 or last):
                text = sample_text(model, tokenizer, cfg, run.rng)
                print(f"--- sample at step {step} ---\n{text}\n---", flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            if cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or last):
                full = dist.full_optimizer(opt)   # all ranks: ZeRO-1 gathers the shards
                if main:
                    checkpoints.save(cfg.run_dir, step, model, full, run.state(), cfg.keep_last,
                                cfg.major_every)
                    print(f"saved checkpoint {checkpoints.newest_checkpoint(cfg.run_dir)}")
    finally:
        if log:
            log.close()
    if cfg.save and main:
        write_model(cfg.save, mc, backend.to_host(model.params.buf))
        print(f"saved {cfg.save}")
    if main and rec:
        print("\n".join(summary(cfg, time.perf_counter() - t_start, rec, val_batches,
                                val_batches * B * T, cfg.run_dir and
                                checkpoints.newest_checkpoint(cfg.run_dir))))
    dist.close()
    return model

