"""Evaluation: the mean loss over token files, and HellaSwag accuracy on llm.c's eval file, as
llm.c's EvalLoader computes it; `llmpy eval` runs both on a model, `llmpy train` every so often.

The file (written by `llmpy prepro hellaswag`, or llm.c's dev/data/hellaswag.py): a 256 x int32
header (magic 20240522, version 1, number of examples, longest example in bytes), then per
example a stream of uint16: 65535 (<START_EXAMPLE>), the example's size in bytes, its index,
the label, the number of completions (4), the context length and tokens, then each completion's
length and tokens. Each completion is scored by the model's mean loss over its tokens after
the shared context; the lowest wins (llm.c's acc_norm)."""
import json
import math
import os
import sys

import numpy as np

from .errors import LlmpyError, require_finite
from .io.files import HEADER_BYTES, atomic_write, make_header, read_header

EVAL_MAGIC, EVAL_VERSION = 20240522, 1
START_EXAMPLE = 65535
NUM_COMPLETIONS = 4


def progress(iterable, desc="", **kwargs):
    """A tqdm progress bar on stderr when it is a terminal; without tqdm, a counter there."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _counter(iterable, desc) if sys.stderr.isatty() else iterable
    return tqdm(iterable, disable=None, leave=False, desc=desc, **kwargs)


def _counter(iterable, desc):
    items = list(iterable)
    for i, x in enumerate(items):
        print(f"\r{desc} {i}/{len(items)}", end="", file=sys.stderr, flush=True)
        yield x
    print(f"\r{desc} {len(items)}/{len(items)}", file=sys.stderr)


def write_evalfile(path, examples):
    """examples: [(label, context tokens, [completion tokens] * 4)] -> llm.c's eval file."""
    stream, longest = [], 0
    for i, (label, ctx, endings) in enumerate(examples):
        ex = [START_EXAMPLE, 0, i, label, len(endings), len(ctx), *ctx]
        for end in endings:
            ex += [len(end), *end]
        ex[1] = 2 * len(ex)
        if ex[1] >= 2 ** 16 or max(ex[2:]) >= START_EXAMPLE:
            raise LlmpyError(f"{path}: example {i} does not fit llm.c's uint16 eval format")
        longest = max(longest, ex[1])
        stream += ex
    atomic_write(path, [make_header(EVAL_MAGIC, EVAL_VERSION, len(examples), longest),
                        np.array(stream, dtype="<u2")])


def parse_example(data, pos, i):
    """The example at data[pos] (uint16 values) -> ((label, context, completions), its end).
    Raises ValueError naming what is wrong."""
    if pos + 6 > len(data):
        raise ValueError("truncated: the file ends before it")
    start, nbytes, index, label, ncomp = data[pos:pos + 5]
    if start != START_EXAMPLE or index != i:
        raise ValueError(f"corrupt: expected <START_EXAMPLE> {START_EXAMPLE} and index {i}, got "
                         f"{start} and {index}")
    if ncomp != NUM_COMPLETIONS:
        raise ValueError(f"{ncomp} completions, expected {NUM_COMPLETIONS}")
    if not 0 <= label < ncomp:
        raise ValueError(f"label {label} not in 0..{ncomp - 1}")
    end = pos + nbytes // 2
    if end > len(data):
        raise ValueError(f"truncated: the file ends inside its {nbytes} bytes")
    fields, q = [], pos + 5
    for _ in range(1 + ncomp):                # the context, then each completion
        length = data[q] if q < end else 0
        if length == 0 or q + 1 + length > end:
            raise ValueError(f"corrupt: a token run is empty or overflows the example's "
                             f"{nbytes} bytes")
        fields.append(data[q + 1:q + 1 + length])
        q += 1 + length
    if q != end:
        raise ValueError(f"corrupt: {2 * (q - pos)} bytes of fields, but the example says {nbytes}")
    return (label, fields[0], fields[1:]), end


def read_evalfile(path, vocab_size=None):
    """The examples of an eval file, validated (their token ids against vocab_size, when
    given): [(label, context tokens, [completions])]."""
    h = read_header(path, EVAL_MAGIC, (EVAL_VERSION,), "eval")
    n = int(h[2])
    if n == 0:
        raise LlmpyError(f"{path}: no examples")
    data = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES).tolist()
    examples, pos = [], 0
    for i in range(n):
        try:
            example, pos = parse_example(data, pos, i)
        except ValueError as e:
            raise LlmpyError(f"{path}: example {i} of {n}: {e}") from None
        if vocab_size is not None:
            top = max(max(example[1]), *map(max, example[2]))      # the largest token id
            if top >= vocab_size:
                raise LlmpyError(f"{path}: example {i}: token id {top} is out of range for "
                                 f"the model's vocab size {vocab_size}")
        examples.append(example)
    if pos != len(data):
        raise LlmpyError(f"{path}: {2 * (len(data) - pos)} trailing bytes after {n} examples")
    return examples


def read_hellaswag(path, model):
    """read_evalfile for this model, whose ids must be GPT-2's: llm.c's HellaSwag file holds
    GPT-2 tokens, which mean other text to another tokenizer."""
    from .model.build import has_gpt2_ids
    if not has_gpt2_ids(model):
        source = model.source
        what = source.tokenizer_path() or f"a vocabulary of {model.config.vocab_size:,} tokens"
        raise LlmpyError(f"{path}: HellaSwag's eval file holds GPT-2 tokens, but {source.spec} "
                         f"has its own tokenizer ({what}); HellaSwag scores models with GPT-2's "
                         "tokenizer only")
    return read_evalfile(path, model.config.vocab_size)


