"""llm.c's llama3 files (the model file and the debug state, as its llama3 branch's
train_llama3.py and train_llama3.cu write and read them) and Hugging Face directories of the
Llama / Gemma family (config.json + safetensors, read with numpy alone).

Model file: a 256 x int32 header (magic 20240803, version 3 = fp32 or 5 = bf16; then maxT, V, L,
NH, n_kv_head, C, multiple_of, use_scaled_rope, major, minor), a 256 x float32 header
(ffn_dim_multiplier, norm_eps, rope_theta), then GPT-2's 16 tensor slots: the biases are zeros
(llm.c's llama3 never reads them: use_biases = false), fcw is [up; gate], the classifier sits in
the wpe slot, and the vocabulary is not padded (llm.c sets Vp = V). llm.c computes F from
multiple_of and ffn_dim_multiplier and hd = C / NH, and keeps q and k in Meta's interleaved rope
layout (each head's channel pairs adjacent); our model keeps HF's rotate-half layout (each head's
first halves, then its second halves), so q's and k's rows are permuted on read and write, as
llm.c's from_pretrained_llama3_hf unpermutes HF's weights.
"""
import json
import os
from dataclasses import dataclass, field

import numpy as np

from .modelfile import BF16, FP32, bf16_to_fp32, fp32_to_bf16
from ..debugstate import DebugState, read_state_body
from ..errors import LlmpyError
from .files import HEADER_BYTES, HEADER_INTS, atomic_write, file_size, make_header, read_header
from .hf import read_config, write_hf_dir
from ..model.llama import (ARCHITECTURES, LlamaConfig, config_from_hf, config_to_hf, llmc_slots,
                    param_shapes, params_from_hf, params_to_hf)
from ..model.layout import GPT2_LAYOUT, FlatTensors

LLAMA_MAGIC = 20240803
STATE_VERSION = 3
FILE_HEADER_BYTES = 2 * HEADER_BYTES          # the int32 header, then the float32 one
# llm.c's llama3 file keeps GPT-2's 16 slots, in GPT-2's order: the decoder's tensors in some
# (llama.llmc_slots), and its biases' slots (zero-initialised in GPT-2's table) unused
BIAS_SLOTS = tuple(p.name for p in GPT2_LAYOUT.params if p.init == "zeros")
# use_scaled_rope = 1: the constants of llm.c's apply_scaling (Llama 3.1's rope scaling)
LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}


@dataclass
class LlmcFields:
    """The header fields LlamaConfig does not hold: with C they give F, and they name the
    Llama version (unused by llm.c). Kept from a file read so that writing it back gives its
    bytes; derived from F for a model that came from anywhere else."""
    multiple_of: int
    ffn_dim_multiplier: float      # a float32 value
    major: int = 3                 # what train_llama3.cu writes
    minor: int = 1


def llmc_ffn_dim(C, multiple_of, ffn_dim_multiplier):
    """F as train_llama3.cu computes it: 4C, times 2/3 (integers), times the multiplier in
    float32 (a float times a size_t is a float product in C) truncated, rounded up to a
    multiple of multiple_of."""
    hidden = 2 * (4 * C) // 3
    hidden = int(np.float32(ffn_dim_multiplier) * np.float32(hidden))
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_fields(C, F, path):
    """multiple_of and ffn_dim_multiplier that give F: multiple_of the largest power of two up
    to llm.c's default 1024 that divides F (or, where float32 cannot get close enough to F,
    F itself), the multiplier the float32 near F / hidden whose product rounds up to F."""
    if F < 1:
        raise LlmpyError(f"{path}: ffn_dim {F}: llm.c's llama3 header cannot express an MLP "
                         "width below 1")
    hidden = 2 * (4 * C) // 3
    for multiple_of in (min(F & -F, 1024), F):
        r = np.float32(F / hidden)
        for _ in range(8):   # F / hidden in float32 is an ulp or two from a product that fits
            p = int(r * np.float32(hidden))
            if F - multiple_of < p <= F:
                return LlmcFields(multiple_of, float(r))
            r = np.nextafter(r, np.float32(np.inf if p <= F - multiple_of else 0))
    raise AssertionError(f"no float32 multiplier for F={F}, hidden={hidden}")


