"""Backend-neutral GPT-2: parameter and activation layout, forward, backward, zero_grad.

This is the Python counterpart of llm.c's train_gpt2.c. All parameters live in one flat
float32 buffer exposed as 16 named views in llm.c's order; gradients use the same layout.
Activations (and their gradients) are one more flat buffer, allocated once per (B,T).
The names and shapes come from layout.GPT2_LAYOUT; the math lives in the backend (a Backend
object, backends/base.py) with its <op>_forward / <op>_backward functions.
"""
import dataclasses
import math
from types import SimpleNamespace

import numpy as np

from ..backends import host_ops
from ..errors import LlmpyError
from .layout import GPT2_LAYOUT, FlatTensors, start_backward


LAYOUT = GPT2_LAYOUT
param_shapes = LAYOUT.param_shapes
activation_shapes = LAYOUT.activation_shapes
grad_activation_shapes = LAYOUT.grad_activation_shapes
STATS = LAYOUT.stats()


def flops_per_token(cfg, T):
    """Training FLOPs per token at sequence length T, counted as nanoGPT and PaLM count them for
    MFU: 6 per weight that multiplies (2 forward; 4 backward, for dinp and dweight), which are
    the classifier's Vp*C and a layer's 12*C^2; plus attention's two (T,T) products, 4*T*C a
    layer forward and twice that backward. Biases, layernorms and the embeddings are left out."""
    C, L = cfg.channels, cfg.num_layers
    return 6 * (cfg.padded_vocab_size * C + 12 * L * C * C) + 12 * L * C * T


def memory(cfg, B, T, itemsize, fused, recompute_gelu):
    """Bytes of a GPT2's buffers at batch shape (B,T), from their shapes alone (llm.c prints the
    same at startup): parameters, gradients, activations, and the backward pass's scratch
    (activation gradients). itemsize: of the compute dtype (4 float32, 2 bf16); the statistics
    are float32 on every backend. Known before the model is built, so that the trainer can
    choose recompute_gelu by it."""
    def size(shapes):
        return sum(int(np.prod(shape)) * (4 if name in STATS else itemsize)
                   for name, shape in shapes)
    whole, layer = grad_activation_shapes(cfg, B, T, fused)
    params = LAYOUT.num_params(cfg) * itemsize
    return {"parameters": params, "gradients": params,
            "activations": size(activation_shapes(cfg, B, T, fused, recompute_gelu)),
            "activation gradients": size(whole) + size(layer)}


# The activations with a leading layer axis (the layout's "L", or "Lgelu": one layer's GELU
# output when it is recomputed), and those of which one layer's worth serves every layer.
LAYERED = {a.name for a in LAYOUT.acts if a.shape[0] in ("L", "Lgelu")}
ONE_LAYER = ("attproj", "fcproj")


def layer_views(acts, l):
    """Layer l's activations: a namespace of views (a one-layer buffer serves every layer)."""
    return SimpleNamespace(**{n: t[min(l, t.shape[0] - 1)] if n in LAYERED else t
                              for n, t in acts.items() if n in LAYERED or n in ONE_LAYER})


def layernorm_after(a, p, l, L):
    """(out, mean, rstd, weight, bias) of the layernorm that reads layer l's input: layer l's
    ln1, or lnf for l = L (after the last layer). a: activations; p: params."""
    if l == L:
        return a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb
    v = layer_views(a, l)
    return v.ln1, v.ln1_mean, v.ln1_rstd, p.ln1w[l], p.ln1b[l]


