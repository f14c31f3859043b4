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
from dataclasses import dataclass

import numpy as np

from .config import pad_vocab
from .errors import LlmpyError
from .model import FlatTensors


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


def _hf_slots(cfg, p):
    """(table entry, our view in p, its HF names) for every tensor: one per layer for the
    stacked ones."""
    for entry in params_of(cfg):
        view = getattr(p, entry.name)
        if "{}" in entry.hf[0]:
            for l in range(cfg.num_layers):
                yield entry, view[l], [n.format(l) for n in entry.hf]
        else:
            yield entry, view, list(entry.hf)


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
        c["query_pre_attn_scalar"] = cfg.query_pre_attn_scalar or cfg.head_dim
        c["attn_logit_softcapping"] = cfg.attn_softcap or None
        c["final_logit_softcapping"] = cfg.final_softcap or None
    return c