# ----------------------------------------------------------------------------- layouts

def file_shapes(cfg):
    """[(slot, shape)] of llm.c's 16 tensors for this config, in GPT2_LAYOUT's order and with
    its names: no vocab padding, hd = C / NH."""
    V, C, L, F, qkv = cfg.vocab_size, cfg.channels, cfg.num_layers, cfg.ffn_dim, cfg.qkv_dim
    shapes = [(V, C), (V, C), (L, C), (L, C), (L, qkv, C), (L, qkv), (L, C, C), (L, C),
              (L, C), (L, C), (L, 2 * F, C), (L, 2 * F), (L, C, F), (L, C), (C,), (C,)]
    return list(zip(GPT2_LAYOUT.param_names(), shapes, strict=True))


def file_num_params(cfg):
    return sum(int(np.prod(s)) for _, s in file_shapes(cfg))


def _rope_rows(cfg, w, to_meta):
    """w: (L, qkv_dim, C), q, k, v rows -> a copy with q's and k's rows of each head moved
    between HF's rotate-half order (row s*hd/2 + j is pair j's half s) and Meta's interleaved
    order (row 2j + s). v's rows stay."""
    L, hd, C = w.shape[0], cfg.head_dim, w.shape[-1]
    out = w.copy()
    start = 0
    for heads in (cfg.num_heads, cfg.num_kv_heads):
        rows = slice(start, start + heads * hd)
        split = (L, heads, 2, hd // 2, C) if to_meta else (L, heads, hd // 2, 2, C)
        out[:, rows] = w[:, rows].reshape(split).swapaxes(2, 3).reshape(L, heads * hd, C)
        start += heads * hd
    return out


def check_expressible(cfg, path):
    """One line for a model llm.c's llama3 computes differently from ours."""
    reasons = [
        (cfg.qkv_bias, "q, k, v biases (it never reads its bias slots)"),
        (cfg.head_dim * cfg.num_heads != cfg.channels,
         f"head_dim {cfg.head_dim} (it computes C / NH = {cfg.channels / cfg.num_heads:g})"),
        (cfg.mlp_act != "silu", f"the {cfg.mlp_act} MLP (only SwiGLU)"),
        (cfg.norm_offset != 0, "RMSNorm's x * (1 + w)"),
        (cfg.embed_scale, "scaled embeddings"),
        (cfg.post_norms, "norms after attention and the MLP"),
        (cfg.qk_norm, "q and k norms"),
        (cfg.attn_softcap or cfg.final_softcap, "softcaps"),
        (cfg.query_pre_attn_scalar, "query_pre_attn_scalar"),
        ("sliding" in cfg.layer_types, "a sliding window"),
        (cfg.rope_local_theta, "a second rope base"),
        (cfg.rope_scaling is not None and {k: float(cfg.rope_scaling.get(k, np.nan))
                                           for k in LLAMA31_SCALING} != LLAMA31_SCALING,
         f"rope scaling {cfg.rope_scaling} (use_scaled_rope is Llama 3.1's: "
         f"{LLAMA31_SCALING})"),
    ]
    for bad, what in reasons:
        if bad:
            raise LlmpyError(f"{path}: llm.c's llama3 model file cannot express {what}; "
                             f"this {cfg.model_type} model needs a Hugging Face directory")
    try:
        return llmc_slots(cfg)
    except LlmpyError as e:
        raise LlmpyError(f"{path}: {e}") from None


def to_file_layout(cfg, flat, path, grads=False):
    """Flat params (or their gradients) in our layout -> llm.c's 16 slots, flat float32. A tied
    wte fills both its slots (as train_llama3.py writes a tied HF model); a tied wte's gradient
    cannot be split into the two tensors llm.c trains."""
    slots = check_expressible(cfg, path)
    if grads and cfg.tied_embeddings:
        raise LlmpyError(f"{path}: llm.c's llama3 has separate wte and lm_head gradients; a "
                         "tied model's one gradient cannot be split into them")
    ours = FlatTensors(param_shapes(cfg), lambda n: np.asarray(flat, dtype=np.float32))
    out = FlatTensors(file_shapes(cfg), lambda n: np.zeros(n, dtype=np.float32))
    V = cfg.vocab_size
    for name, view in ours.items():
        src = view[:V] if name in ("wte", "lm_head") else view        # drop the padding
        getattr(out, slots[name])[...] = _rope_rows(cfg, src, True) if name == "qkvw" else src
    if cfg.tied_embeddings:
        out.wpe[...] = out.wte
    return out.buf


def from_file_layout(cfg, file_flat, path, grads=False):
    """llm.c's 16 slots, flat -> our layout (wte, lm_head padded to Vp with zero rows). Its
    weights' bias slots must be zeros: llm.c ignores them, so a file with others is not the
    model llm.c computes. For a tied cfg (gradients only: read_llama_model's configs are
    untied), wte's gradient is the sum of the two slots', the chain rule through both uses."""
    f = FlatTensors(file_shapes(cfg), lambda n: np.asarray(file_flat, dtype=np.float32))
    if not grads:
        for slot in BIAS_SLOTS:
            if getattr(f, slot).any():
                raise LlmpyError(f"{path}: {slot} is not zero, but llm.c's llama3 never reads "
                                 "its bias slots (use_biases = false)")
    ours = FlatTensors(param_shapes(cfg), lambda n: np.zeros(n, dtype=np.float32))
    V = cfg.vocab_size
    for name, slot in check_expressible(cfg, path).items():
        src = getattr(f, slot)
        dst = getattr(ours, name)
        dst[:len(src)] = _rope_rows(cfg, src, False) if name == "qkvw" else src
    if cfg.tied_embeddings:
        ours.wte[:V] += f.wpe
    return ours.buf


# ----------------------------------------------------------------------------- model file

def read_llama_header(path):
    """(LlamaConfig, LlmcFields, version) from a llama3 model file's two headers."""
    h = read_header(path, LLAMA_MAGIC, (FP32, BF16), "llama3 model")
    if file_size(path) < FILE_HEADER_BYTES:
        raise LlmpyError(f"{path}: truncated llama3 model file (smaller than its "
                         f"{FILE_HEADER_BYTES}-byte headers)")
    hf = np.fromfile(path, dtype="<f4", count=HEADER_INTS, offset=HEADER_BYTES)
    maxT, V, L, NH, NKV, C, multiple_of, scaled, major, minor = (int(x) for x in h[2:12])
    # the shortest decimals that round to the header's float32s: 1e-05, not 9.99999974738e-06
    multiplier, eps, theta = (float(str(x)) for x in hf[:3])

    def need(ok, what):
        if not ok:
            raise LlmpyError(f"{path}: {what}")
    need(NH > 0 and NKV > 0 and NH % NKV == 0,
         f"n_kv_head {NKV} does not divide n_head {NH}")
    need(C % NH == 0, f"channels {C} are not divisible by n_head {NH}")
    need(scaled in (0, 1), f"use_scaled_rope {scaled} is not 0 or 1")
    need(np.isfinite(eps) and eps > 0, f"norm_eps {eps:g} must be positive")
    need(np.isfinite(theta) and theta > 0, f"rope_theta {theta:g} must be positive")
    F = (llmc_ffn_dim(C, multiple_of, multiplier)
         if multiple_of > 0 and np.isfinite(multiplier) and multiplier > 0 else 0)
    need(F > 0, f"multiple_of {multiple_of} and ffn_dim_multiplier {multiplier:g} give no "
                f"MLP width F for C={C}")
    try:
        cfg = LlamaConfig(max_seq_len=maxT, vocab_size=V, num_layers=L, num_heads=NH,
                          num_kv_heads=NKV, channels=C, ffn_dim=F, norm_eps=eps,
                          rope_theta=theta, rope_scaling=dict(LLAMA31_SCALING) if scaled else None,
                          tied_embeddings=False, model_type="llama")
    except LlmpyError as e:
        raise LlmpyError(f"{path}: inconsistent llama3 model header: {e}") from None
    return cfg, LlmcFields(multiple_of, multiplier, major, minor), int(h[1])


def read_llama_model(path):
    """(LlamaConfig, flat float32 params in our layout, LlmcFields) from a llama3 model file.
    Its classifier is its own tensor (tied_embeddings False), as llm.c trains it, even where
    the file holds a tied model's two equal copies."""
    cfg, fields, version = read_llama_header(path)
    n = file_num_params(cfg)
    itemsize = 4 if version == FP32 else 2
    expected = FILE_HEADER_BYTES + n * itemsize
    size = file_size(path)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise LlmpyError(f"{path}: llama3 model file {what}: {size} bytes, expected {expected} "
                         f"for L={cfg.num_layers} NH={cfg.num_heads} NKV={cfg.num_kv_heads} "
                         f"C={cfg.channels} F={cfg.ffn_dim} V={cfg.vocab_size}")
    if version == FP32:
        body = np.fromfile(path, dtype="<f4", offset=FILE_HEADER_BYTES, count=n)
    else:
        body = bf16_to_fp32(np.fromfile(path, dtype="<u2", offset=FILE_HEADER_BYTES, count=n))
    return cfg, from_file_layout(cfg, body, path), fields


def write_llama_model(path, cfg, params, version=FP32, fields=None):
    """Write flat params (our layout) as a llama3 model file, fp32 (3) or bf16 (5), atomically.
    fields: a read file's (its bytes back), or None to derive them from F."""
    body = to_file_layout(cfg, params, path)
    fields = fields or ffn_fields(cfg.channels, cfg.ffn_dim, path)
    if llmc_ffn_dim(cfg.channels, fields.multiple_of, fields.ffn_dim_multiplier) != cfg.ffn_dim:
        raise LlmpyError(f"{path}: multiple_of {fields.multiple_of} and ffn_dim_multiplier "
                         f"{fields.ffn_dim_multiplier:g} do not give the model's F {cfg.ffn_dim}")
    ints = make_header(LLAMA_MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers,
                       cfg.num_heads, cfg.num_kv_heads, cfg.channels, fields.multiple_of,
                       int(cfg.rope_scaling is not None), fields.major, fields.minor)
    floats = np.zeros(HEADER_INTS, dtype="<f4")
    floats[:3] = fields.ffn_dim_multiplier, cfg.norm_eps, cfg.rope_theta
    body = body.astype("<f4") if version == FP32 else fp32_to_bf16(body).astype("<u2")
    atomic_write(path, [ints, floats, body])


# ----------------------------------------------------------------------------- debug state

@dataclass
class LlamaDebugState(DebugState):
    """llm.c's llama3 debug state: DebugState's batch, logits, loss and gradients (in our
    layout here), and the per-step losses and gradient norms write_training_history appends."""
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    norms: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))


