"""One decoder for the Llama family (Llama 2/3/3.1/3.2, SmolLM, Mistral, Qwen2) and the Gemma
family (Gemma, Gemma 2, Gemma 3 text): RMSNorm, RoPE, grouped-query attention, a gated MLP.

The families differ by switches in LlamaConfig, not by code paths of their own: Gemma's norms
compute x*(1+w) (norm_offset), its embeddings are scaled by sqrt(C), its MLP gates with the tanh
GELU; Gemma 2/3 add a norm after attention and after the MLP, a per-layer sliding window and
softcaps; Gemma 3 normalises q and k per head and gives its local layers their own rope base;
Qwen2 adds q,k,v biases; Mistral slides every layer's window.

PARAMS is the one table of this architecture's tensors: shape, weight decay, Hugging Face names
and llm.c llama3 file slot. The flat layout, the HF mapping and the decay set derive from it.
"""
import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np

from ..errors import LlmpyError
from .gpt2 import GPT2, load_params
from .layout import FlatTensors, pad_vocab, start_backward
from .rope import rope_tables


# ----------------------------------------------------------------------------- config

MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3_text")


@dataclass
class LlamaConfig:
    max_seq_len: int = 1024        # maxT: the longest sequence (rope tables are built per T)
    vocab_size: int = 50257        # V
    padded_vocab_size: int = 0     # Vp; 0 means pad_vocab(V)
    num_layers: int = 4            # L
    num_heads: int = 4             # NH, query heads
    num_kv_heads: int = 0          # NKV, key/value heads (GQA); 0 means NH
    channels: int = 128            # C
    head_dim: int = 0              # hd; 0 means C // NH (Gemma's differs)
    ffn_dim: int = 0               # F, the MLP's hidden width; 0 means 4C
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None      # None, or Llama 3.1's {factor, low_freq_factor, ...}
    tied_embeddings: bool = True   # the classifier is wte (no lm_head)
    qkv_bias: bool = False         # Qwen2
    sliding_window: int = 0        # 0: none; else the window of the "sliding" layers
    layer_types: tuple = ()        # per layer "full" | "sliding"; () means all sliding when
                                   # sliding_window (Mistral), else all full
    norm_offset: float = 0.0       # 1.0: Gemma's x * (1 + w)
    embed_scale: bool = False      # Gemma: embeddings times sqrt(C)
    mlp_act: str = "silu"          # "silu" (SwiGLU) | "gelu_tanh" (GeGLU, Gemma)
    post_norms: bool = False       # Gemma 2/3: a norm after attention and after the MLP
    attn_softcap: float = 0.0      # Gemma 2: scores = cap * tanh(scores / cap); 0: off
    final_softcap: float = 0.0     # Gemma 2: the same on the logits
    query_pre_attn_scalar: float = 0.0   # Gemma 2/3: scores scale by this ** -0.5; 0: hd
    qk_norm: bool = False          # Gemma 3: RMSNorm of each q and k head
    rope_local_theta: float = 0.0  # Gemma 3: the sliding layers' rope base; 0: rope_theta
    model_type: str = "llama"      # the HF model_type this config writes back as

    def __post_init__(self):
        sizes = dict(max_seq_len=1, vocab_size=1, num_layers=0, num_heads=1, channels=1)
        for name, least in sizes.items():
            if getattr(self, name) < least:
                raise LlmpyError(f"{name} {getattr(self, name)} must be at least {least}")
        self.padded_vocab_size = self.padded_vocab_size or pad_vocab(self.vocab_size)
        self.num_kv_heads = self.num_kv_heads or self.num_heads
        if not self.head_dim:
            if self.channels % self.num_heads:
                raise LlmpyError(f"channels {self.channels} not divisible by num_heads "
                                 f"{self.num_heads}: give head_dim")
            self.head_dim = self.channels // self.num_heads
        self.ffn_dim = self.ffn_dim or 4 * self.channels
        self.layer_types = tuple(self.layer_types) or (
            ("sliding" if self.sliding_window else "full",) * self.num_layers)
        if self.padded_vocab_size < self.vocab_size:
            raise LlmpyError("padded_vocab_size must be >= vocab_size")
        if self.num_heads % self.num_kv_heads:
            raise LlmpyError(f"num_kv_heads {self.num_kv_heads} does not divide num_heads "
                             f"{self.num_heads}")
        if self.head_dim % 2:
            raise LlmpyError(f"head_dim {self.head_dim} is odd: rope turns pairs of channels")
        if self.sliding_window < 0:
            raise LlmpyError(f"sliding_window {self.sliding_window} must be positive (0: none)")
        if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= {
                "full", "sliding"}:
            raise LlmpyError(f"layer_types must give 'full' or 'sliding' for each of the "
                             f"{self.num_layers} layers, got {list(self.layer_types)}")
        if "sliding" in self.layer_types and not self.sliding_window:
            raise LlmpyError("layer_types has sliding layers but sliding_window is 0")
        if self.mlp_act not in ("silu", "gelu_tanh"):
            raise LlmpyError(f"mlp_act {self.mlp_act!r} is not 'silu' or 'gelu_tanh'")
        if self.model_type not in MODEL_TYPES:
            raise LlmpyError(f"model_type {self.model_type!r} is not one of "
                             f"{', '.join(MODEL_TYPES)}")

    # derived sizes
    @property
    def qkv_dim(self):
        """Rows of qkvw: q heads, then k heads, then v heads."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def window(self, l):
        """Layer l's attention window (0: the whole causal past)."""
        return self.sliding_window if self.layer_types[l] == "sliding" else 0

    def theta(self, l):
        """Layer l's rope base, and whether the Llama 3.1 scaling applies to it."""
        if self.layer_types[l] == "sliding" and self.rope_local_theta:
            return self.rope_local_theta, False
        return self.rope_theta, True

    def attn_scale(self):
        """The scores' scale; None: the op's default 1/sqrt(hd)."""
        return self.query_pre_attn_scalar ** -0.5 if self.query_pre_attn_scalar else None


# ----------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class Param:
    """One tensor. hf: its Hugging Face names, "{}" the layer index; several names are stacked
    along the rows in that order (qkvw = [q; k; v], fcw = [up; gate]). llmc: the slot of llm.c's
    llama3 model file that holds it (None: that file has no slot, so it cannot hold the model)."""
    name: str
    shape: object                  # cfg -> shape
    decay: bool                    # AdamW weight decay: the 2-D weights, never norms or biases
    hf: tuple
    llmc: object = None
    present: object = None         # cfg -> bool; None: always


