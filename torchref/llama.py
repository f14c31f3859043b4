"""transformers' own *ForCausalLM (Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3) as the
reference for llmpy's Llama / Gemma decoder: the oracle of `llmpy debug-state` for llm.c's
llama3 files and the baseline of `llmpy bench cpu/sample`. It holds the weights of llmpy's flat
buffer (params_to_hf) and gives gradients back in that layout (params_from_hf), so that every
tensor compares one to one."""
import numpy as np
import torch
import torch.nn.functional as F
import transformers

from llmpy.model.llama import config_to_hf, params_from_hf, params_to_hf


def from_flat(cfg, flat, attn="eager", dtype=torch.float32):
    """The transformers model of cfg holding llmpy's flat params. attn: "eager" (the
    reference's plain softmax) or "sdpa" (PyTorch's fused attention, the benchmark's)."""
    c = config_to_hf(cfg)
    # no padding row: transformers' embedding would give it no gradient, llm.py trains them all
    hc = transformers.AutoConfig.for_model(c.pop("model_type"), pad_token_id=None, **c)
    model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation=attn,
                                                          dtype=dtype)
    tensors = {k: torch.from_numpy(v) for k, v in params_to_hf(cfg, flat).items()}
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    # a tied classifier is the embedding, which transformers lists under both names
    assert not unexpected and set(missing) <= {"lm_head.weight"} and (
        not missing or cfg.tied_embeddings), (missing, unexpected)
    return model


def loss_of(model, x, y):
    """(logits (B,T,V), llm.c's loss: the mean cross-entropy of the logits against y, which
    are x shifted already)."""
    logits = model(torch.as_tensor(np.asarray(x, np.int64))).logits
    loss = F.cross_entropy(logits.flatten(0, 1), torch.as_tensor(np.asarray(y, np.int64)).flatten())
    return logits, loss


def grads_flat(cfg, model):
    """The model's gradients in llmpy's flat layout (padded rows zero), float32."""
    grads = {k: p.grad.detach().float().numpy() for k, p in model.named_parameters()}
    return params_from_hf(cfg, grads, "the reference's gradients")


def forward_backward(cfg, params, x, y):
    """(logits (B,T,V) float32, loss, gradients (num_params,) float32 in llmpy's layout)."""
    model = from_flat(cfg, params)
    logits, loss = loss_of(model, x, y)
    loss.backward()
    return logits.detach().numpy(), loss.item(), grads_flat(cfg, model)


def adamw_history(cfg, params, x, y, steps, lr, weight_decay, beta1=0.9, beta2=0.999, eps=1e-8):
    """(losses, gradient norms) before each of `steps` torch.optim.AdamW updates on the same
    batch, every tensor in one group (as llm.c's test decays every parameter)."""
    model = from_flat(cfg, params)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(beta1, beta2), eps=eps,
                            weight_decay=weight_decay)
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        _, loss = loss_of(model, x, y)
        loss.backward()
        norms.append(float(sum(p.grad.double().square().sum() for p in model.parameters())) ** 0.5)
        losses.append(loss.item())
        opt.step()
    return losses, norms