def block_forward(ops, p, l, v, x, attend, nxt):
    """Layer l of the forward pass, shared by the training forward and the decode step.
    ops: the backend; p: the params; v: the layer's activations (layer_views); x: the residual
    stream into the layer, (B,T,C), whose layernorm v.ln1 already holds (the op before made
    it: the previous layer's residual add); attend(v): v.atty from v.qkv; nxt: layernorm_after
    this layer."""
    ops.matmul_forward(v.qkv, v.ln1, p.qkvw[l], p.qkvb[l])
    attend(v)
    ops.matmul_forward(v.attproj, v.atty, p.attprojw[l], p.attprojb[l])
    # residual2 = x + attproj, and ln2 of it, in one pass
    ops.residual_layernorm_forward(v.residual2, v.ln2, v.ln2_mean, v.ln2_rstd, x, v.attproj,
                                   p.ln2w[l], p.ln2b[l])
    ops.matmul_forward(v.fch, v.ln2, p.fcw[l], p.fcb[l])
    ops.gelu_forward(v.fch_gelu, v.fch)
    ops.matmul_forward(v.fcproj, v.fch_gelu, p.fcprojw[l], p.fcprojb[l])
    # residual3 = residual2 + fcproj, and the next layer's ln1 of it (lnf after the last)
    out, mean, rstd, w, b = nxt
    ops.residual_layernorm_forward(v.residual3, out, mean, rstd, v.residual2, v.fcproj, w, b)


