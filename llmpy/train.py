"""The training loop: forward, backward, update, with validation, sampling and logs."""
import json
import math
import time

import numpy as np

from .backends import get_backend
from .checkpoint import read_model, write_model
from .config import EMBEDDED_DEFAULT, PRESETS, preset
from .data import DataLoader, bundled_data
from .errors import LlmpyError
from .model import GPT2, init_weights, load_params
from .optim import AdamW, AdamWConfig
from .sample import generate_recompute
from .tokenizer import Tokenizer


def build_model(spec, backend, seed=0, max_seq_len=1024):
    """A model from an llm.c .bin path, or from scratch from a preset name."""
    if spec in PRESETS:
        model = GPT2(preset(spec, max_seq_len=max_seq_len), backend)
        init_weights(model, seed)
        return model
    cfg, params = read_model(spec)
    model = GPT2(cfg, backend)
    load_params(model, params)
    return model


def apply_embedded_default(cfg, explicit):
    """No model and no data: train a small model from scratch on the bundled Shakespeare."""
    for k, v in EMBEDDED_DEFAULT.items():
        if k not in explicit:
            setattr(cfg, k, v)
    cfg.train_data = bundled_data("shakespeare_train.bin")
    if "val_data" not in explicit:
        cfg.val_data = bundled_data("shakespeare_val.bin")


def evaluate(model, loader, num_batches):
    loader.reset()
    return float(np.mean([model.forward(*loader.next_batch()) for _ in range(num_batches)]))


def sample_text(model, tokenizer, cfg, rng):
    ids = list(generate_recompute(model, [], cfg.sample_tokens, rng, T=model.T))
    return tokenizer.decode(ids)


def train(cfg, explicit=()):
    if not cfg.model and not cfg.train_data:
        apply_embedded_default(cfg, explicit)
        print(f"embedded default: model {cfg.model} from scratch on the bundled Shakespeare")
    if not cfg.train_data:
        raise LlmpyError("--train-data is required when --model is given")
    backend = get_backend(cfg.backend)
    model = build_model(cfg.model or "tiny", backend, seed=cfg.seed)
    mc = model.config
    B, T = cfg.batch_size, cfg.seq_len
    if T > mc.max_seq_len:
        raise LlmpyError(f"--seq-len {T} exceeds the model's max_seq_len {mc.max_seq_len}")
    print(f"model: L={mc.num_layers} NH={mc.num_heads} C={mc.channels} V={mc.vocab_size} "
          f"Vp={mc.padded_vocab_size} maxT={mc.max_seq_len}, {model.num_parameters():,} "
          f"parameters | backend {backend.name} | B={B} T={T}")
    train_loader = DataLoader(cfg.train_data, B, T, mc.vocab_size, cfg.shuffle, cfg.seed)
    val_loader = DataLoader(cfg.val_data, B, T, mc.vocab_size) if cfg.val_data else None
    tokenizer = Tokenizer() if cfg.sample_every else None
    opt = AdamW(model, AdamWConfig(cfg.lr, cfg.beta1, cfg.beta2, cfg.eps, cfg.weight_decay))
    rng = np.random.default_rng(cfg.seed)
    log = open(cfg.log_jsonl, "w") if cfg.log_jsonl else None
    do_val = val_loader is not None and cfg.val_every > 0
    try:
        if do_val:
            print(f"step 0: val loss {evaluate(model, val_loader, cfg.val_batches):.6f}")
        for step in range(1, cfg.steps + 1):
            last = step == cfg.steps
            t0 = time.perf_counter()
            loss = model.forward(*train_loader.next_batch())
            if not math.isfinite(loss):
                raise LlmpyError(f"step {step}: the loss is {loss}; stopping before the weights "
                                 "are corrupted (try a lower --lr)")
            model.zero_grad()
            model.backward()
            opt.update()
            ms = (time.perf_counter() - t0) * 1e3
            rec = {"step": step, "train_loss": loss, "ms": ms, "tokens_per_s": B * T / ms * 1e3}
            print(f"step {step:4d}/{cfg.steps} | loss {loss:.6f} | {ms:8.1f} ms | "
                  f"{rec['tokens_per_s']:8.0f} tok/s", flush=True)
            if do_val and (step % cfg.val_every == 0 or last):
                rec["val_loss"] = evaluate(model, val_loader, cfg.val_batches)
                print(f"val loss {rec['val_loss']:.6f}")
            if cfg.sample_every and (step % cfg.sample_every == 0 or last):
                print(f"--- sample at step {step} ---\n{sample_text(model, tokenizer, cfg, rng)}\n---",
                      flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    finally:
        if log:
            log.close()
    if cfg.save:
        write_model(cfg.save, mc, backend.to_host(model.params.buf))
        print(f"saved {cfg.save}")
    return model
