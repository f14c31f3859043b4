"""One training step, the same for every caller (the loop, `bench cpu`, `bench gpu`,
test-model) and every model with GPT2's contract (forward, backward, zero_grad, flat params and
grads: model/gpt2.py, model/llama.py):

1. zero the gradients, then forward and backward over the step's micro-batches, each backward
   seeded with 1 / (micro-batches * ranks), so that the gradients add up to those of the mean
   loss over all of them (llm.c scales its seed the same way);
2. the mean loss and the global gradient norm;
3. the guard: a non-finite loss or norm, or an outlier (llm.c's -sl/-sg), skips the update;
4. AdamW, reading the gradients scaled down to the clip norm.

Data-parallel training adds collectives between these (averaging the gradients and the loss,
gathering ZeRO-1 shards); they are `dist`'s methods. One process gets OneProcess, below, where
each is the identity; train/distributed.py's Dist does them across a torchrun job."""
import math
from dataclasses import dataclass

from ..errors import LlmpyError
from .optim import OutlierDetector, clip_scale, global_norm

MAX_NONFINITE = 3   # steps in a row with a NaN/inf loss or grad norm before a run gives up


class OneProcess:
    """The collectives of a step in a single process: nothing to exchange."""
    rank, world, zero = 0, 1, 0

    def layer_hook(self, model):        # model.backward's layer_done: nothing to start
        return None

    def sync_grads(self, model):        # the gradients are this process's own
        pass

    def mean(self, x):                  # of the loss over the ranks
        return x

    def grad_norm(self, model):
        return global_norm(model.grads.buf, model.backend)

    def sync_params(self, params):      # after the update (ZeRO-1 gathers the shards there)
        pass

    def check_params(self, params, step):
        pass

    # and the run's, outside the step (train/loop.py)
    def sum(self, x, what):             # a float over the ranks (signals.py's stop flag)
        return x

    def shard(self, n):                 # of the flat buffer that this process's AdamW updates
        return slice(0, n)

    def broadcast(self, buf):
        pass

    def full_optimizer(self, opt):
        return opt

    def close(self):
        pass


ONE_PROCESS = OneProcess()


class Guard:
    """The outlier guard: llm.c's -sl/-sg z-scores of the loss and of the gradient norm over
    the last 64 steps (0: off), and the count of non-finite steps in a row. Its state goes into
    a run's checkpoints (train/loop.py's RunState)."""

    def __init__(self, loss_z=0.0, grad_z=0.0):
        self.loss_z, self.grad_z = loss_z, grad_z
        self.losses, self.norms = OutlierDetector(), OutlierDetector()
        self.nonfinite = 0

    def check(self, step, loss, norm, model):
        """The reason to skip this step's update, or None. Stops the run (LlmpyError) when the
        weights themselves are broken, or after MAX_NONFINITE non-finite steps in a row."""
        zloss = self.losses.update(loss) if math.isfinite(loss) else math.nan
        zgrad = self.norms.update(norm) if math.isfinite(norm) else math.nan
        reason = None
        if not math.isfinite(loss):
            reason = f"the loss is {loss}"
        elif not math.isfinite(norm):
            reason = f"the gradient norm is {norm}"
        elif self.loss_z and zloss > self.loss_z:
            reason = f"loss z-score {zloss:.2f} > {self.loss_z}"
        elif self.grad_z and zgrad > self.grad_z:
            reason = f"grad norm z-score {zgrad:.2f} > {self.grad_z}"
        finite = math.isfinite(loss) and math.isfinite(norm)
        self.nonfinite = 0 if finite else self.nonfinite + 1
        if not math.isfinite(loss) and not math.isfinite(float(model.params.buf.sum())):
            raise LlmpyError(f"step {step}: the loss is {loss}: the model's weights are not "
                             "finite")
        if self.nonfinite >= MAX_NONFINITE:
            raise LlmpyError(f"step {step}: {reason}, {MAX_NONFINITE} steps in a row; stopping "
                             "with the weights of the last good update (try a lower --lr)")
        return reason


@dataclass
class StepResult:
    loss: float          # the mean over the micro-batches (and the ranks)
    norm: float          # the global gradient norm, before clipping
    skipped: str = None  # why the update did not happen, or None


def train_step(model, opt, batches, lr=None, grad_clip=0.0, guard=None, dist=None, step=0,
               phase=None):
    """One step on `batches`, a list of (inputs, targets) (B,T) int host arrays: the
    micro-batches whose gradients accumulate. lr: this step's (None: opt's config); grad_clip:
    the global norm to clip to (0: off); guard: a Guard that lasts the run (None: a fresh one,
    which skips a non-finite update and never stops); dist: OneProcess or distributed.Dist;
    step: the step's number, for messages; phase(name), if given, is called as each part ends
    ("zero_grad", "forward", "backward", "update"), for a benchmark's clock."""
    dist, guard = dist or ONE_PROCESS, guard or Guard()
    mark = phase or (lambda name: None)
    n = len(batches)
    model.zero_grad()
    mark("zero_grad")
    loss = 0.0
    for i, (inputs, targets) in enumerate(batches):
        loss += model.forward(inputs, targets)
        mark("forward")
        # in the last micro-batch the ranks start summing each layer's gradients as soon as
        # they are final (dist.layer_hook)
        model.backward(dist.layer_hook(model) if i == n - 1 else None,
                       scale=1.0 / (n * dist.world))
        mark("backward")
    dist.sync_grads(model)
    loss = dist.mean(loss / n)
    norm = dist.grad_norm(model)
    skipped = guard.check(step, loss, norm, model)
    if skipped is None:
        opt.update(lr, clip_scale(norm, grad_clip))
        dist.sync_params(model.params.buf)
    dist.check_params(model.params.buf, step)
    mark("update")
    return StepResult(loss, norm, skipped)