class GPT2:
    def __init__(self, config, backend, recompute_gelu=False):
        self.config = config
        self.backend = backend
        self.layout = LAYOUT
        self.fused = backend.caps.fused                          # see layout.GPT2_LAYOUT.acts
        # the backend's matmul, GELU, attention and classifier backwards write their input's
        # gradient instead of adding into it (llm.c's CUDA contract): no scratch to zero
        self.writes_grads = backend.caps.writes_activation_grads
        # the backend's layernorm and GELU backwards also sum, into a bias gradient, the
        # gradient they leave for the matmul backward after them: its dout, which that matmul
        # then does not read again for its bias (a pass over 6C values a position a layer)
        self.sums_bias_grads = backend.caps.sums_bias_grads
        # keep one layer's GELU output instead of L, at the cost of a GELU per layer in the
        # backward pass: 4*C of the 16*C values a layer saves per position
        self.recompute_gelu = recompute_gelu
        self.params = FlatTensors(param_shapes(config), backend.zeros)
        self.grads = FlatTensors(param_shapes(config), backend.zeros)
        self.B = self.T = 0
        self.acts = self.grad_acts = self.grad_layer = None
        self.inputs = self.targets = None
        self.mean_loss = None

    def num_parameters(self):
        return len(self.params)

    def memory(self, B, T, recompute_gelu=None):
        """memory() of this model's buffers at (B,T); with recompute_gelu, if given, instead of
        the model's own."""
        recompute = self.recompute_gelu if recompute_gelu is None else recompute_gelu
        return memory(self.config, B, T, self.params.buf.itemsize, self.fused, recompute)

    def _ensure_activations(self, B, T):
        if (B, T) != (self.B, self.T):
            shapes = activation_shapes(self.config, B, T, self.fused, self.recompute_gelu)
            self.acts = FlatTensors(shapes, self.backend.zeros, STATS)
            self.grad_acts = self.grad_layer = None             # made on the first backward
            self.B, self.T = B, T

    def check_tokens(self, tokens, what="input"):
        V, maxT = self.config.vocab_size, self.config.max_seq_len
        if tokens.ndim != 2:
            raise LlmpyError(f"{what} tokens must have shape (B,T), got {tokens.shape}")
        if tokens.shape[1] > maxT:
            raise LlmpyError(f"sequence length T={tokens.shape[1]} exceeds the model's "
                             f"max_seq_len {maxT}")
        if tokens.size and (tokens.min() < 0 or tokens.max() >= V):
            bad = tokens[(tokens < 0) | (tokens >= V)].ravel()[0]
            raise LlmpyError(f"{what} token id {bad} is out of range for vocab size {V}")

    def forward(self, inputs, targets=None):
        """inputs, targets: (B,T) int host arrays. Returns the mean loss, or None without targets."""
        self.check_tokens(inputs)
        if targets is not None:
            self.check_tokens(targets, "target")
            if targets.shape != inputs.shape:
                raise LlmpyError(f"targets of shape {targets.shape} for inputs of shape "
                                 f"{inputs.shape}")
        be, cfg, p = self.backend, self.config, self.params
        B, T = inputs.shape
        L, V = cfg.num_layers, cfg.vocab_size
        self._ensure_activations(B, T)
        a = self.acts
        self.inputs = be.to_device(np.ascontiguousarray(inputs, dtype=np.int64))
        self.targets = None if targets is None else be.to_device(
            np.ascontiguousarray(targets, dtype=np.int64))

        be.encoder_forward(a.encoded, self.inputs, p.wte, p.wpe)
        out, mean, rstd, w, b = layernorm_after(a, p, 0, L)
        be.layernorm_forward(out, mean, rstd, a.encoded, w, b)
        for l in range(L):
            x = a.encoded if l == 0 else a.residual3[l - 1]     # (B,T,C)
            block_forward(be, p, l, layer_views(a, l), x, self._attention,
                          layernorm_after(a, p, l + 1, L))
        be.matmul_forward(a.logits, a.lnf, p.wte, None)          # tied classifier weights
        if self.targets is None:
            self.mean_loss = None
            return None
        if self.fused:
            be.crossentropy_forward(a.losses, a.logits_lse, a.logits, self.targets, V)
        else:
            be.crossentropy_forward(a.losses, a.probs, a.logits, self.targets, V)
        self.mean_loss = float(a.losses.mean())
        return self.mean_loss

    def _attention(self, v):
        """v.atty from v.qkv: the backend's causal attention over the T positions."""
        if self.fused:
            self.backend.attention_forward(v.atty, v.att_lse, v.qkv)
        else:
            self.backend.attention_forward(v.atty, v.preatt, v.att, v.qkv)

    def decoder(self, max_len, rows=1, ops=None):
        """A Decoder: the one-position decode step with a KV cache for `rows` sequences."""
        return Decoder(self, max_len, rows, ops)

    def zero_grad(self):
        self.backend.zero_fill(self.grads.buf)

    def backward(self, layer_done=None, scale=1.0):
        """Accumulates d(scale * mean loss)/d(params) into self.grads (call zero_grad first):
        scale 1/n makes n backward passes, on micro-batches or ranks, add up to the gradient of
        the mean of their losses, as llm.c scales its seed. layer_done(l), if given, is called
        as soon as layer l's gradients are complete (from l = L-1 down to 0): data-parallel
        training starts reducing them there, while the layers below still run
        (distributed.py)."""
        d, dl = start_backward(self, grad_activation_shapes, STATS, scale)
        be, cfg, p, g, a = self.backend, self.config, self.params, self.grads, self.acts
        L, V = cfg.num_layers, cfg.vocab_size

        if self.fused:
            # As llm.c's CUDA trainer: the logits have no other reader and dlogits no other
            # writer, so the fused classifier overwrites the logits with dlogits. That saves a
            # (B,T,Vp) buffer (1.6 GB at GPT-2's B=16, T=1024 in bf16) and two passes over it
            # (zeroing, and reading back to add). acts.logits holds dlogits after this.
            dlogits = a.logits
            be.crossentropy_backward(dlogits, d.losses, a.logits, a.logits_lse, self.targets, V)
        else:
            dlogits = d.logits
            be.crossentropy_backward(dlogits, d.losses, a.probs, self.targets, V)
        be.matmul_backward(d.lnf, g.wte, None, dlogits, a.lnf, p.wte)

        # A bias's gradient is the column sum of its matmul's dout. llm.c's matmul_backward
        # sums it; a backend with sums_bias_grads sums it in the layernorm or GELU backward
        # that writes that dout (attention's backward leaves qkv's bias to its matmul: its
        # kernel's cost of summing measured as much as the pass it saves).
        fuse = self.sums_bias_grads

        def by_matmul(dbias):
            return None if fuse else dbias

        def by_writer(dbias):
            return {"dsums": dbias} if fuse and dbias is not None else {}

        last = a.residual3[L - 1] if L else a.encoded
        be.layernorm_backward(d.residual, g.lnfw, g.lnfb, d.lnf, last, p.lnfw, a.lnf_mean,
                              a.lnf_rstd, **by_writer(g.fcprojb[L - 1] if L else None))
        for l in reversed(range(L)):
            residual = a.encoded if l == 0 else a.residual3[l - 1]   # (B,T,C)
            if not self.writes_grads:
                dl.buf[:] = 0                 # each of these gradients is added into once
            # d.residual holds d(residual3[l]) = d(fcproj[l])
            fch_gelu = a.fch_gelu[0 if self.recompute_gelu else l]   # (B,T,4C)
            if self.recompute_gelu and l < L - 1:    # the last layer's is still there
                be.gelu_forward(fch_gelu, a.fch[l])
            be.matmul_backward(dl.fch_gelu, g.fcprojw[l], by_matmul(g.fcprojb[l]), d.residual,
                               fch_gelu, p.fcprojw[l])
            be.gelu_backward(dl.fch, a.fch[l], dl.fch_gelu, **by_writer(g.fcb[l]))
            be.matmul_backward(dl.ln2, g.fcw[l], by_matmul(g.fcb[l]), dl.fch, a.ln2[l], p.fcw[l])
            be.layernorm_backward(d.residual, g.ln2w[l], g.ln2b[l], dl.ln2, a.residual2[l],
                                  p.ln2w[l], a.ln2_mean[l], a.ln2_rstd[l],
                                  **by_writer(g.attprojb[l]))
            # now d.residual holds d(residual2[l]) = d(attproj[l])
            be.matmul_backward(dl.atty, g.attprojw[l], by_matmul(g.attprojb[l]), d.residual,
                               a.atty[l], p.attprojw[l])
            if self.fused:
                be.attention_backward(dl.qkv, dl.atty, a.qkv[l], a.atty[l], a.att_lse[l])
            else:
                be.attention_backward(dl.qkv, dl.preatt, dl.att, dl.atty, a.qkv[l], a.att[l])
            be.matmul_backward(dl.ln1, g.qkvw[l], g.qkvb[l], dl.qkv, a.ln1[l], p.qkvw[l])
            # d(residual3[l-1]) is also layer l-1's fcproj dout
            be.layernorm_backward(d.residual, g.ln1w[l], g.ln1b[l], dl.ln1, residual,
                                  p.ln1w[l], a.ln1_mean[l], a.ln1_rstd[l],
                                  **by_writer(g.fcprojb[l - 1] if l else None))
            # now d.residual holds d(residual3[l-1]), or d(encoded) after the first layer
            if layer_done:
                layer_done(l)
        be.encoder_backward(g.wte, g.wpe, d.residual, self.inputs)


