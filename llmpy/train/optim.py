"""AdamW over the flat parameter buffer, the way torch.optim.AdamW computes it; llm.c's
learning-rate schedules; global-norm gradient clipping; the outlier detector of llm.c's -sl/-sg.

Everything here touches arrays only through backend ops or operators that NumPy arrays and
torch tensors share (slicing, `@`, `*=`), so every backend runs it unchanged."""
import math
from dataclasses import dataclass

import numpy as np

SCHEDULES = ("cosine", "linear", "constant", "wsd")


@dataclass
class AdamWConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


def state_bytes(n, itemsize):
    """Bytes of AdamW's float32 state for n parameters of `itemsize` bytes: m and v, and the
    master weights that a backend with bf16 params adds at the first update."""
    return 4 * n * (3 if itemsize < 4 else 2)


def decay_ranges(params, weight_decay, decayed=None, shard=None):
    """[(slice, weight decay)]: runs of adjacent tensors that share a decay, within `shard` (a
    slice of the flat buffer; None: all of it) and relative to its start.
    decayed: the names that get weight_decay (None: all, as one torch param group)."""
    shard = shard or slice(0, len(params))
    ranges = []
    for name, shape in params.shapes.items():
        o, n = params.offsets[name], int(np.prod(shape))
        a, b = max(o, shard.start) - shard.start, min(o + n, shard.stop) - shard.start
        if a >= b:
            continue
        wd = weight_decay if decayed is None or name in decayed else 0.0
        if ranges and ranges[-1][1] == wd and ranges[-1][0].stop == a:
            ranges[-1] = (slice(ranges[-1][0].start, b), wd)
        else:
            ranges.append((slice(a, b), wd))
    return ranges


class AdamW:
    def __init__(self, model, config=None, decayed=None, shard=None):
        """shard: the slice of the flat buffer to update, with state for it alone (ZeRO-1:
        this rank's, see distributed.py); None: all of it."""
        self.model = model
        self.config = config or AdamWConfig()
        self.shard = shard or slice(0, len(model.params))
        n = self.shard.stop - self.shard.start
        zeros = model.backend.zeros
        self.m = zeros(n, np.float32)        # (n,) first moment
        self.v = zeros(n, np.float32)        # (n,) second moment
        # (n,) float32 master weights, for a backend whose params are bf16 (llm.c's
        # master_weights); None while the params are float32 themselves
        self.master = None
        self.step = 0                        # updates done, for the bias corrections
        self.ranges = decay_ranges(model.params, self.config.weight_decay, decayed, self.shard)

    def state_bytes(self):
        return state_bytes(self.shard.stop - self.shard.start, self.model.params.buf.itemsize)

    def update(self, lr=None, grad_scale=1.0):
        """One AdamW step with the gradients in model.grads times grad_scale (clip_scale); lr
        overrides the config's."""
        c = self.config
        self.step += 1
        lr = c.lr if lr is None else lr
        be = self.model.backend
        p, g = self.model.params.buf[self.shard], self.model.grads.buf[self.shard]   # (n,)
        if self.master is None and be.caps.master_weights:
            self.master = be.master_weights(p)  # made here: after any load into the params
        for s, wd in self.ranges:
            args = (p[s], g[s], self.m[s], self.v[s], self.step, lr, c.beta1, c.beta2, c.eps, wd,
                    grad_scale)
            if self.master is None:
                be.adamw_update(*args)
            else:   # update the master weights, and round them into the params
                be.adamw_update(*args, master=self.master[s])


def get_lr(step, lr, schedule="cosine", warmup=0, total=1, final_frac=1.0):
    """The learning rate of update number `step` (0-based) of `total`, as llm.c's schedulers.h:
    linear warmup over `warmup` steps, then a decay to lr * final_frac by the end: cosine,
    linear, or wsd (constant, then 1 - sqrt over the last 20%). constant ignores warmup."""
    if schedule == "constant":
        return lr
    if step < warmup:
        return lr * (step + 1) / warmup
    min_lr = lr * final_frac
    if schedule == "wsd":
        decay_start = int(0.8 * total)
        if step < decay_start:
            return lr
        ratio = (step - decay_start) / (total - decay_start)
        return min_lr + (1.0 - math.sqrt(ratio)) * (lr - min_lr)
    ratio = (step - warmup) / (total - warmup)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)
    if schedule == "linear":
        return lr - ratio * (lr - min_lr)
    raise ValueError(f"unknown schedule {schedule!r}")


def global_norm(buf, backend):
    """L2 norm of a flat float buffer (all gradients at once), as a Python float."""
    return math.sqrt(backend.sum_squares(buf))


def clip_scale(norm, max_norm):
    """What to multiply the gradients by so that their norm is at most max_norm (0: off), as
    llm.c's grad_scale; AdamW.update applies it as it reads them."""
    return max_norm / norm if max_norm > 0 and norm > max_norm else 1.0


class OutlierDetector:
    """The z-score of each new value against the last `window` values (llm.c keeps 64).
    Until the window is full there is no z-score (nan)."""

    def __init__(self, window=64):
        self.window = window
        self.values = []                      # the newest <= window values, oldest first

    def update(self, x):
        full = len(self.values) == self.window
        self.values = self.values[1:] + [x] if full else self.values + [x]
        if not full:
            return math.nan
        w = np.array(self.values)             # (window,) float64, this value included
        std = w.std()
        return 0.0 if std == 0 else float((x - w.mean()) / std)
