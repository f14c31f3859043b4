"""Data-parallel training over torch.distributed, launched by torchrun, as llm.c trains on many
GPUs and nodes (its -d flag, its ZeRO-1). Every rank holds the whole model and trains on its
own disjoint windows of the data (DataLoader rank/world); before each update the ranks average
their gradients, so every rank makes the same update and the parameters stay identical.

- The process group: gloo for the CPU backends, whose NumPy buffers torch.from_numpy wraps
  without a copy; NCCL for the gpu backend, whose buffers are CUDA tensors already.
- Plain data-parallel: the gradients are all-reduced in buckets, one per parameter tensor per
  layer, each started as soon as the backward pass has finished that layer, so the reduction
  overlaps with the backward pass through the layers below (NCCL runs it on its own CUDA stream,
  gloo on its own threads); then the four whole-model tensors. Each rank's backward pass scaled
  its gradients by 1/world already (train/step.py), so the sum is the mean.
- ZeRO-1 (--zero 1): rank r owns a contiguous shard of the flat buffer (the last rank also the
  remainder). The gradients are reduce-scattered, so each rank gets the sum of its shard only;
  AdamW updates only that shard, with m and v allocated for it alone; then every rank's
  parameters are all-gathered from the updated shards. The arithmetic is plain data-parallel's:
  the same sums, the same per-element AdamW; only the gradient norm's sum is split by shards.
- A process-group timeout (--dist-timeout): a rank that died or hangs makes the others fail
  their next collective with one clear line and exit 1, instead of waiting forever.
- --dist-check-every N: every N steps the ranks compare a CRC32 of their parameters.

torch is imported here only, and only when the run is distributed (WORLD_SIZE > 1, or --dist):
one process needs nothing but NumPy."""
import contextlib
import datetime
import os
import zlib
from types import SimpleNamespace

import numpy as np

from ..errors import LlmpyError, first_line
from . import checkpoints
from .optim import global_norm
from .step import ONE_PROCESS


