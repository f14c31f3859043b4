"""The reference's answers for one batch, in llm.c's layout: what `llmpy debug-state` writes
and what `llmpy test-model` compares against."""
import numpy as np
import torch

from .gpt2 import from_flat


def forward_backward(cfg, params, x, y):
    """(logits (B,T,V) float32, loss float, grads (num_params,) float32 with zero padded rows)."""
    model = from_flat(cfg, params)
    logits, loss = model(torch.from_numpy(np.asarray(x, np.int64)),
                         torch.from_numpy(np.asarray(y, np.int64)))
    loss.backward()
    return logits.detach().numpy(), loss.item(), model.flat(grads=True).astype(np.float32)


def adamw_losses(cfg, params, x, y, steps, lr, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8):
    """The loss before each of `steps` torch.optim.AdamW updates on the same batch."""
    model = from_flat(cfg, params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay)
    x = torch.from_numpy(np.asarray(x, np.int64))
    y = torch.from_numpy(np.asarray(y, np.int64))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses
