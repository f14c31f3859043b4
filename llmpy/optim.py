"""AdamW over the flat parameter buffer, the way torch.optim.AdamW computes it."""
from dataclasses import dataclass


@dataclass
class AdamWConfig:
    lr: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0


class AdamW:
    def __init__(self, model, config=None):
        self.model = model
        self.config = config or AdamWConfig()
        zeros = model.backend.zeros
        self.m = zeros(len(model.params))    # (num_params,) first moment
        self.v = zeros(len(model.params))    # (num_params,) second moment
        self.step = 0

    def update(self, lr=None):
        """One AdamW step with the gradients in model.grads; lr overrides the config's."""
        c = self.config
        self.step += 1
        self.model.backend.adamw_update(self.model.params.buf, self.model.grads.buf, self.m, self.v,
                                        self.step, c.lr if lr is None else lr, c.beta1, c.beta2,
                                        c.eps, c.weight_decay)