_ATT = "model.layers.{}.self_attn."
_MLP = "model.layers.{}.mlp."
_LAYER = "model.layers.{}."
PARAMS = (
    Param("wte", lambda c: (c.padded_vocab_size, c.channels), True,
          ("model.embed_tokens.weight",), "wte"),
    Param("lm_head", lambda c: (c.padded_vocab_size, c.channels), True,
          ("lm_head.weight",), "wpe", lambda c: not c.tied_embeddings),
    Param("ln1w", lambda c: (c.num_layers, c.channels), False,
          (_LAYER + "input_layernorm.weight",), "ln1w"),
    Param("qkvw", lambda c: (c.num_layers, c.qkv_dim, c.channels), True,
          (_ATT + "q_proj.weight", _ATT + "k_proj.weight", _ATT + "v_proj.weight"), "qkvw"),
    Param("qkvb", lambda c: (c.num_layers, c.qkv_dim), False,
          (_ATT + "q_proj.bias", _ATT + "k_proj.bias", _ATT + "v_proj.bias"), "qkvb",
          lambda c: c.qkv_bias),
    Param("qnormw", lambda c: (c.num_layers, c.head_dim), False,
          (_ATT + "q_norm.weight",), None, lambda c: c.qk_norm),
    Param("knormw", lambda c: (c.num_layers, c.head_dim), False,
          (_ATT + "k_norm.weight",), None, lambda c: c.qk_norm),
    Param("attprojw", lambda c: (c.num_layers, c.channels, c.num_heads * c.head_dim), True,
          (_ATT + "o_proj.weight",), "attprojw"),
    Param("attpostw", lambda c: (c.num_layers, c.channels), False,
          (_LAYER + "post_attention_layernorm.weight",), None, lambda c: c.post_norms),
    # the MLP's input norm: Llama calls it post_attention_layernorm (it follows attention's
    # residual add), Gemma 2/3 pre_feedforward_layernorm (their post_attention_layernorm is the
    # norm before that add, attpostw)
    Param("ln2w", lambda c: (c.num_layers, c.channels), False,
          (_LAYER + "post_attention_layernorm.weight",), "ln2w", lambda c: not c.post_norms),
    Param("ln2w", lambda c: (c.num_layers, c.channels), False,
          (_LAYER + "pre_feedforward_layernorm.weight",), "ln2w", lambda c: c.post_norms),
    Param("fcw", lambda c: (c.num_layers, 2 * c.ffn_dim, c.channels), True,
          (_MLP + "up_proj.weight", _MLP + "gate_proj.weight"), "fcw"),
    Param("fcprojw", lambda c: (c.num_layers, c.channels, c.ffn_dim), True,
          (_MLP + "down_proj.weight",), "fcprojw"),
    Param("fcpostw", lambda c: (c.num_layers, c.channels), False,
          (_LAYER + "post_feedforward_layernorm.weight",), None, lambda c: c.post_norms),
    Param("lnfw", lambda c: (c.channels,), False, ("model.norm.weight",), "lnfw"),
)
# Tensors HF checkpoints may carry that are not weights: old checkpoints' rope frequencies.
NOT_WEIGHTS = ("rotary_emb.inv_freq",)


def params_of(cfg):
    """The table's entries present in this config, in layout order."""
    return [p for p in PARAMS if p.present is None or p.present(cfg)]


def param_shapes(cfg):
    """[(name, shape)] of this config's tensors, in the flat buffer's order."""
    return [(p.name, tuple(p.shape(cfg))) for p in params_of(cfg)]


def decayed(cfg):
    """The names AdamW decays (AdamW's `decayed` argument)."""
    return {p.name for p in params_of(cfg) if p.decay}


class DecoderLayout:
    """The name lists the trainer asks a model's `layout` for (as layout.Layout answers them
    for GPT-2), from PARAMS for one config: the decay set, and the data-parallel buckets (a
    tensor with a layer index in its HF name is one bucket per layer)."""

    def __init__(self, cfg):
        self.params = params_of(cfg)

    def decayed(self):
        return tuple(p.name for p in self.params if p.decay)

    def per_layer(self):
        return tuple(p.name for p in self.params if "{}" in p.hf[0])

    def whole_model(self):
        return tuple(p.name for p in self.params if "{}" not in p.hf[0])


def llmc_slots(cfg):
    """{our name: llm.c llama3 slot name}; raises when a tensor has no slot there."""
    params = params_of(cfg)
    missing = [p.name for p in params if p.llmc is None]
    if missing:
        raise LlmpyError(f"llm.c's llama3 model file has no slot for {', '.join(missing)} "
                         f"(a {cfg.model_type} model): write a Hugging Face directory instead")
    return {p.name: p.llmc for p in params}


# ----------------------------------------------------------------------------- HF weights

def _strip(name):
    # Gemma 3's multimodal checkpoints nest the text model; everything else names it as is
    return name[len("language_model."):] if name.startswith("language_model.") else name


def _hf_slots(cfg, p=None):
    """(table entry, our view in p (None without p), its HF names) for every tensor: one per
    layer for the stacked ones."""
    for entry in params_of(cfg):
        view = None if p is None else getattr(p, entry.name)
        if "{}" in entry.hf[0]:
            for l in range(cfg.num_layers):
                yield entry, None if p is None else view[l], [n.format(l) for n in entry.hf]
        else:
            yield entry, view, list(entry.hf)


def hf_names(cfg):
    """{HF name: our tensor's name} for every HF tensor of this config."""
    return {n: entry.name for entry, _, names in _hf_slots(cfg) for n in names}


def params_from_hf(cfg, tensors, path):
    """HF state dict {name: array} -> flat float32 params in our layout (wte and lm_head padded
    to Vp rows with zeros). q and k stay in HF's rotate-half layout. Raises LlmpyError naming
    `path` for a missing, misshapen or unexpected tensor."""
    tensors = {_strip(k): v for k, v in tensors.items()}
    flat = np.zeros(sum(int(np.prod(s)) for _, s in param_shapes(cfg)), dtype=np.float32)
    p = FlatTensors(param_shapes(cfg), lambda n: flat)
    used = set()
    V = cfg.vocab_size

    def take(hf_name):
        if hf_name not in tensors:
            raise LlmpyError(f"{path}: missing tensor {hf_name}")
        used.add(hf_name)
        return np.asarray(tensors[hf_name])

    def fill(entry, view, names):
        parts = [take(n) for n in names]
        t = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        want = (V,) + view.shape[1:] if entry.name in ("wte", "lm_head") else view.shape
        if t.shape != want:
            hint = (f" (num_heads {cfg.num_heads}, num_kv_heads {cfg.num_kv_heads}, head_dim "
                    f"{cfg.head_dim}: check config.json's head_dim)"
                    if entry.name in ("qkvw", "qkvb", "attprojw", "qnormw", "knormw") else "")
            shapes = " + ".join(str(tuple(x.shape)) for x in parts)
            raise LlmpyError(f"{path}: {', '.join(names)} has shape {shapes}, expected "
                             f"{want} in all for this config{hint}")
        view[:len(t)] = t                            # the padded rows of wte/lm_head stay 0

    for entry, view, names in _hf_slots(cfg, p):
        fill(entry, view, names)
    if cfg.tied_embeddings and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"]):
            raise LlmpyError(f"{path}: lm_head.weight differs from model.embed_tokens.weight "
                             "but config.json ties them (tie_word_embeddings)")
        used.add("lm_head.weight")
    extra = sorted(k for k in tensors if k not in used and not k.endswith(NOT_WEIGHTS))
    if extra:
        raise LlmpyError(f"{path}: unexpected tensors for a {cfg.model_type} model: "
                         f"{', '.join(extra[:5])}")
    return flat