def fill_row(inputs, targets, mask, row, ctx, end):
    """One completion as one row: inputs = context + completion; each completion token is the
    target at the position before it. A row longer than T loses its first tokens."""
    T = inputs.shape[1]
    full = ctx + end
    cut = max(0, len(full) - T)               # 0 whenever it fits, as in llm.c
    inputs[row, :len(full) - cut] = full[cut:]
    first = max(len(ctx), cut + 1)            # the first completion token with a predecessor
    targets[row, first - 1 - cut:len(full) - 1 - cut] = full[first:]
    mask[row, first - 1 - cut:len(full) - 1 - cut] = True


def hellaswag(model, examples, B, T):
    """(correct, total) over the examples, max(1, B // 4) examples per (4 * that, T) batch."""
    per_batch = max(1, B // NUM_COMPLETIONS)
    rows = per_batch * NUM_COMPLETIONS
    correct = 0
    for b in progress(range(0, len(examples), per_batch), desc="HellaSwag"):
        batch = examples[b:b + per_batch]
        inputs = np.zeros((rows, T), dtype=np.int64)      # (rows,T)
        targets = np.zeros((rows, T), dtype=np.int64)     # (rows,T)
        mask = np.zeros((rows, T), dtype=bool)            # (rows,T) the scored positions
        for e, (_, ctx, endings) in enumerate(batch):
            for c, end in enumerate(endings):
                fill_row(inputs, targets, mask, e * NUM_COMPLETIONS + c, ctx, end)
        model.forward(inputs, targets)
        losses = np.asarray(model.backend.to_host(model.acts.losses), dtype=np.float64)
        mean = (losses * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1)     # (rows,)
        pred = mean.reshape(per_batch, NUM_COMPLETIONS)[:len(batch)].argmin(axis=1)
        correct += int((pred == [label for label, _, _ in batch]).sum())
    return correct, len(examples)


def val_loss(model, loader, num_batches):
    """The mean loss over the loader's first num_batches batches: each holds B*T tokens, so this
    is also the mean over their tokens."""
    loader.reset()
    return float(np.mean([model.forward(*loader.next_batch())
                          for _ in progress(range(num_batches), desc="val batches")]))


def evaluate(cfg, explicit):
    """`llmpy eval`: cfg an EvalConfig, explicit the fields given on the command line.
    Returns the results printed: {"val_loss", "val_tokens", "hellaswag_acc", ...}."""
    from .backends import get_backend
    from .data.loader import DataLoader, bundled_data
    from .model.build import build_model, is_model_dir
    from .train.config import check_exists, check_fields, check_seq_len, data_path, restore_flags
    if not cfg.model:
        raise LlmpyError("eval: --model is required")
    if os.path.isdir(cfg.model) and not is_model_dir(cfg.model):     # a run directory
        batches = {"val_data", "batch_size", "seq_len"}
        # and the run's --val-batches where its batches are these, so that its last val loss
        # comes out as the log has it
        restored = restore_flags(cfg, explicit, cfg.model, batches | {"backend"} | (
            set() if batches & explicit else {"val_batches"}))
        if restored and not cfg.json:
            print(f"from {cfg.model}/config.json: {' '.join(restored)}")
    if not cfg.val_data and not cfg.hellaswag_data:
        cfg.val_data = bundled_data("shakespeare_val.bin")
    cfg.val_data = data_path(cfg.val_data, "val")    # every local path before a hub download
    check_exists(cfg.hellaswag_data)
    check_fields(cfg)                     # the flags as given and as restored
    model = build_model(cfg.model, get_backend(cfg.backend))
    require_finite(model.backend.to_host(model.params.buf), f"{cfg.model}: the weights")
    B, T, mc = cfg.batch_size, cfg.seq_len, model.config
    check_seq_len(T, mc)
    r = {"model": cfg.model, "num_layers": mc.num_layers, "channels": mc.channels,
         "batch_size": B, "seq_len": T, "backend": model.backend.name}
    # read every file before the first forward pass, so bad input fails at once
    loader = DataLoader(cfg.val_data, B, T, mc.vocab_size) if cfg.val_data else None
    examples = read_hellaswag(cfg.hellaswag_data, model) if cfg.hellaswag_data else None
    if loader:
        batches = cfg.val_batches or sum(loader.windows)
        loader.require_batches(batches, cfg.val_data)
        r.update(val_data=cfg.val_data, val_loss=val_loss(model, loader, batches),
                 val_tokens=batches * B * T)
        if not math.isfinite(r["val_loss"]):     # finite weights can still overflow
            raise LlmpyError(f"{cfg.model}: the val loss on {cfg.val_data} is {r['val_loss']}")
        r["val_perplexity"] = math.exp(r["val_loss"])
    if examples:
        correct, total = hellaswag(model, examples, B, T)
        r.update(hellaswag_data=cfg.hellaswag_data, hellaswag_correct=correct,
                 hellaswag_total=total, hellaswag_acc=correct / total)
    if cfg.json:
        print(json.dumps(r, indent=1))
        return r
    print(f"model {cfg.model}: L={mc.num_layers} C={mc.channels} | backend {r['backend']} | "
          f"B={B} T={T}")
    if loader:
        print(f"val loss {r['val_loss']:.6f} | perplexity {r['val_perplexity']:.2f} | "
              f"{r['val_tokens']:,} tokens of {cfg.val_data}")
    if examples:
        print(f"HellaSwag: {correct}/{total} = {r['hellaswag_acc']:.4f} (acc_norm)")
    return r