def init_weights(model, seed=0):
    """GPT-2's from-scratch init, by each parameter's `init` in the layout: N(0, 0.02), the
    residual projections N(0, 0.02/sqrt(2L)), biases 0, LayerNorm weights 1; the padded rows of
    wte 0."""
    cfg, p = model.config, model.params
    rng = np.random.default_rng(seed)
    host = np.zeros(len(p), dtype=np.float32)
    std = {"normal": 0.02, "residual": 0.02 / np.sqrt(2 * cfg.num_layers)}
    for param, (name, shape) in zip(model.layout.params, model.layout.param_shapes(cfg)):
        o, n = p.offsets[name], int(np.prod(shape))
        view = host[o:o + n].reshape(shape)
        if param.init == "ones":
            view[...] = 1.0
        elif param.init in std:
            view[...] = rng.normal(0.0, std[param.init], shape)
    host[p.offsets["wte"] + cfg.vocab_size * cfg.channels:
         p.offsets["wte"] + cfg.padded_vocab_size * cfg.channels] = 0.0
    load_params(model, host)


def load_params(model, flat):
    """Copy a flat float32 host array, in the parameter layout, into the model."""
    flat = np.asarray(flat, dtype=np.float32).ravel()
    if flat.size != len(model.params):
        raise LlmpyError(f"expected {len(model.params)} parameters, got {flat.size}")
    model.params.buf[:] = model.backend.to_device(flat)