def params_to_hf(cfg, flat):
    """Flat params -> {HF name: contiguous float32 array}, as *ForCausalLM names them (no
    lm_head.weight when tied, as transformers saves tied weights)."""
    p = FlatTensors(param_shapes(cfg), lambda n: np.asarray(flat, dtype=np.float32))
    out = {}

    def split(entry, view, names):
        if entry.name in ("wte", "lm_head"):
            view = view[:cfg.vocab_size]                 # drop the padding
        if len(names) == 1:
            out[names[0]] = view
            return
        NH, NKV, hd, F = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.ffn_dim
        rows = [NH * hd, NKV * hd, NKV * hd] if entry.name in ("qkvw", "qkvb") else [F, F]
        for name, part in zip(names, np.split(view, np.cumsum(rows)[:-1], axis=0)):
            out[name] = part

    for entry, view, names in _hf_slots(cfg, p):
        split(entry, view, names)
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- HF config

# config.json's defaults where a key is absent, per model_type (transformers 5.x's config
# classes): activation key, tied embeddings, norm eps, rope base
_HF_DEFAULTS = {
    "llama": ("hidden_act", False, 1e-6, 10000.0),
    "mistral": ("hidden_act", False, 1e-6, 10000.0),
    "qwen2": ("hidden_act", False, 1e-6, 10000.0),
    "gemma": ("hidden_act", True, 1e-6, 10000.0),
    "gemma2": ("hidden_activation", True, 1e-6, 10000.0),
    "gemma3_text": ("hidden_activation", True, 1e-6, 1000000.0),
}
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
                 "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}


def _rope(c, layer_type, need):
    """(theta, llama3 scaling dict or None) of config.json's rope settings for one layer type
    ("full_attention" / "sliding_attention"), from either form: transformers 5.x's
    rope_parameters (flat, or per layer type for Gemma 3) or the older rope_theta/rope_scaling
    (and Gemma 3's rope_local_base_freq)."""
    mt = c["model_type"]
    params = c.get("rope_parameters") or {}
    if layer_type in params:                            # per layer type (Gemma 3)
        params = params[layer_type] or {}
    elif mt == "gemma3_text" and layer_type == "sliding_attention":
        params = {"rope_theta": c.get("rope_local_base_freq", 10000.0)}
    else:
        params = dict(params) or dict(c.get("rope_scaling") or {})
        params.setdefault("rope_theta", c.get("rope_theta", _HF_DEFAULTS[mt][3]))
    kind = params.get("rope_type", params.get("type", "default"))
    need(kind in ("default", "llama3"), f"rope type {kind!r} is not supported (default or "
                                        "llama3)")
    need(params.get("partial_rotary_factor", 1.0) == 1.0, "partial_rotary_factor is not 1")
    theta = float(params["rope_theta"])
    if kind == "default":
        return theta, None
    keys = ("factor", "low_freq_factor", "high_freq_factor")
    for k in keys:
        need(k in params, f"the llama3 rope scaling has no {k!r}")
    scaling = {k: float(params[k]) for k in keys}
    scaling["original_max_position_embeddings"] = int(params.get(
        "original_max_position_embeddings", c.get("max_position_embeddings")))
    return theta, scaling


