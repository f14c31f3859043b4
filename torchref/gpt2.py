"""A nanoGPT-style GPT-2 in PyTorch: the oracle for tests, benchmarks and `llmpy test-model`.

It holds the same weights as llmpy's flat buffer (llm.c's layout) and returns gradients in
that layout, so every tensor can be compared one to one.
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, C, NH):
        super().__init__()
        self.NH = NH
        self.ln_1 = nn.LayerNorm(C, eps=1e-5)
        self.c_attn = nn.Linear(C, 3 * C)
        self.attn_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C, eps=1e-5)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))
        mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        att = F.softmax(att.masked_fill(mask, float("-inf")), dim=-1)
        return self.attn_proj((att @ v).transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.attention(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class TorchGPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        C = cfg.channels
        self.wte = nn.Embedding(cfg.vocab_size, C)
        self.wpe = nn.Embedding(cfg.max_seq_len, C)
        self.blocks = nn.ModuleList(Block(C, cfg.num_heads) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(C, eps=1e-5)

    def forward(self, idx, targets=None):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.T           # tied weights, unpadded vocab
        loss = None if targets is None else F.cross_entropy(
            logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    def _layout(self):
        """(name, [per-layer tensors or a single tensor]) in llm.c's order."""
        b = self.blocks
        return [
            ("wte", [self.wte.weight]), ("wpe", [self.wpe.weight]),
            ("ln1w", [x.ln_1.weight for x in b]), ("ln1b", [x.ln_1.bias for x in b]),
            ("qkvw", [x.c_attn.weight for x in b]), ("qkvb", [x.c_attn.bias for x in b]),
            ("attprojw", [x.attn_proj.weight for x in b]), ("attprojb", [x.attn_proj.bias for x in b]),
            ("ln2w", [x.ln_2.weight for x in b]), ("ln2b", [x.ln_2.bias for x in b]),
            ("fcw", [x.c_fc.weight for x in b]), ("fcb", [x.c_fc.bias for x in b]),
            ("fcprojw", [x.mlp_proj.weight for x in b]), ("fcprojb", [x.mlp_proj.bias for x in b]),
            ("lnfw", [self.ln_f.weight]), ("lnfb", [self.ln_f.bias]),
        ]

    @torch.no_grad()
    def load_flat(self, flat):
        """Load llm.c-layout flat params (wte padded to Vp rows; the padded rows are dropped)."""
        flat = np.asarray(flat, dtype=np.float32)
        C, V, Vp = self.cfg.channels, self.cfg.vocab_size, self.cfg.padded_vocab_size
        o = 0
        for name, ts in self._layout():
            for t in ts:
                n = t.numel() if name != "wte" else Vp * C
                src = torch.from_numpy(flat[o:o + n].copy())
                t.copy_((src[:V * C] if name == "wte" else src).view_as(t))
                o += n
        assert o == flat.size, (o, flat.size)
        return self

    def flat(self, grads=False):
        """Params (or grads) in llm.c's flat layout; padded wte rows are zero."""
        C, V, Vp = self.cfg.channels, self.cfg.vocab_size, self.cfg.padded_vocab_size
        out = []
        for name, ts in self._layout():
            for t in ts:
                x = (t.grad if grads else t).detach().to(torch.float64).cpu().numpy().ravel()
                if name == "wte":
                    x = np.concatenate([x, np.zeros((Vp - V) * C)])
                out.append(x)
        return np.concatenate(out)


def from_flat(cfg, flat, dtype=torch.float32):
    return TorchGPT(cfg).to(dtype).load_flat(flat)