class Dist:
    """This process's place in a torchrun job, and the collectives of a training step: the
    methods of step.OneProcess, which a single process gets instead."""

    def __init__(self, rank=0, world=1, zero=0, timeout=600.0, check_every=0):
        self.rank, self.world, self.zero = rank, world, zero
        self.timeout, self.check_every = timeout, check_every
        self.torch = self.td = None    # torch and torch.distributed, once the group is up
        self.device = None             # where small tensors (the loss, checksums) go
        self.pending = []              # gradient all-reduces in flight

    def start(self, backend_name, local_rank):
        """Join the process group that torchrun's environment describes."""
        try:
            import torch
            import torch.distributed as td
        except ImportError:
            raise LlmpyError(f"distributed training (WORLD_SIZE={self.world}) needs PyTorch: "
                             "pip install torch") from None
        gpu = backend_name == "gpu" and torch.cuda.is_available()
        if gpu:    # before anything is allocated: "cuda" is then this rank's GPU
            torch.cuda.set_device(local_rank)
        self.device = torch.device("cuda", local_rank) if gpu else torch.device("cpu")
        try:
            td.init_process_group("nccl" if gpu else "gloo", device_id=self.device if gpu else None,
                                  timeout=datetime.timedelta(seconds=self.timeout))
        except (ValueError, RuntimeError) as e:
            raise LlmpyError(f"rank {self.rank}: cannot join the process group (launch with "
                             f"torchrun): {first_line(e)}") from None
        self.torch, self.td = torch, td
        # torch 2.13's names for reduce_scatter_tensor and all_gather_into_tensor
        self.reduce_scatter = (getattr(td, "reduce_scatter_single", None)
                               or td.reduce_scatter_tensor)
        self.all_gather = getattr(td, "all_gather_single", None) or td.all_gather_into_tensor

    # ------------------------------------------------------------------------- basics

    @contextlib.contextmanager
    def failing(self, what):
        """A failed or timed-out collective becomes one line, not a traceback or a hang."""
        try:
            yield
        except RuntimeError as e:      # torch.distributed.DistError and the backends' errors
            self.pending = []
            self.td.destroy_process_group()
            raise LlmpyError(f"rank {self.rank}: {what} across {self.world} ranks failed: "
                             f"{first_line(e)} (a rank died, or did not answer within "
                             f"--dist-timeout {self.timeout:g} s)") from None

    def tensor(self, buf):
        """A torch tensor sharing buf's memory: buf itself, or a NumPy array wrapped."""
        return buf if isinstance(buf, self.torch.Tensor) else self.torch.from_numpy(buf)

    def sum(self, x, what):
        """A Python float summed over the ranks, in float64."""
        t = self.torch.tensor([x], dtype=self.torch.float64, device=self.device)
        with self.failing(what):
            self.td.all_reduce(t)
        return float(t)

    def mean(self, x):
        """The mean of a Python float (the step's loss) over the ranks."""
        return self.sum(x, "loss all-reduce") / self.world

    def broadcast(self, buf):
        """Rank 0's buf on every rank: the same starting weights everywhere."""
        with self.failing("parameter broadcast"):
            self.td.broadcast(self.tensor(buf), src=0)

    def close(self):
        with self.failing("final barrier"):
            self.td.barrier()
        self.td.destroy_process_group()

    # ------------------------------------------------------------------------- ZeRO-1 shards

    def shard(self, n):
        """The slice of an n-element flat buffer that this rank's AdamW updates: all of it,
        or with ZeRO-1 rank r's n // world elements (the last rank's also the remainder)."""
        if not self.zero:
            return slice(0, n)
        size = n // self.world
        hi = n if self.rank == self.world - 1 else (self.rank + 1) * size
        return slice(self.rank * size, hi)

    def _reduce_scatter(self, g):
        """g: (n,) every rank's gradients -> the sum over ranks in this rank's shard of g."""
        size = len(g) // self.world
        even = size * self.world
        self.reduce_scatter(g[self.rank * size:(self.rank + 1) * size], g[:even])
        if even < len(g):   # the remainder, fewer than world elements, goes to the last rank
            self.td.all_reduce(g[even:])

    def _all_gather(self, t):
        """t: (n,) with this rank's shard filled in -> every rank's shard filled in."""
        size = len(t) // self.world
        even = size * self.world
        self.all_gather(t[:even], t[self.rank * size:(self.rank + 1) * size])
        if even < len(t):
            self.td.broadcast(t[even:], src=self.world - 1)

    # ------------------------------------------------------------------------- a step

    def layer_hook(self, model):
        """model.backward's layer_done for the last micro-step of a step (plain DP): start the
        all-reduce of layer l's gradients. None with nothing to overlap (ZeRO-1)."""
        if self.zero:
            return None
        layer = [getattr(model.grads, n) for n in model.layout.per_layer()]

        def start(l):
            with self.failing("gradient all-reduce"):
                self.pending += [self.td.all_reduce(self.tensor(g[l]), async_op=True)
                                 for g in layer]
        return start

    def sync_grads(self, model):
        """After the backward pass that got layer_hook: model.grads becomes the sum over the
        ranks (their mean, as each scaled its own by 1/world), everywhere (plain DP), or in this
        rank's shard only (ZeRO-1; the rest then holds partial sums)."""
        g = model.grads
        with self.failing("gradient reduction"):
            if self.zero:
                self._reduce_scatter(self.tensor(g.buf))
            else:
                works, self.pending = self.pending, []
                works += [self.td.all_reduce(self.tensor(getattr(g, n)), async_op=True)
                          for n in model.layout.whole_model()]
                for w in works:
                    w.wait()

    def grad_norm(self, model):
        """The global L2 norm of the model's averaged gradients (of every shard, with ZeRO-1)."""
        grads, be = model.grads.buf, model.backend
        if not self.zero:
            return global_norm(grads, be)
        return self.sum(be.sum_squares(grads[self.shard(len(grads))]),
                        "gradient norm all-reduce") ** 0.5

    def sync_params(self, params):
        """After AdamW: with ZeRO-1, every rank's updated shard into every rank's params."""
        if self.zero:
            with self.failing("parameter all-gather"):
                self._all_gather(self.tensor(params))

    def check_params(self, params, step):
        """Debug (--dist-check-every N): the parameters must be bit-identical on every rank."""
        if not self.check_every or step % self.check_every:
            return
        t = self.tensor(params).detach()
        crc = zlib.crc32(t.view(self.torch.uint8).cpu().numpy())
        mine = self.torch.tensor([crc], dtype=self.torch.int64, device=self.device)
        crcs = self.torch.zeros(self.world, dtype=self.torch.int64, device=self.device)
        with self.failing("parameter checksum"):
            self.all_gather(crcs, mine)
        if len(set(crcs.tolist())) > 1:
            raise LlmpyError(f"step {step}: the parameters differ across ranks (CRC32 per rank: "
                             f"{', '.join(f'{c:08x}' for c in crcs.tolist())})")

    # ------------------------------------------------------------------------- checkpoints

    def full_optimizer(self, opt):
        """opt's state for a checkpoint, whole: with ZeRO-1 every rank's shards of m, v (and
        master weights) gathered, on every rank (a collective: all ranks call it)."""
        if not self.zero:
            return opt
        n = len(opt.model.params)
        gather = None if opt.master is None else self._gather(opt.master, n)
        return SimpleNamespace(m=self._gather(opt.m, n), v=self._gather(opt.v, n),
                               master=gather, step=opt.step)

    def _gather(self, shard, n):
        full = self.tensor(shard).new_zeros(n)     # (n,) float32
        full[self.shard(n)] = self.tensor(shard)
        with self.failing("optimizer state all-gather"):
            self._all_gather(full)
        return full if isinstance(shard, self.torch.Tensor) else full.numpy()

    def load_sharded(self, run_dir, model, opt):
        """checkpoints.load_latest into a ZeRO-1 AdamW: every rank reads the whole checkpoint
        (so on many nodes the run directory must be on a filesystem they share) and keeps its
        shard. Returns the manifest, or None."""
        n, zeros = len(model.params), model.backend.zeros
        full = SimpleNamespace(m=zeros(n, np.float32), v=zeros(n, np.float32), master=None,
                               step=0)
        manifest = checkpoints.load_latest(run_dir, model, full, self.rank == 0)
        s = self.shard(n)
        opt.m[:], opt.v[:], opt.step = full.m[s], full.v[s], full.step
        if full.master is not None:
            opt.master = zeros(s.stop - s.start, np.float32)
            opt.master[:] = full.master[s]
        return manifest


def init(cfg):
    """This process's Dist, from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT); step.ONE_PROCESS for a single process without --dist, which
    imports no torch."""
    if cfg.zero not in (0, 1):
        raise LlmpyError(f"--zero {cfg.zero}: only 0 (off) and 1 (ZeRO-1: shard AdamW's state) "
                         "are supported")
    env = os.environ
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    if world == 1 and not cfg.dist:
        return ONE_PROCESS
    d = Dist(rank, world, cfg.zero, cfg.dist_timeout, cfg.dist_check_every)
    d.start(cfg.backend, int(env.get("LOCAL_RANK", 0)))
    return d