def config_from_hf(c, path):
    """LlamaConfig from an HF config.json dict (Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3
    text), refusing with one line naming `path` what this model cannot compute."""
    def need(ok, what):
        if not ok:
            raise LlmpyError(f"{path}: {what}")
    mt = c.get("model_type")
    if mt == "gemma3" and isinstance(c.get("text_config"), dict):
        need(False, "a multimodal Gemma 3 (Gemma3ForConditionalGeneration); only the text "
                    "model (gemma3_text) is supported")
    need(mt in MODEL_TYPES, f"model_type {mt!r} is not supported (one of "
                            f"{', '.join(MODEL_TYPES)})")
    act_key, tied, eps, _ = _HF_DEFAULTS[mt]
    gemma = mt.startswith("gemma")
    act = c.get(act_key) or c.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if mt == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"       # transformers maps Gemma's legacy "gelu" to tanh's
    need(act in ("silu", "gelu_pytorch_tanh"), f"{act_key} {act!r} is not silu or "
                                               "gelu_pytorch_tanh")
    need(not c.get("mlp_bias", False), "mlp_bias is set")
    need(mt == "qwen2" or not c.get("attention_bias", False),
         "attention_bias is set (biases on q, k, v and o)")
    need(not c.get("use_bidirectional_attention"), "use_bidirectional_attention is set")
    try:
        C, NH = int(c["hidden_size"]), int(c["num_attention_heads"])
        L = int(c["num_hidden_layers"])
        NKV = int(c.get("num_key_value_heads") or NH)
        hd = int(c.get("head_dim") or C // NH)
        F = int(c["intermediate_size"])
        V, maxT = int(c["vocab_size"]), int(c.get("max_position_embeddings", 0))
    except KeyError as e:
        raise LlmpyError(f"{path}: config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LlmpyError(f"{path}: bad config.json: {e}") from None
    need(maxT > 0, "max_position_embeddings is missing or not positive")
    need(NKV > 0 and NH % NKV == 0, f"num_key_value_heads {NKV} does not divide "
                                    f"num_attention_heads {NH}")
    theta, scaling = _rope(c, "full_attention", need)
    local_theta = 0.0
    window = c.get("sliding_window")
    if mt == "qwen2" and not c.get("use_sliding_window", False):
        window = None
    need(window is None or int(window) > 0, f"sliding_window {window} must be positive")
    window = int(window or 0)
    types = c.get("layer_types")
    if types is not None:
        need(len(types) == L and set(types) <= {"full_attention", "sliding_attention"},
             f"layer_types must be full_attention or sliding_attention for each of {L} layers")
        types = ["sliding" if t == "sliding_attention" else "full" for t in types]
    elif mt == "gemma2":
        types = ["sliding" if (i + 1) % 2 else "full" for i in range(L)]
    elif mt == "gemma3_text":
        pattern = int(c.get("sliding_window_pattern", 6))
        types = ["sliding" if (i + 1) % pattern else "full" for i in range(L)]
    elif mt == "qwen2":
        first = int(c.get("max_window_layers", 28))
        types = ["sliding" if window and i >= first else "full" for i in range(L)]
    elif mt == "mistral":
        types = ["sliding" if window else "full"] * L
    else:
        types = ["full"] * L              # Llama and Gemma have no window
        window = 0
    if "sliding" not in types:
        window = 0
    need("sliding" not in types or window, "sliding layers but no sliding_window")
    if mt == "gemma3_text":
        local_theta, local_scaling = _rope(c, "sliding_attention", need)
        need(local_scaling is None, "rope scaling on Gemma 3's sliding layers")
    softcap = lambda k: float(c.get(k) or 0.0)   # noqa: E731  (None in config.json: off)
    try:
        return LlamaConfig(
            max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=NH, num_kv_heads=NKV,
            channels=C, head_dim=hd, ffn_dim=F, norm_eps=float(c.get("rms_norm_eps", eps)),
            rope_theta=theta, rope_scaling=scaling,
            tied_embeddings=bool(c.get("tie_word_embeddings", tied)), qkv_bias=mt == "qwen2",
            sliding_window=window, layer_types=tuple(types),
            norm_offset=1.0 if gemma else 0.0, embed_scale=gemma,
            mlp_act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
            post_norms=mt in ("gemma2", "gemma3_text"),
            attn_softcap=softcap("attn_logit_softcapping") if mt != "gemma" else 0.0,
            final_softcap=softcap("final_logit_softcapping") if mt != "gemma" else 0.0,
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar", 256))
            if mt in ("gemma2", "gemma3_text") else 0.0,
            qk_norm=mt == "gemma3_text", rope_local_theta=local_theta, model_type=mt)
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None


def config_to_hf(cfg):
    """The config.json that makes transformers build the same network (the class named by
    cfg.model_type). Raises LlmpyError for a config that class cannot express."""
    mt = cfg.model_type
    gemma = mt.startswith("gemma")

    def need(ok, what):
        if not ok:
            raise LlmpyError(f"a {mt} config.json cannot express {what}")
    need(cfg.norm_offset == (1.0 if gemma else 0.0), f"norm_offset {cfg.norm_offset}")
    need(cfg.embed_scale == gemma, f"embed_scale {cfg.embed_scale}")
    need(cfg.mlp_act == ("gelu_tanh" if gemma else "silu"), f"mlp_act {cfg.mlp_act!r}")
    need(cfg.post_norms == (mt in ("gemma2", "gemma3_text")), f"post_norms {cfg.post_norms}")
    need(cfg.qk_norm == (mt == "gemma3_text"), f"qk_norm {cfg.qk_norm}")
    need(cfg.qkv_bias == (mt == "qwen2"), f"qkv_bias {cfg.qkv_bias}")
    need(mt in ("gemma2", "gemma3_text") or not (cfg.attn_softcap or cfg.final_softcap),
         "softcaps")
    need(mt in ("gemma2", "gemma3_text") or not cfg.query_pre_attn_scalar,
         "query_pre_attn_scalar")
    need(mt == "gemma3_text" or not cfg.rope_local_theta, "rope_local_theta")
    types = ["sliding_attention" if t == "sliding" else "full_attention"
             for t in cfg.layer_types]
    need(mt != "mistral" or len(set(types)) == 1, "a window on some layers only")
    need(mt not in ("llama", "gemma") or not cfg.sliding_window, "a sliding window")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**rope, **cfg.rope_scaling, "rope_type": "llama3"}
    c = {
        "architectures": [ARCHITECTURES[mt]], "model_type": mt,
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_seq_len,
        "hidden_size": cfg.channels, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        ("hidden_activation" if mt in ("gemma2", "gemma3_text") else "hidden_act"):
            "gelu_pytorch_tanh" if gemma else "silu",
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tied_embeddings,
        "rope_parameters": rope, "attention_dropout": 0.0, "initializer_range": 0.02,
    }
    if mt == "gemma3_text":
        c["rope_parameters"] = {"full_attention": rope, "sliding_attention": {
            "rope_type": "default", "rope_theta": cfg.rope_local_theta or cfg.rope_theta}}
    if mt in ("mistral", "qwen2", "gemma2", "gemma3_text"):
        c["sliding_window"] = cfg.sliding_window or None
    if mt == "qwen2":
        c["use_sliding_window"] = bool(cfg.sliding_window)
    if mt in ("qwen2", "gemma2", "gemma3_text"):
        c["layer_types"] = types
    if mt in ("gemma2", "gemma3_text"):
        scalar = cfg.query_pre_attn_scalar or cfg.head_dim
        c["query_pre_attn_scalar"] = int(scalar) if float(scalar).is_integer() else scalar
        c["attn_logit_softcapping"] = cfg.attn_softcap or None
        c["final_logit_softcapping"] = cfg.final_softcap or None
    return c


# ----------------------------------------------------------------------------- presets

def _every(n, L):
    """Gemma 3's pattern: every n-th layer full, the others sliding."""
    return tuple("sliding" if (i + 1) % n else "full" for i in range(L))


PRESETS = {
    # The embedded Llama: GPT-2's tokenizer (the bundled Shakespeare is tokenized with it) and
    # GPT-2 tiny's width and depth, so that it trains on 2 CPU cores in minutes; GQA (2 kv
    # heads for 4) and a SwiGLU width of about 8C/3, as Llama sizes its MLP.
    "llama-tiny": dict(num_layers=4, num_heads=4, num_kv_heads=2, channels=128, ffn_dim=384,
                       norm_eps=1e-5, rope_theta=10000.0),
    # the shapes of HuggingFaceTB/SmolLM2-135M and google/gemma-3-270m (config.json), for
    # benchmarks from random weights
    "smollm2-135m": dict(max_seq_len=8192, vocab_size=49152, num_layers=30, num_heads=9,
                         num_kv_heads=3, channels=576, ffn_dim=1536, norm_eps=1e-5,
                         rope_theta=100000.0),
    # meta-llama/Llama-3.2-1B's shape (config.json): llama3 rope scaling, tied embeddings
    "llama-3.2-1b": dict(max_seq_len=131072, vocab_size=128256, num_layers=16, num_heads=32,
                         num_kv_heads=8, channels=2048, ffn_dim=8192, norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling=dict(
                             factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=8192)),
    "gemma3-270m": dict(max_seq_len=32768, vocab_size=262144, num_layers=18, num_heads=4,
                        num_kv_heads=1, head_dim=256, channels=640, ffn_dim=2048,
                        norm_eps=1e-6, rope_theta=1000000.0, rope_local_theta=10000.0,
                        sliding_window=512, layer_types=_every(6, 18),
                        query_pre_attn_scalar=256.0, norm_offset=1.0, embed_scale=True,
                        mlp_act="gelu_tanh", post_norms=True, qk_norm=True,
                        model_type="gemma3_text"),
}


def preset(name, **overrides):
    """A from-scratch shape by name (PRESETS), with fields overridden (max_seq_len=...)."""
    if name not in PRESETS:
        raise LlmpyError(f"unknown decoder preset {name!r} (one of {', '.join(PRESETS)})")
    return LlamaConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- layout

def activation_shapes(cfg, B, T, fused=False, layers=None):
    """Everything the forward pass writes and the backward pass reads. Names with a leading
    layer axis (LAYERED) hold `layers` layers (default L) or, where only the next op reads a
    layer's output, one layer's worth, which every layer overwrites.
    fused: the backend's flash attention and classifier keep one logsumexp per row instead of
    the (T,T) attention matrices and the probabilities (as GPT2)."""
    L = cfg.num_layers if layers is None else layers
    C, NH, hd, F, Vp = cfg.channels, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, \
        cfg.padded_vocab_size
    QKV = cfg.qkv_dim
    att = ([("att_lse", (L, B, NH, T))] if fused else
           [("preatt", (L, B, NH, T, T)), ("att", (L, B, NH, T, T))])
    # the QK-norm backward reads its input, the projection's q,k: then every layer keeps it;
    # without, rope is the only reader, and rope's backward needs no input
    # (q and k normed into buffers of their own: contiguous rows, and statistics, for the ops)
    NKV = cfg.num_kv_heads
    qk = ([("qn", (1, B, T, NH, hd)), ("kn", (1, B, T, NKV, hd)), ("q_rstd", (L, B, T, NH)),
           ("k_rstd", (L, B, T, NKV))] if cfg.qk_norm else [])
    # a post-norm's backward reads its input, the projection's output
    post = L if cfg.post_norms else 1
    attpost = ([("attpost", (1, B, T, C)), ("attpost_rstd", (L, B, T))]
               if cfg.post_norms else [])
    fcpost = ([("fcpost", (1, B, T, C)), ("fcpost_rstd", (L, B, T))]
              if cfg.post_norms else [])
    return [
        ("encoded", (B, T, C)),
        ("ln1", (L, B, T, C)), ("ln1_rstd", (L, B, T)),
        ("qkv_raw", (L if cfg.qk_norm else 1, B, T, QKV)), *qk,     # the projection's output
        ("qkv", (L, B, T, QKV)),                      # attention's input: q, k turned by rope
        ("atty", (L, B, T, NH * hd)), *att,
        ("attproj", (post, B, T, C)), *attpost,
        ("residual2", (L, B, T, C)), ("ln2", (L, B, T, C)), ("ln2_rstd", (L, B, T)),
        ("fch", (L, B, T, 2 * F)), ("act", (L, B, T, F)),
        ("fcproj", (post, B, T, C)), *fcpost,
        ("residual3", (L, B, T, C)),
        ("lnf", (B, T, C)), ("lnf_rstd", (B, T)),
        ("logits", (B, T, Vp)), ("logits_lse", (B, T)) if fused else ("probs", (B, T, Vp)),
        ("losses", (B, T)),
    ]


LAYERED = {"ln1", "ln1_rstd", "qkv_raw", "qn", "kn", "q_rstd", "k_rstd", "qkv", "atty", "att_lse", "preatt",
           "att", "attproj", "attpost", "attpost_rstd", "residual2", "ln2", "ln2_rstd", "fch",
           "act", "fcproj", "fcpost", "fcpost_rstd", "residual3"}
# Per-row statistics: float32 on every backend (as model.STATS)
STATS = ("ln1_rstd", "q_rstd", "k_rstd", "attpost_rstd", "ln2_rstd", "fcpost_rstd", "lnf_rstd",
         "att_lse", "logits_lse", "losses")


def grad_activation_shapes(cfg, B, T, fused=False):
    """The backward pass's scratch, as GPT2's: (whole-model shapes, one layer's shapes). The
    residual stream's gradient is one (B,T,C) buffer; a layer's other gradients are needed only
    while that layer runs."""
    C, NH, hd, F, Vp = cfg.channels, cfg.num_heads, cfg.head_dim, cfg.ffn_dim, \
        cfg.padded_vocab_size
    QKV = cfg.qkv_dim
    # d(logits): the fused classifier writes it over the logits, unless a softcap follows it,
    # whose backward reads the (capped) logits; then the capped and the raw logits' gradients
    dlogits = [] if fused else [("logits", (B, T, Vp))]
    if cfg.final_softcap:
        dlogits = [("logits", (B, T, Vp)), ("logits_raw", (B, T, Vp))]
    model = [*dlogits, ("losses", (B, T)), ("lnf", (B, T, C)), ("residual", (B, T, C))]
    post = [("attproj", (B, T, C)), ("fcproj", (B, T, C))] if cfg.post_norms else []
    layer = [("ln1", (B, T, C)), ("qkv_raw", (B, T, QKV)),
             *([("qn", (B, T, NH, hd)), ("kn", (B, T, cfg.num_kv_heads, hd))]
               if cfg.qk_norm else []),
             ("qkv", (B, T, QKV)), ("atty", (B, T, NH * hd)),
             *([] if fused else [("preatt", (B, NH, T, T)), ("att", (B, NH, T, T))]),
             *post, ("ln2", (B, T, C)), ("fch", (B, T, 2 * F)), ("act", (B, T, F))]
    return model, layer


# the layer gradients that matmul and attention backwards produce: a backend that writes them
# (writes_activation_grads) needs no zeroing there; every other one is added into
WRITTEN = {"ln1", "qkv", "atty", "ln2", "act"}


def layer_views(acts, l):
    """Layer l's views of the LAYERED activations (a one-layer buffer serves every layer)."""
    return SimpleNamespace(**{n: t[min(l, t.shape[0] - 1)] for n, t in acts.items()
                              if n in LAYERED})


def flops_per_token(cfg, T):
    """Training FLOPs per token at sequence length T, counted as model.flops_per_token counts
    GPT-2's: 6 per weight that multiplies (the classifier and each layer's projections), plus
    attention's two products, 2 * 2 * NH * hd FLOPs per key a query sees forward and twice that
    backward; a query sees T keys (nanoGPT's count, which ignores the causal half), or the
    window on a sliding layer."""
    C, NH, hd, F = cfg.channels, cfg.num_heads, cfg.head_dim, cfg.ffn_dim
    layer = cfg.qkv_dim * C + C * NH * hd + 2 * F * C + C * F
    keys = sum(min(T, cfg.window(l) or T) for l in range(cfg.num_layers))
    return 6 * (cfg.padded_vocab_size * C + cfg.num_layers * layer) + 12 * NH * hd * keys


# ----------------------------------------------------------------------------- one layer

def heads(x, hd, n=None):
    """(...,D) packed rows -> (...,n,hd), a view of the first n*hd columns (all: D/hd heads)."""
    n = x.shape[-1] // hd if n is None else n
    return x[..., :n * hd].reshape(x.shape[:-1] + (n, hd))


def block_forward(cfg, ops, p, l, v, x, rope, attend, nxt):
    """Layer l of the forward pass, shared by the training forward and the decode step.
    ops: the backend; p: the params; v: the layer's activations (layer_views); x: the residual
    stream into the layer, whose norm v.ln1 already holds (the op before made it); rope: (cos,
    sin) of this layer's base at these positions; attend(v): v.atty from v.qkv; nxt: (out,
    rstd, weight) of the norm that reads this layer's output (the next ln1, or lnf)."""
    NH, NKV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    eps, off, QK = cfg.norm_eps, cfg.norm_offset, (cfg.num_heads + cfg.num_kv_heads) * hd
    ops.matmul_forward(v.qkv_raw, v.ln1, p.qkvw[l], p.qkvb[l] if cfg.qkv_bias else None)
    qk, turned = heads(v.qkv_raw, hd, NH + NKV), heads(v.qkv, hd, NH + NKV)  # (B,T,NH+NKV,hd)
    if cfg.qk_norm:                 # each head normed over hd, then turned
        for h, out, rstd, w in qk_norms(cfg, v, p, l):
            ops.rmsnorm_forward(out, rstd, qk[..., h, :], w, eps, off)
            ops.rope_forward(turned[..., h, :], out, *rope)
    else:
        ops.rope_forward(turned, qk, *rope)
    v.qkv[..., QK:] = v.qkv_raw[..., QK:]                       # v: unturned
    attend(v)
    ops.matmul_forward(v.attproj, v.atty, p.attprojw[l], None)
    out = v.attproj
    if cfg.post_norms:
        ops.rmsnorm_forward(v.attpost, v.attpost_rstd, out, p.attpostw[l], eps, off)
        out = v.attpost
    # residual2 = x + attention's output, and the MLP's norm of it, in one pass
    ops.residual_rmsnorm_forward(v.residual2, v.ln2, v.ln2_rstd, x, out, p.ln2w[l], eps, off)
    ops.matmul_forward(v.fch, v.ln2, p.fcw[l], None)
    glu = ops.swiglu_forward if cfg.mlp_act == "silu" else ops.geglu_forward
    glu(v.act, v.fch)
    ops.matmul_forward(v.fcproj, v.act, p.fcprojw[l], None)
    out = v.fcproj
    if cfg.post_norms:
        ops.rmsnorm_forward(v.fcpost, v.fcpost_rstd, out, p.fcpostw[l], eps, off)
        out = v.fcpost
    # residual3 = residual2 + the MLP's output, and the next norm of it
    ops.residual_rmsnorm_forward(v.residual3, nxt[0], nxt[1], v.residual2, out, nxt[2], eps,
                                 off)


def qk_norms(cfg, v, p, l):
    """Gemma 3's QK-norm, for q then k: (their heads in the packed rows, the normed buffer
    in v, its rstd (None in the gradients' v), the weight in p (params or grads))."""
    NH, H = cfg.num_heads, cfg.num_heads + cfg.num_kv_heads
    return [(slice(0, NH), v.qn, getattr(v, "q_rstd", None), p.qnormw[l]),
            (slice(NH, H), v.kn, getattr(v, "k_rstd", None), p.knormw[l])]


def rope_keys(cfg):
    """Layer l's rope tables: (theta, whether Llama 3.1's scaling applies) per layer."""
    return [cfg.theta(l) for l in range(cfg.num_layers)]


def rope_for(cfg, positions, key, upload):
    """(cos, sin): (len(positions), hd/2) for one rope_keys entry, made by upload(host array)
    into the backend's arrays."""
    theta, scaled = key
    cos, sin = rope_tables(cfg.head_dim, positions, theta, cfg.rope_scaling if scaled else None)
    return upload(cos), upload(sin)


# ----------------------------------------------------------------------------- the model

class Llama:
    """The decoder, with GPT2's contract: flat params and grads (FlatTensors), forward(inputs,
    targets) -> mean loss, backward(layer_done=None, scale=1.0) adding into grads, zero_grad,
    num_parameters, memory(B, T)."""
    check_tokens = GPT2.check_tokens
    zero_grad = GPT2.zero_grad
    num_parameters = GPT2.num_parameters

    def __init__(self, config, backend):
        self.config = config
        self.backend = backend
        # the backend's capabilities, as GPT2 reads them (see GPT2.__init__)
        self.fused = backend.caps.fused
        self.writes_grads = backend.caps.writes_activation_grads
        self.params = FlatTensors(param_shapes(config), backend.zeros)
        self.grads = FlatTensors(param_shapes(config), backend.zeros)
        self.decayed = decayed(config)
        self.layout = DecoderLayout(config)
        # Gemma's sqrt(C), rounded to the compute dtype as HF rounds it (float32(sqrt(C)) to
        # the weights' dtype): through one element of the backend's own array
        s = backend.zeros(1)
        s[0] = float(np.float32(math.sqrt(config.channels))) if config.embed_scale else 1.0
        self.embed_scale = float(backend.to_host(s)[0])
        self.B = self.T = 0
        self.acts = self.grad_acts = self.grad_layer = None
        self.rope = {}                                  # rope_keys entry -> (cos, sin) at T
        self.inputs = self.targets = None
        self.mean_loss = None

    def decoder(self, max_len, rows=1, ops=None):
        """A Decoder: the one-position decode step with a KV cache (as GPT2.decoder)."""
        return Decoder(self, max_len, rows, ops)

    def upload(self, host):
        """A host float array in the backend's array and compute dtype."""
        buf = self.backend.zeros(host.size)
        buf[:] = self.backend.to_device(np.ascontiguousarray(host, np.float32).ravel())
        return buf.reshape(host.shape)

    def memory(self, B, T, recompute_gelu=None):
        """Bytes of the model's buffers at (B,T), from their shapes alone (as GPT2.memory;
        recompute_gelu changes nothing here: the gated MLP keeps its output in `act`, which
        the down projection's backward reads either way)."""
        item = self.params.buf.itemsize

        def size(shapes):
            return sum(int(np.prod(s)) * (4 if n in STATS else item) for n, s in shapes)
        whole, layer = grad_activation_shapes(self.config, B, T, self.fused)
        return {"parameters": self.params.buf.nbytes, "gradients": self.grads.buf.nbytes,
                "activations": size(activation_shapes(self.config, B, T, self.fused)),
                "activation gradients": size(whole) + size(layer)}

    def _ensure_activations(self, B, T):
        if (B, T) != (self.B, self.T):
            cfg = self.config
            shapes = activation_shapes(cfg, B, T, self.fused)
            self.acts = FlatTensors(shapes, self.backend.zeros, STATS)
            self.grad_acts = self.grad_layer = None         # made on the first backward
            self.rope = {k: rope_for(cfg, np.arange(T), k, self.upload)
                         for k in set(rope_keys(cfg))}
            self.B, self.T = B, T

    def _classifier(self):
        """(weights, gradient) of the classifier: lm_head, or wte when tied."""
        name = "wte" if self.config.tied_embeddings else "lm_head"
        return getattr(self.params, name), getattr(self.grads, name)

    def _norm_after(self, l):
        """(out, rstd, weight) of the norm that reads layer l's output: layer l+1's ln1, or lnf
        after the last layer (l = -1: the embeddings')."""
        a, p = self.acts, self.params
        if l + 1 == self.config.num_layers:
            return a.lnf, a.lnf_rstd, p.lnfw
        return a.ln1[l + 1], a.ln1_rstd[l + 1], p.ln1w[l + 1]

    # the three places where a fused backend's signatures differ (see GPT2)
    def _attention_forward(self, l, v):
        cfg = self.config
        kw = dict(scale=cfg.attn_scale(), softcap=cfg.attn_softcap, window=cfg.window(l))
        if self.fused:
            self.backend.attention_forward(v.atty, v.att_lse, v.qkv, **kw)
        else:
            self.backend.attention_forward(v.atty, v.preatt, v.att, v.qkv, **kw)

    def _attention_backward(self, l, v, dl):
        cfg = self.config
        kw = dict(scale=cfg.attn_scale(), softcap=cfg.attn_softcap, window=cfg.window(l))
        if self.fused:
            self.backend.attention_backward(dl.qkv, dl.atty, v.qkv, v.atty, v.att_lse, **kw)
        else:
            self.backend.attention_backward(dl.qkv, dl.preatt, dl.att, dl.atty, v.qkv, v.att,
                                            **kw)

    def _crossentropy(self, backward=False):
        """The loss forward, or its backward: d(logits) (of the capped logits with a final
        softcap). A fused classifier writes it over the logits, unless a softcap's backward
        still needs them."""
        be, a, V = self.backend, self.acts, self.config.vocab_size
        if not backward:
            stats = a.logits_lse if self.fused else a.probs
            be.crossentropy_forward(a.losses, stats, a.logits, self.targets, V)
            return None
        d = self.grad_acts
        if self.fused:
            dlogits = d.logits if self.config.final_softcap else a.logits
            be.crossentropy_backward(dlogits, d.losses, a.logits, a.logits_lse, self.targets, V)
        else:
            dlogits = d.logits
            be.crossentropy_backward(dlogits, d.losses, a.probs, self.targets, V)
        return dlogits

    def _take_batch(self, inputs, targets):
        """Checks the batch as GPT2.forward does and puts it on the device."""
        for tokens, what in ((inputs, "input"), (targets, "target")):
            if tokens is not None:
                self.check_tokens(tokens, what)
        if targets is not None and targets.shape != inputs.shape:
            raise LlmpyError(f"targets of shape {targets.shape} for inputs of shape "
                             f"{inputs.shape}")
        self.inputs, self.targets = (None if t is None else self.backend.to_device(
            np.ascontiguousarray(t, dtype=np.int64)) for t in (inputs, targets))

    def forward(self, inputs, targets=None):
        """inputs, targets: (B,T) int host arrays. Returns the mean loss, or None without
        targets (the logits are in acts.logits, capped by final_softcap)."""
        self._take_batch(inputs, targets)
        be, cfg, p = self.backend, self.config, self.params
        self._ensure_activations(*inputs.shape)
        a = self.acts

        be.embedding_forward(a.encoded, self.inputs, p.wte, self.embed_scale)
        out, rstd, w = self._norm_after(-1)
        be.rmsnorm_forward(out, rstd, a.encoded, w, cfg.norm_eps, cfg.norm_offset)
        keys = rope_keys(cfg)
        for l in range(cfg.num_layers):
            x = a.encoded if l == 0 else a.residual3[l - 1]         # (B,T,C)
            block_forward(cfg, be, p, l, layer_views(a, l), x, self.rope[keys[l]],
                          lambda v: self._attention_forward(l, v), self._norm_after(l))
        be.matmul_forward(a.logits, a.lnf, self._classifier()[0], None)
        if cfg.final_softcap:                                       # in place: the backward
            be.softcap_forward(a.logits, a.logits, cfg.final_softcap)   # reads the output
        if self.targets is None:
            self.mean_loss = None
            return None
        self._crossentropy()
        self.mean_loss = float(a.losses.mean())
        return self.mean_loss

    def backward(self, layer_done=None, scale=1.0):
        """Accumulates d(scale * mean loss)/d(params) into self.grads, as GPT2.backward (call
        zero_grad first; layer_done(l) as soon as layer l's gradients are complete)."""
        d, dl = start_backward(self, grad_activation_shapes, STATS, scale)
        be, cfg, p, g, a = self.backend, self.config, self.params, self.grads, self.acts
        L = cfg.num_layers

        dlogits = self._crossentropy(backward=True)
        if cfg.final_softcap:
            be.softcap_backward(d.logits_raw, dlogits, a.logits, cfg.final_softcap)
            dlogits = d.logits_raw
        W, dW = self._classifier()
        be.matmul_backward(d.lnf, dW, None, dlogits, a.lnf, W)
        last = a.residual3[L - 1] if L else a.encoded
        be.rmsnorm_backward(d.residual, g.lnfw, d.lnf, last, p.lnfw, a.lnf_rstd,
                            cfg.norm_offset)
        keys = rope_keys(cfg)
        for l in reversed(range(L)):
            x = a.encoded if l == 0 else a.residual3[l - 1]     # (B,T,C)
            if self.writes_grads:
                for name, t in dl.items():
                    if name not in WRITTEN:
                        t[...] = 0
            else:
                dl.buf[:] = 0
            self._block_backward(l, layer_views(a, l), dl, x, self.rope[keys[l]])
            # now d.residual holds d(residual3[l-1]), or d(encoded) after the first layer
            if layer_done:
                layer_done(l)
        be.embedding_backward(g.wte, d.residual, self.inputs, self.embed_scale)

    def _block_backward(self, l, v, dl, x, rope):
        """block_forward's ops in reverse, for layer l; d.residual holds d(residual3[l]) on
        entry and d(x) on return."""
        be, cfg, p, g = self.backend, self.config, self.params, self.grads
        NH, NKV, hd, off = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_offset
        QK = (NH + NKV) * hd
        dres = self.grad_acts.residual
        dout = dres                                             # d(MLP's output)
        if cfg.post_norms:
            be.rmsnorm_backward(dl.fcproj, g.fcpostw[l], dres, v.fcproj, p.fcpostw[l],
                                v.fcpost_rstd, off)
            dout = dl.fcproj
        be.matmul_backward(dl.act, g.fcprojw[l], None, dout, v.act, p.fcprojw[l])
        glu = be.swiglu_backward if cfg.mlp_act == "silu" else be.geglu_backward
        glu(dl.fch, dl.act, v.fch)
        be.matmul_backward(dl.ln2, g.fcw[l], None, dl.fch, v.ln2, p.fcw[l])
        be.rmsnorm_backward(dres, g.ln2w[l], dl.ln2, v.residual2, p.ln2w[l], v.ln2_rstd, off)
        # now dres holds d(residual2[l]): the gradient of attention's output too
        dout = dres
        if cfg.post_norms:
            be.rmsnorm_backward(dl.attproj, g.attpostw[l], dres, v.attproj, p.attpostw[l],
                                v.attpost_rstd, off)
            dout = dl.attproj
        be.matmul_backward(dl.atty, g.attprojw[l], None, dout, v.atty, p.attprojw[l])
        self._attention_backward(l, v, dl)
        dqk, dturned = heads(dl.qkv_raw, hd, NH + NKV), heads(dl.qkv, hd, NH + NKV)
        if cfg.qk_norm:
            qk = heads(v.qkv_raw, hd, NH + NKV)
            for (h, _, rstd, w), (_, dn, _, dw) in zip(qk_norms(cfg, v, p, l),
                                                       qk_norms(cfg, dl, g, l)):
                be.rope_backward(dn, dturned[..., h, :], *rope)
                be.rmsnorm_backward(dqk[..., h, :], dw, dn, qk[..., h, :], w, rstd, off)
        else:
            be.rope_backward(dqk, dturned, *rope)
        dl.qkv_raw[..., QK:] = dl.qkv[..., QK:]                 # v was not turned
        be.matmul_backward(dl.ln1, g.qkvw[l], g.qkvb[l] if cfg.qkv_bias else None,
                           dl.qkv_raw, v.ln1, p.qkvw[l])
        be.rmsnorm_backward(dres, g.ln1w[l], dl.ln1, x, p.ln1w[l], v.ln1_rstd, off)


def init_weights(model, seed=0):
    """From scratch, as GPT-2's init: the 2-D weights N(0, 0.02), the residual projections
    (o_proj, down_proj) N(0, 0.02/sqrt(2L)), biases 0, norms 1 (0 in Gemma's 1 + w form), the
    padded rows of wte and lm_head 0."""
    cfg, p = model.config, model.params
    rng = np.random.default_rng(seed)
    host = np.zeros(len(p), dtype=np.float32)
    h = FlatTensors(param_shapes(cfg), lambda n: host)
    for entry in params_of(cfg):
        view = getattr(h, entry.name)
        if entry.name in ("attprojw", "fcprojw"):
            view[...] = rng.normal(0.0, 0.02 / math.sqrt(2 * max(cfg.num_layers, 1)),
                                   view.shape)
        elif entry.decay:
            view[...] = rng.normal(0.0, 0.02, view.shape)
        elif entry.name != "qkvb":
            view[...] = 1.0 - cfg.norm_offset
    for name in ("wte", "lm_head"):
        if hasattr(h, name):
            getattr(h, name)[cfg.vocab_size:] = 0.0
    load_params(model, host)


# ----------------------------------------------------------------------------- decoding

class Decoder:
    """Runs one position at a time for `rows` sequences with a KV cache, through the same
    block_forward as training, on the host with `ops` (as gpt2.Decoder). The cache keeps NKV
    heads per layer; a sliding layer keeps only its last `window` positions, in a ring (softmax
    does not care in which order its keys come). step(tokens, pos) as gpt2.Decoder.step."""

    def __init__(self, model, max_len, rows=1, ops=None):
        from ..backends import host_ops
        cfg = model.config
        host = model.backend.to_host(model.params.buf)          # (num_params,) float32
        self.params = FlatTensors(param_shapes(cfg), lambda n: host)
        self.ops = ops or host_ops(model.backend)
        self.config, self.embed_scale = cfg, model.embed_scale
        # one position's activations: the model's layout with B = rows, T = 1, one layer
        self.acts = FlatTensors(activation_shapes(cfg, rows, 1, layers=1),
                                lambda n, dtype=np.float32: np.zeros(n, dtype))
        self.v = layer_views(self.acts, 0)
        sizes = [min(cfg.window(l) or max_len, max_len) for l in range(cfg.num_layers)]
        shape = (rows, cfg.num_kv_heads)
        self.keys = [np.zeros(shape + (S, cfg.head_dim), np.float32) for S in sizes]
        self.values = [np.zeros(shape + (S, cfg.head_dim), np.float32) for S in sizes]

    def attend(self, l, pos, v):
        """v.atty: each row's query at `pos` against its cached keys (this one's stored
        first), grouped as the attention op groups them."""
        cfg = self.config
        NH, NKV, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        N, K, V = v.qkv.shape[0], self.keys[l], self.values[l]     # (N,NKV,S,hd)
        slot = pos % K.shape[2]
        qkv = v.qkv[:, 0]                                       # (N,QKV)
        K[:, :, slot] = qkv[:, NH * hd:(NH + NKV) * hd].reshape(N, NKV, hd)
        V[:, :, slot] = qkv[:, (NH + NKV) * hd:].reshape(N, NKV, hd)
        n = min(pos + 1, K.shape[2])                            # cached positions
        q = qkv[:, :NH * hd].reshape(N, NKV, NH // NKV, 1, hd)  # query head h: kv head h//G
        s = (q @ K[:, :, None, :n].swapaxes(-1, -2))[..., 0, :]     # (N,NKV,G,n)
        s *= cfg.attn_scale() or 1.0 / math.sqrt(hd)
        if cfg.attn_softcap:
            self.ops.softcap_forward(s, s, cfg.attn_softcap)
        s -= s.max(axis=-1, keepdims=True)
        np.exp(s, out=s)
        s /= s.sum(axis=-1, keepdims=True)
        v.atty[:, 0] = (s[..., None, :] @ V[:, :, None, :n]).reshape(N, NH * hd)

    def step(self, tokens, pos, logits=True):
        """Run `tokens` (one per row) at position `pos`: the next-token logits (N,V), capped
        as the model's, or None if not wanted (a prompt's tokens only fill the cache)."""
        cfg, p, a, v, ops = self.config, self.params, self.acts, self.v, self.ops
        L, eps, off = cfg.num_layers, cfg.norm_eps, cfg.norm_offset
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)     # (N,1)
        ops.embedding_forward(a.encoded, tokens, p.wte, self.embed_scale)
        norms = [(v.ln1, v.ln1_rstd, p.ln1w[l]) for l in range(L)] + [(a.lnf, a.lnf_rstd,
                                                                       p.lnfw)]
        ops.rmsnorm_forward(*norms[0][:2], a.encoded, norms[0][2], eps, off)
        rope = {k: rope_for(cfg, [pos], k, lambda t: t) for k in set(rope_keys(cfg))}
        x = a.encoded
        for l, key in enumerate(rope_keys(cfg)):
            block_forward(cfg, ops, p, l, v, x, rope[key],
                          lambda v: self.attend(l, pos, v), norms[l + 1])
            x = v.residual3
        if not logits:
            return None
        W = p.wte if cfg.tied_embeddings else p.lm_head
        ops.matmul_forward(a.logits, a.lnf, W, None)
        if cfg.final_softcap:
            ops.softcap_forward(a.logits, a.logits, cfg.final_softcap)
        return a.logits[:, 0, :cfg.vocab_size]