def read_llama_debug_state(path, cfg):
    """File: a 256 x int32 header (magic 20240803, version 3, B, T, steps at [4]), x and y
    int32 (B,T), logits float32 (B,T,V), loss float32, the gradients in the model file's slots
    (float32), then `steps` losses and `steps` gradient norms (float32)."""
    h = read_header(path, LLAMA_MAGIC, (STATE_VERSION,), "llama3 debug state")
    B, T, steps, V = int(h[2]), int(h[3]), int(h[4]), cfg.vocab_size
    if B < 1 or not 1 <= T <= cfg.max_seq_len or steps < 0:
        raise LlmpyError(f"{path}: debug state header has B={B} T={T} steps={steps}; need "
                         f"B >= 1, 1 <= T <= the model's max_seq_len {cfg.max_seq_len}, "
                         "steps >= 0")
    N = file_num_params(cfg)
    s, history = read_state_body(path, B, T, V, N, "llama3 debug state",
                                 f"B={B} T={T} steps={steps} and this model's V={V} and "
                                 f"{N:,} parameters in llm.c's slots", extra=2 * steps)
    return LlamaDebugState(s.x, s.y, s.logits, s.loss,
                           from_file_layout(cfg, s.grads, path, grads=True),
                           history[:steps], history[steps:])


