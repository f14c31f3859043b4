"""Where each architecture's tensors live: ONE name table per architecture.

A table lists every parameter once, in llm.c's file order, with its shape (in symbols of the
config: `L`, `C`, `Vp`, ...), whether AdamW decays it, how it is initialised from scratch, and
its Hugging Face name. It lists the activations the forward pass keeps, and the backward pass's
scratch, the same way. Everything that needs a list of names reads it from here: the model's
flat buffers (FlatTensors), the llm.c model file, AdamW's decay set, the data-parallel buckets,
the HF converter, init. A second architecture declares its own `Layout` beside GPT2_LAYOUT and
gets all of these without new code.

Shapes are tuples of symbols, each a key of the dict that `Layout.dims(cfg, **options)` returns
(or an int). A parameter whose shape starts with "L" is one tensor per layer."""
from dataclasses import dataclass

import numpy as np

from ..errors import LlmpyError


def pad_vocab(vocab_size, multiple=128):
    """llm.c pads the vocabulary (50257 -> 50304) so the classifier matmul tiles evenly."""
    return (vocab_size + multiple - 1) // multiple * multiple


@dataclass
class GPT2Config:
    max_seq_len: int = 1024        # maxT
    vocab_size: int = 50257        # V
    padded_vocab_size: int = 0     # Vp; 0 means pad_vocab(V)
    num_layers: int = 12           # L
    num_heads: int = 12            # NH
    channels: int = 768            # C

    def __post_init__(self):
        sizes = dict(max_seq_len=1, vocab_size=1, num_layers=0, num_heads=1, channels=1)
        for name, least in sizes.items():
            if getattr(self, name) < least:
                raise ValueError(f"{name} {getattr(self, name)} must be at least {least}")
        if not self.padded_vocab_size:
            self.padded_vocab_size = pad_vocab(self.vocab_size)
        if self.channels % self.num_heads:
            raise ValueError(f"channels {self.channels} not divisible by num_heads {self.num_heads}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError("padded_vocab_size must be >= vocab_size")


@dataclass(frozen=True)
class Param:
    """One parameter tensor. init: "normal" N(0, 0.02), "residual" N(0, 0.02/sqrt(2L)) (the
    projections into the residual stream), "ones", "zeros". hf: its Hugging Face name, with {}
    for the layer index; hf_transposed: HF stores it (in, out) (GPT-2's Conv1D)."""
    name: str
    shape: tuple
    init: str
    decay: bool
    hf: str
    hf_transposed: bool = False
    only: str = ""               # as Act's: every parameter is on every backend


@dataclass(frozen=True)
class Act:
    """One activation (or activation gradient) buffer. stat: kept in float32 on every backend,
    also on one that computes in bf16, because the backward pass needs it to more digits than
    bf16's three (per-row statistics, the logsumexps, the losses). only: "fused" or "unfused"
    when the buffer exists on that kind of backend alone (Capabilities.fused)."""
    name: str
    shape: tuple
    stat: bool = False
    only: str = ""


@dataclass(frozen=True)
class Layout:
    name: str
    dims: object                 # (cfg, B=0, T=0, recompute_gelu=False) -> {symbol: int}
    params: tuple                # Param, in llm.c's file order
    acts: tuple                  # Act: what the forward pass writes and the backward reads
    grad_acts: tuple             # Act: the backward's whole-model scratch
    grad_layer: tuple            # Act: the backward's one-layer scratch, reused by every layer
    hf_prefix: str = ""          # the prefix of every HF name in a *LMHeadModel checkpoint

    def _shapes(self, entries, dims, fused=False):
        return [(e.name, tuple(dims[s] if isinstance(s, str) else s for s in e.shape))
                for e in entries if e.only in ("", "fused" if fused else "unfused")]

    def param_shapes(self, cfg):
        return self._shapes(self.params, self.dims(cfg))

    def param_names(self):
        return [p.name for p in self.params]

    def num_params(self, cfg):
        return sum(int(np.prod(s)) for _, s in self.param_shapes(cfg))

    def decayed(self):
        return tuple(p.name for p in self.params if p.decay)

    def per_layer(self):
        return tuple(p.name for p in self.params if p.shape[0] == "L")

    def whole_model(self):
        return tuple(p.name for p in self.params if p.shape[0] != "L")

    def hf_names(self):
        return {p.name: p.hf for p in self.params}

    def stats(self):
        return tuple(a.name for a in (*self.acts, *self.grad_acts, *self.grad_layer) if a.stat)

    def activation_shapes(self, cfg, B, T, fused=False, recompute_gelu=False):
        return self._shapes(self.acts, self.dims(cfg, B, T, recompute_gelu), fused)

    def grad_activation_shapes(self, cfg, B, T, fused=False):
        """(whole-model shapes, one layer's shapes)."""
        dims = self.dims(cfg, B, T)
        return (self._shapes(self.grad_acts, dims, fused),
                self._shapes(self.grad_layer, dims, fused))


def gpt2_dims(cfg, B=0, T=0, recompute_gelu=False):
    C = cfg.channels
    return {"Vp": cfg.padded_vocab_size, "maxT": cfg.max_seq_len, "L": cfg.num_layers,
            "C": C, "3C": 3 * C, "4C": 4 * C, "NH": cfg.num_heads, "B": B, "T": T,
            # recompute_gelu: one layer's GELU output, which every layer overwrites in the
            # forward pass and the backward pass recomputes from fch (llm.c's -r 1)
            "Lgelu": 1 if recompute_gelu else cfg.num_layers}


# llm.c decays the matmul and embedding weights (the 2-D tensors), never biases or LayerNorms.
GPT2_LAYOUT = Layout(
    name="gpt2", dims=gpt2_dims, hf_prefix="transformer.",
    params=(
        Param("wte", ("Vp", "C"), "normal", True, "wte.weight"),
        Param("wpe", ("maxT", "C"), "normal", True, "wpe.weight"),
        Param("ln1w", ("L", "C"), "ones", False, "h.{}.ln_1.weight"),
        Param("ln1b", ("L", "C"), "zeros", False, "h.{}.ln_1.bias"),
        Param("qkvw", ("L", "3C", "C"), "normal", True, "h.{}.attn.c_attn.weight", True),
        Param("qkvb", ("L", "3C"), "zeros", False, "h.{}.attn.c_attn.bias"),
        Param("attprojw", ("L", "C", "C"), "residual", True, "h.{}.attn.c_proj.weight", True),
        Param("attprojb", ("L", "C"), "zeros", False, "h.{}.attn.c_proj.bias"),
        Param("ln2w", ("L", "C"), "ones", False, "h.{}.ln_2.weight"),
        Param("ln2b", ("L", "C"), "zeros", False, "h.{}.ln_2.bias"),
        Param("fcw", ("L", "4C", "C"), "normal", True, "h.{}.mlp.c_fc.weight", True),
        Param("fcb", ("L", "4C"), "zeros", False, "h.{}.mlp.c_fc.bias"),
        Param("fcprojw", ("L", "C", "4C"), "residual", True, "h.{}.mlp.c_proj.weight", True),
        Param("fcprojb", ("L", "C"), "zeros", False, "h.{}.mlp.c_proj.bias"),
        Param("lnfw", ("C",), "ones", False, "ln_f.weight"),
        Param("lnfb", ("C",), "zeros", False, "ln_f.bias"),
    ),
    # As llm.c lays them out. A fused backend (flash attention, fused classifier: llm.c's CUDA
    # layout) saves one logsumexp per row instead of the (T,T) attention matrices and the
    # probabilities. attproj and fcproj, the projections' outputs, are one layer's worth on
    # every backend: the residual add right after each is their only reader (a matmul's
    # backward needs its input, not its output), as in llm.c's CUDA trainer.
    acts=(
        Act("encoded", ("B", "T", "C")),
        Act("ln1", ("L", "B", "T", "C")), Act("ln1_mean", ("L", "B", "T"), True),
        Act("ln1_rstd", ("L", "B", "T"), True),
        Act("qkv", ("L", "B", "T", "3C")), Act("atty", ("L", "B", "T", "C")),
        Act("att_lse", ("L", "B", "NH", "T"), True, "fused"),
        Act("preatt", ("L", "B", "NH", "T", "T"), only="unfused"),
        Act("att", ("L", "B", "NH", "T", "T"), only="unfused"),
        Act("attproj", ("B", "T", "C")), Act("residual2", ("L", "B", "T", "C")),
        Act("ln2", ("L", "B", "T", "C")), Act("ln2_mean", ("L", "B", "T"), True),
        Act("ln2_rstd", ("L", "B", "T"), True),
        Act("fch", ("L", "B", "T", "4C")), Act("fch_gelu", ("Lgelu", "B", "T", "4C")),
        Act("fcproj", ("B", "T", "C")), Act("residual3", ("L", "B", "T", "C")),
        Act("lnf", ("B", "T", "C")), Act("lnf_mean", ("B", "T"), True),
        Act("lnf_rstd", ("B", "T"), True),
        Act("logits", ("B", "T", "Vp")),
        Act("logits_lse", ("B", "T"), True, "fused"),
        Act("probs", ("B", "T", "Vp"), only="unfused"),
        Act("losses", ("B", "T"), True),
    ),
    # The backward pass's scratch, reused as in llm.c's CUDA version. A residual add passes its
    # gradient through unchanged, so the residual stream's gradient is a single (B,T,C) buffer
    # that every layer adds into, and it is also d(fcproj) and d(attproj). A layer's other
    # gradients are needed only while that layer runs, so each layer reuses one layer's worth.
    # The fused classifier writes dlogits over the logits (see GPT2.backward).
    grad_acts=(
        Act("logits", ("B", "T", "Vp"), only="unfused"), Act("losses", ("B", "T"), True),
        Act("lnf", ("B", "T", "C")), Act("residual", ("B", "T", "C")),
    ),
    grad_layer=(
        Act("ln1", ("B", "T", "C")), Act("qkv", ("B", "T", "3C")), Act("atty", ("B", "T", "C")),
        Act("preatt", ("B", "NH", "T", "T"), only="unfused"),
        Act("att", ("B", "NH", "T", "T"), only="unfused"),
        Act("ln2", ("B", "T", "C")), Act("fch", ("B", "T", "4C")),
        Act("fch_gelu", ("B", "T", "4C")),
    ),
)


class FlatTensors:
    """One flat buffer `buf` with a named view per tensor (llm.c's ParameterTensors). Tensors
    named in `float32` go to a second flat buffer, `buf32`, that alloc(n, np.float32) makes."""

    def __init__(self, shapes, alloc, float32=()):
        self.shapes = dict(shapes)
        self.offsets = {}                                       # into buf, or into buf32
        self.buf = self._place([(n, s) for n, s in shapes if n not in float32], alloc)
        stats = [(n, s) for n, s in shapes if n in float32]
        self.buf32 = self._place(stats, lambda n: alloc(n, np.float32)) if stats else None

    def _place(self, shapes, alloc):
        total = 0
        for name, shape in shapes:
            self.offsets[name] = total
            total += int(np.prod(shape))
        buf = alloc(total)                                      # (total,)
        for name, shape in shapes:
            o = self.offsets[name]
            setattr(self, name, buf[o:o + int(np.prod(shape))].reshape(shape))
        return buf

    def names(self):
        return list(self.shapes)

    def items(self):
        return [(n, getattr(self, n)) for n in self.shapes]

    def __len__(self):
        return self.buf.shape[0]


def start_backward(model, shapes, stats, scale):
    """The backward pass's activation gradients (d, dl) for model's last forward: made at the
    first call from shapes(config, B, T, fused) -> (whole-model shapes, one layer's), `stats`
    in float32 beside them; zeroed, as the residual stream's gradient accumulates; with the
    seed d(scale * mean loss)/d(each position's loss) in d.losses."""
    if model.mean_loss is None:
        raise LlmpyError("backward() needs a forward() with targets first")
    if model.grad_acts is None:
        whole, layer = shapes(model.config, model.B, model.T, model.fused)
        model.grad_acts = FlatTensors(whole, model.backend.zeros, stats)
        model.grad_layer = FlatTensors(layer, model.backend.zeros)
    d = model.grad_acts
    model.backend.zero_fill(d.buf)
    d.losses[...] = scale / (model.B * model.T)
    return d, model.grad_layer