class Decoder:
    """Runs one position at a time for `rows` sequences with a KV cache, through the same
    block_forward as training, on the host with `ops`, a backend whose arrays are NumPy arrays
    (default: backends.host_ops of the model's). One position reads every weight once for two FLOPs each per row,
    so a step is bound by memory bandwidth, not by arithmetic, and a few rows cost about what
    one does. The weights are views of the model's parameters where they are host arrays (a
    host copy from a GPU)."""

    def __init__(self, model, max_len, rows=1, ops=None):
        cfg = model.config
        ops = ops or host_ops(model.backend)
        C, NH, L = cfg.channels, cfg.num_heads, cfg.num_layers
        host = model.backend.to_host(model.params.buf)          # (num_params,) float32
        self.params = FlatTensors(param_shapes(cfg), lambda n: host)
        self.config, self.ops = cfg, ops
        self.k = np.zeros((L, rows, NH, max_len, C // NH), np.float32)   # (L,N,NH,maxlen,hs)
        self.v = np.zeros((L, rows, NH, max_len, C // NH), np.float32)   # (L,N,NH,maxlen,hs)
        # one position's activations: the model's layout with B = rows, T = 1, one layer
        one = dataclasses.replace(cfg, num_layers=1)
        self.acts = FlatTensors(activation_shapes(one, rows, 1, recompute_gelu=True),
                                lambda n: np.zeros(n, np.float32))

    def attend(self, l, pos, v):
        """v.atty: each row's query at `pos` against its cached positions 0..pos (this one's
        keys and values stored first), with the reference attention's arithmetic."""
        N, NH = v.qkv.shape[0], self.config.num_heads
        q, k, val = v.qkv.reshape(N, 3, NH, -1).transpose(1, 0, 2, 3)   # each (N,NH,hs)
        self.k[l, :, :, pos], self.v[l, :, :, pos] = k, val
        keys, values = self.k[l, :, :, :pos + 1], self.v[l, :, :, :pos + 1]  # (N,NH,pos+1,hs)
        att = (keys @ q[..., None])[..., 0]                     # (N,NH,pos+1)
        att *= 1.0 / math.sqrt(q.shape[-1])
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        v.atty[:] = (att[..., None, :] @ values).reshape(v.atty.shape)   # (N,NH,1,hs) -> (N,1,C)

    def step(self, tokens, pos, logits=True):
        """Run `tokens` (one per row) at position `pos`: the next-token logits (N,V), or None
        if not wanted (the prompt's tokens only need to fill the cache)."""
        cfg, p, a, ops = self.config, self.params, self.acts, self.ops
        L = cfg.num_layers
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)     # (N,1)
        ops.encoder_forward(a.encoded, tokens, p.wte, p.wpe[pos:pos + 1])
        out, mean, rstd, w, b = layernorm_after(a, p, 0, L)
        ops.layernorm_forward(out, mean, rstd, a.encoded, w, b)
        x = a.encoded
        for l in range(L):
            block_forward(ops, p, l, layer_views(a, l), x, lambda v: self.attend(l, pos, v),
                          layernorm_after(a, p, l + 1, L))
            x = a.residual3[0]
        if not logits:
            return None
        ops.matmul_forward(a.logits, a.lnf, p.wte, None)        # tied classifier weights
        return a.logits[:, 0, :cfg.vocab_size]