def write_llama_debug_state(path, cfg, state):
    B, T = state.x.shape
    losses = np.asarray(state.losses, dtype="<f4")
    norms = np.asarray(state.norms, dtype="<f4")
    if losses.shape != norms.shape or losses.ndim != 1:
        raise LlmpyError(f"{path}: {losses.size} losses and {norms.size} gradient norms; the "
                         "debug state holds one of each per step")
    atomic_write(path, [make_header(LLAMA_MAGIC, STATE_VERSION, B, T, losses.size),
                        state.x.astype("<i4"), state.y.astype("<i4"),
                        state.logits.astype("<f4"), np.array([state.loss], "<f4"),
                        to_file_layout(cfg, state.grads, path, grads=True).astype("<f4"),
                        losses, norms])


# ----------------------------------------------------------------------------- safetensors

SAFETENSORS_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}
WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def read_safetensors(path):
    """{name: float32 array} of a .safetensors file, with numpy alone (safetensors' numpy API
    has no bfloat16, the dtype these models ship in). File: a little-endian uint64 n, n bytes of
    JSON {name: {dtype, shape, data_offsets: [begin, end)}}, then the data."""
    size = file_size(path)
    try:
        with open(path, "rb") as f:
            n = int(np.frombuffer(f.read(8), "<u8")[0]) if size >= 8 else -1
            if not 0 < n <= size - 8:
                raise LlmpyError(f"{path}: not a safetensors file (its header length is "
                                 f"{n if n >= 0 else 'missing'}, the file has {size} bytes)")
            header = json.loads(f.read(n))
    except (ValueError, UnicodeDecodeError) as e:
        raise LlmpyError(f"{path}: not a safetensors file: its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise LlmpyError(f"{path}: not a safetensors file: its header is not a JSON object")
    header.pop("__metadata__", None)
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else \
        np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise LlmpyError(f"{path}: tensor {name}: no dtype, shape and data_offsets") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise LlmpyError(f"{path}: tensor {name} is {dtype}; supported: "
                             f"{', '.join(SAFETENSORS_DTYPES)}")
        np_dtype = np.dtype(SAFETENSORS_DTYPES[dtype])
        if not 0 <= begin <= end <= data.size or end - begin != np_dtype.itemsize * int(
                np.prod(shape)):
            raise LlmpyError(f"{path}: tensor {name}: bytes [{begin}, {end}) do not hold "
                             f"{dtype} {list(shape)} within the file's {data.size} data bytes")
        t = data[begin:end].view(np_dtype).reshape(shape)
        tensors[name] = bf16_to_fp32(t) if dtype == "BF16" else t.astype(np.float32)
    return tensors


# ----------------------------------------------------------------------------- HF dirs

def read_llama_hf(src):
    """(LlamaConfig, flat float32 params) from a Hugging Face directory of a Llama, Mistral,
    Qwen2, Gemma, Gemma 2 or Gemma 3 (text) model: config.json and model.safetensors, or the
    shards model.safetensors.index.json names."""
    if not os.path.isdir(src):
        raise LlmpyError(f"{src}: no such directory" if not os.path.exists(src) else
                         f"{src}: not a Hugging Face model directory")
    config_path = os.path.join(src, "config.json")
    c = read_config(config_path)
    cfg = config_from_hf(c, config_path)
    arch = c.get("architectures") or [ARCHITECTURES[cfg.model_type]]
    if arch != [ARCHITECTURES[cfg.model_type]]:
        raise LlmpyError(f"{config_path}: architectures {arch} is not supported (a "
                         f"{cfg.model_type} model reads as {ARCHITECTURES[cfg.model_type]})")
    index = os.path.join(src, WEIGHTS_INDEX)
    if os.path.exists(os.path.join(src, WEIGHTS)):
        files = [os.path.join(src, WEIGHTS)]
    elif os.path.exists(index):
        weight_map = read_config(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LlmpyError(f"{index}: no weight_map object")
        files = [os.path.join(src, f) for f in sorted(set(weight_map.values()))]
    else:
        raise LlmpyError(f"{src}: no {WEIGHTS} or {WEIGHTS_INDEX}")
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(f))
    return cfg, params_from_hf(cfg, tensors, files[0] if len(files) == 1 else index)


def write_llama_hf(out_dir, cfg, params):
    """A directory (config.json, model.safetensors) that transformers'
    AutoModelForCausalLM.from_pretrained(out_dir) loads as the same model."""
    try:
        config = config_to_hf(cfg)
    except LlmpyError as e:
        raise LlmpyError(f"{out_dir}: {e}") from None
    write_hf_dir(out_dir, config, params_to_hf(cfg, params))
