"""Backend-neutral GPT-2: parameter and activation layout, forward, backward, zero_grad.

This is the Python counterpart of llm.c's train_gpt2.c. All parameters live in one flat
float32 buffer exposed as 16 named views in llm.c's order; gradients use the same layout.
Activations (and their gradients) are one more flat buffer, allocated once per (B,T).
The names and shapes come from layout.GPT2_LAYOUT; the math lives in the backend (a Backend
object, backends/base.py) with its <op>_forward / <op>_backward functions.
"""
import numpy as np

from ..errors import LlmpyError
from .layout import GPT2_LAYOUT, FlatTensors


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
        ln_out, ln_mean, ln_rstd, ln_w, ln_b = self._layernorm_after(0)
        be.layernorm_forward(ln_out, ln_mean, ln_rstd, a.encoded, ln_w, ln_b)
        for l in range(L):
            residual = a.encoded if l == 0 else a.residual3[l - 1]   # (B,T,C)
            # ln1[l] was made from `residual` by the op before: layer l-1's residual add
            be.matmul_forward(a.qkv[l], a.ln1[l], p.qkvw[l], p.qkvb[l])
            if self.fused:
                be.attention_forward(a.atty[l], a.att_lse[l], a.qkv[l])
            else:
                be.attention_forward(a.atty[l], a.preatt[l], a.att[l], a.qkv[l])
            be.matmul_forward(a.attproj, a.atty[l], p.attprojw[l], p.attprojb[l])
            # residual2 = residual + attproj, and ln2 of it, in one pass
            be.residual_layernorm_forward(a.residual2[l], a.ln2[l], a.ln2_mean[l],
                                          a.ln2_rstd[l], residual, a.attproj, p.ln2w[l],
                                          p.ln2b[l])
            be.matmul_forward(a.fch[l], a.ln2[l], p.fcw[l], p.fcb[l])
            fch_gelu = a.fch_gelu[0 if self.recompute_gelu else l]   # (B,T,4C)
            be.gelu_forward(fch_gelu, a.fch[l])
            be.matmul_forward(a.fcproj, fch_gelu, p.fcprojw[l], p.fcprojb[l])
            # residual3 = residual2 + fcproj, and the next layer's ln1 of it (lnf after the last)
            ln_out, ln_mean, ln_rstd, ln_w, ln_b = self._layernorm_after(l + 1)
            be.residual_layernorm_forward(a.residual3[l], ln_out, ln_mean, ln_rstd,
                                          a.residual2[l], a.fcproj, ln_w, ln_b)
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

    def _layernorm_after(self, l):
        """(out, mean, rstd, weight, bias) of the layernorm that reads layer l's input: layer l's
        ln1, or lnf for l = L (after the last layer)."""
        a, p = self.acts, self.params
        if l == self.config.num_layers:
            return a.lnf, a.lnf_mean, a.lnf_rstd, p.lnfw, p.lnfb
        return a.ln1[l], a.ln1_mean[l], a.ln1_rstd[l], p.ln1w[l], p.ln1b[l]

    def zero_grad(self):
        self.grads.buf[:] = 0

    def backward(self, layer_done=None, scale=1.0):
        """Accumulates d(scale * mean loss)/d(params) into self.grads (call zero_grad first):
        scale 1/n makes n backward passes, on micro-batches or ranks, add up to the gradient of
        the mean of their losses, as llm.c scales its seed. layer_done(l), if given, is called
        as soon as layer l's gradients are complete (from l = L-1 down to 0): data-parallel
        training starts reducing them there, while the layers below still run
        (distributed.py)."""
        if self.mean_loss is None:
            raise LlmpyError("backward() needs a forward() with targets first")
        be, cfg, p, g, a = self.backend, self.config, self.params, self.grads, self.acts
        B, T, L, V = self.B, self.T, cfg.num_layers, cfg.vocab_size
        if self.grad_acts is None:
            whole, layer = grad_activation_shapes(cfg, B, T, self.fused)
            self.grad_acts = FlatTensors(whole, be.zeros, STATS)
            self.grad_layer = FlatTensors(layer, be.zeros)
        d, dl = self.grad_acts, self.grad_layer
        d.buf[:] = 0                          # the residual stream's gradient accumulates
        d.losses[...] = scale / (B * T)                         # d(mean)/d(each loss)

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
