"""Hugging Face GPT-2 <-> llm.c model file.

HF's GPT-2 keeps its linear layers as Conv1D modules whose weight is (in, out), the transpose
of llm.c's (out, in) matmul weight, and names every tensor per layer ("h.3.attn.c_attn.weight");
llm.c stacks the layers into 16 tensors and pads wte to Vp rows. Everything else is a copy.
Reading and writing safetensors needs only numpy; pytorch_model.bin needs torch.
"""
import json
import os
import re

import numpy as np

from ..errors import LlmpyError, first_line, require_finite
from ..model.layout import GPT2_LAYOUT, FlatTensors, GPT2Config
from .files import article, atomic_write, check_output_file, ensure_dir
from .modelfile import BF16, FP32, write_model
from .tokenizer import EOT, EOT_TEXT, GPT2_VOCAB, Tokenizer, load_ranks

# llm.c tensor -> HF tensor name; a name with {} is one tensor per layer ({} = layer index).
HF_NAMES = GPT2_LAYOUT.hf_names()
# stored (in, out) by HF's Conv1D: transpose
CONV1D = {p.name for p in GPT2_LAYOUT.params if p.hf_transposed}
PREFIX = GPT2_LAYOUT.hf_prefix                      # GPT2LMHeadModel's; GPT2Model has none
param_shapes = GPT2_LAYOUT.param_shapes
# Tensors HF checkpoints may carry that are not weights: the causal-mask buffers of old
# checkpoints, and the classifier, which GPT-2 ties to wte.
NOT_WEIGHTS = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
LOCAL_SUFFIXES = (".bin", ".safetensors", ".json")   # a file's name, never a hub model's
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
HF_INDEX = "model.safetensors.index.json"             # sharded weights (io/llama3.py reads them)
# what download() fetches of a hub repository
HUB_FILES = ["config.json", "*.safetensors", HF_INDEX, "tokenizer.json", "tokenizer_config.json"]
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")      # llm.c's GELU is the tanh approximation


def is_hf_dir(path):
    """Whether path is a Hugging Face model directory: one holding its weights file."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                       for f in (*HF_WEIGHTS, HF_INDEX))


# ----------------------------------------------------------------------------- config

def config_from_hf(c, path):
    """llm.py's GPT2Config from an HF config.json dict, refusing what llm.c cannot compute."""
    def need(ok, what):
        if not ok:
            raise LlmpyError(f"{path}: {what}; llm.c's GPT-2 cannot represent this model")
    need(c.get("model_type", "gpt2") == "gpt2", f"model_type is {c.get('model_type')!r}, not 'gpt2'")
    need(c.get("activation_function", "gelu_new") in GELU_TANH,
         f"activation_function is {c.get('activation_function')!r}, not the tanh GELU")
    need(c.get("layer_norm_epsilon", 1e-5) == 1e-5, "layer_norm_epsilon is not 1e-5")
    need(c.get("scale_attn_weights", True), "scale_attn_weights is false")
    need(not c.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx is set")
    need(c.get("tie_word_embeddings", True), "the classifier is not tied to wte")
    try:
        cfg = GPT2Config(max_seq_len=int(c["n_positions"]), vocab_size=int(c["vocab_size"]),
                         num_layers=int(c["n_layer"]), num_heads=int(c["n_head"]),
                         channels=int(c["n_embd"]))
    except KeyError as e:
        raise LlmpyError(f"{path}: config.json has no {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise LlmpyError(f"{path}: bad config.json: {e}") from None
    need(c.get("n_inner") in (None, 4 * cfg.channels), "n_inner is not 4 * n_embd")
    return cfg


def config_to_hf(cfg):
    """The config.json that makes transformers build the same network as llm.c."""
    c = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.max_seq_len, "n_embd": cfg.channels,
        "n_layer": cfg.num_layers, "n_head": cfg.num_heads, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02, "tie_word_embeddings": True, "use_cache": True,
        # llm.c trains without dropout; so does HF's Trainer with these
        "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
    }
    # the GPT-2 tokenizer's <|endoftext|>; None for a smaller vocabulary, which HF would
    # otherwise default to 50256 and warn about
    c["bos_token_id"] = c["eos_token_id"] = 50256 if cfg.vocab_size > 50256 else None
    return c


# ----------------------------------------------------------------------------- weights

def params_from_hf(cfg, tensors, path):
    """HF tensors {name: array} -> flat float32 params in llm.c's layout (wte padded with 0)."""
    tensors = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    p = FlatTensors(param_shapes(cfg), lambda n: np.zeros(n, dtype=np.float32))
    used = set()

    def take(hf_name, shape, transpose):
        if hf_name not in tensors:
            raise LlmpyError(f"{path}: missing tensor {hf_name}")
        t = np.asarray(tensors[hf_name])
        t = t.T if transpose else t
        if t.shape != shape:
            raise LlmpyError(f"{path}: tensor {hf_name} has shape {tuple(tensors[hf_name].shape)}, "
                             f"expected {shape[::-1] if transpose else shape} for this config")
        used.add(hf_name)
        return t

    V = cfg.vocab_size
    for name, view in p.items():
        if name == "wte":
            view[:V] = take(HF_NAMES[name], (V, cfg.channels), False)   # rows V..Vp stay 0
        elif "{}" not in HF_NAMES[name]:
            view[...] = take(HF_NAMES[name], view.shape, False)
        else:
            for l in range(cfg.num_layers):
                view[l] = take(HF_NAMES[name].format(l), view[l].shape, name in CONV1D)
    if "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
            raise LlmpyError(f"{path}: lm_head.weight differs from wte.weight; llm.c ties them")
        used.add("lm_head.weight")
    extra = sorted(k for k in tensors if k not in used and not NOT_WEIGHTS.search(k))
    if extra:
        raise LlmpyError(f"{path}: unexpected tensors for a GPT-2: {', '.join(extra[:5])}")
    return p.buf


def params_to_hf(cfg, flat):
    """Flat llm.c params -> {HF name: contiguous float32 array}, as GPT2LMHeadModel names them."""
    p = FlatTensors(param_shapes(cfg), lambda n: np.asarray(flat, dtype=np.float32))
    out = {}
    for name, view in p.items():
        if name == "wte":
            out[PREFIX + HF_NAMES[name]] = view[:cfg.vocab_size]                # drop padding
        elif "{}" not in HF_NAMES[name]:
            out[PREFIX + HF_NAMES[name]] = view
        else:
            for l in range(cfg.num_layers):
                out[PREFIX + HF_NAMES[name].format(l)] = view[l].T if name in CONV1D else view[l]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


# ----------------------------------------------------------------------------- files

def _read_safetensors(path):
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise LlmpyError(f"{path}: reading safetensors needs safetensors: "
                         "pip install 'llmpy[hf]'") from None
    try:
        tensors = load_file(path)
    except Exception as e:   # the library's own error types vary by version
        raise LlmpyError(f"{path}: cannot read safetensors: {e}") from None
    return {k: v.astype(np.float32) for k, v in tensors.items()}


def _read_pytorch_bin(path):
    try:
        import torch
    except ImportError:
        raise LlmpyError(f"{path}: reading pytorch_model.bin needs PyTorch "
                         "(pip install torch, or use a model.safetensors)") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # a pickle of anything can fail in many ways
        raise LlmpyError(f"{path}: not a file torch.load can read "
                         f"({type(e).__name__}: {first_line(e)})") from None
    if not (isinstance(sd, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                         for k, v in sd.items())):
        raise LlmpyError(f"{path}: not a PyTorch state dict (names -> tensors): "
                         f"{article(type(sd).__name__)}")
    return {k: v.float().numpy() for k, v in sd.items()}


def download(name):
    """A hub model (gpt2, openai-community/gpt2-xl, HuggingFaceTB/SmolLM2-135M, ...) -> its
    local directory: config.json, the safetensors weights (one file or the shards of an index)
    and the tokenizer's files, nothing else the repository holds (other frameworks' weights)."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import logging as hf_logging
    except ImportError:
        raise LlmpyError(f"{name}: downloading from the Hugging Face hub needs huggingface_hub: "
                         "pip install 'llmpy[hf]'") from None
    print(f"downloading {name} from the Hugging Face hub")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()     # a warning per retry; the error below says it all
    try:
        path = snapshot_download(name, allow_patterns=HUB_FILES)
    except Exception as e:   # network, missing repo, gated repo: all the user's to fix
        raise LlmpyError(f"{name}: not a local directory, and the hub download failed: "
                         f"{type(e).__name__}: {first_line(e)}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not is_hf_dir(path):
        raise LlmpyError(f"{name}: the hub repository has no model.safetensors (or its "
                         "shards' index)")
    return path


def read_config(config_path):
    """config.json as a dict; one line for a missing file, bad JSON or a JSON non-object."""
    try:
        with open(config_path, encoding="utf-8") as f:
            c = json.load(f)
    except FileNotFoundError:
        raise LlmpyError(f"{config_path}: no such file") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise LlmpyError(f"{config_path}: not valid JSON: {e}") from None
    if not isinstance(c, dict):
        raise LlmpyError(f"{config_path}: expected a JSON object, got "
                         f"{article(type(c).__name__)}")
    return c


def read_hf(src):
    """(GPT2Config, flat params) from an HF GPT-2 model directory (model/build.py finds it:
    a local one, or a hub name's download)."""
    config_path = os.path.join(src, "config.json")
    cfg = config_from_hf(read_config(config_path), config_path)
    weights = os.path.join(src, HF_WEIGHTS[0])
    if os.path.exists(weights):
        tensors = _read_safetensors(weights)
    elif os.path.exists(os.path.join(src, HF_WEIGHTS[1])):
        weights = os.path.join(src, HF_WEIGHTS[1])
        tensors = _read_pytorch_bin(weights)
    else:
        raise LlmpyError(f"{src}: no {' or '.join(HF_WEIGHTS)}")
    return cfg, params_from_hf(cfg, tensors, weights)


def write_hf_dir(out_dir, config, tensors):
    """config.json (a dict) and model.safetensors ({name: float32 array}) in out_dir, each
    written atomically."""
    try:
        from safetensors.numpy import save
    except ImportError:
        raise LlmpyError(f"{out_dir}: writing safetensors needs safetensors: "
                         "pip install 'llmpy[hf]'") from None
    ensure_dir(out_dir)
    blob = save(tensors, metadata={"format": "pt"})
    atomic_write(os.path.join(out_dir, "model.safetensors"), [np.frombuffer(blob, np.uint8)])
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(os.path.join(out_dir, "config.json"), [np.frombuffer(text.encode(), np.uint8)])


def write_hf(out_dir, cfg, flat):
    """An HF model directory (config.json + model.safetensors) that
    transformers.GPT2LMHeadModel.from_pretrained(out_dir) loads."""
    write_hf_dir(out_dir, config_to_hf(cfg), params_to_hf(cfg, flat))


def write_gpt2_tokenizer(path, cfg):
    """llm.c's tokenizer file for a model with GPT-2's vocabulary (the BPE bundled with llmpy)."""
    tok = Tokenizer()
    if cfg.vocab_size != tok.vocab_size:
        raise LlmpyError(f"{path}: the model's vocab size {cfg.vocab_size} is not GPT-2's "
                         f"{tok.vocab_size}, so its tokenizer is not GPT-2's")
    tok.save(path)
    print(f"wrote {path}")


def byte_chars():
    """GPT-2's byte -> character table for vocab.json and merges.txt (encoder.py's
    bytes_to_unicode): the printable Latin-1 bytes stand for themselves, the other 68 for
    chr(256), chr(257), ... in byte order, so that no token is written with a space or a
    control character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def bpe_merges(ranks):
    """GPT-2's merges, in rank order, from its BPE ranks alone: each token of 2+ bytes is the
    merge of the two parts that byte-pair encoding with only the lower ranks leaves of it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:        # merge the pair of lowest rank (below this token's)
            i = min(range(len(parts) - 1), key=lambda i: ranks.get(parts[i] + parts[i + 1],
                                                                       rank))
            if ranks.get(parts[i] + parts[i + 1], rank) >= rank:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) != 2:
            raise LlmpyError(f"BPE rank {rank}: token {token!r} is not the merge of two "
                             "lower-ranked tokens")
        merges.append(tuple(parts))
    return merges


def write_hf_gpt2_tokenizer(out_dir):
    """GPT-2's tokenizer files as transformers' GPT2Tokenizer reads them (vocab.json,
    merges.txt, tokenizer_config.json), derived from the BPE ranks bundled with llmpy, so that
    AutoTokenizer.from_pretrained(out_dir) encodes as tiktoken's gpt2 does."""
    ranks = load_ranks()
    chars = byte_chars()
    text = lambda b: "".join(chars[x] for x in b)           # noqa: E731
    vocab = {text(b): r for b, r in ranks.items()}
    vocab[EOT_TEXT] = EOT
    merges = "#version: 0.2\n" + "".join(f"{text(a)} {text(b)}\n" for a, b in bpe_merges(ranks))
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": 1024,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
              "add_prefix_space": False, "errors": "replace"}
    for name, body in (("vocab.json", json.dumps(vocab, ensure_ascii=False)),
                       ("merges.txt", merges),
                       ("tokenizer_config.json", json.dumps(config, indent=2) + "\n")):
        atomic_write(os.path.join(out_dir, name), [np.frombuffer(body.encode(), np.uint8)])


def convert(src, out, dtype="fp32", tokenizer=""):
    """An llm.c model file (GPT-2's or llama3's) or a run directory -> an HF directory (a run
    directory -> an llm.c file where OUT ends in .bin); an HF directory or hub name -> an llm.c
    model file (and, optionally, llm.c's GPT-2 tokenizer file). The Llama / Gemma family's HF
    directories get the source's tokenizer.json where it has one; llm.c's llama3 file holds
    Llama and Mistral, and refuses in one line what it cannot express (Gemma, Qwen2)."""
    from ..model.build import is_model_dir, load_weights
    from ..model.layout import GPT2Config
    from .llama3 import check_expressible, write_llama_hf, write_llama_model
    from .weights import copy_file
    from .hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON
    run_dir = os.path.isdir(src) and not is_model_dir(src)
    if os.path.isfile(src) or (run_dir and not out.endswith(".bin")):
        if tokenizer:
            raise LlmpyError(f"{tokenizer}: --tokenizer writes llm.c's tokenizer file, for a "
                             "conversion to an llm.c .bin")
        if dtype != "fp32":
            raise LlmpyError(f"--dtype {dtype}: applies to a conversion to an llm.c .bin; "
                             "the HF model.safetensors is written in fp32")
        cfg, flat, source = load_weights(src)
        require_finite(flat, f"{src}: the weights")
        if isinstance(cfg, GPT2Config):
            write_hf(out, cfg, flat)
        else:
            write_llama_hf(out, cfg, flat)
        own = source.tokenizer_path()
        if own:
            for name in (TOKENIZER_JSON, TOKENIZER_CONFIG):
                copy_file(os.path.join(source.model_dir, name), os.path.join(out, name))
        elif cfg.vocab_size == GPT2_VOCAB:        # GPT-2's ids: its tokenizer, for transformers
            write_hf_gpt2_tokenizer(out)
        written = ", ".join(sorted(os.listdir(out)))
        print(f"wrote {out}/ ({written}) from {source.checkpoint or src}"
              + ("" if own or cfg.vocab_size == GPT2_VOCAB else
                 f": no tokenizer files, as the source has no tokenizer.json and its vocabulary "
                 f"of {cfg.vocab_size:,} tokens is not GPT-2's"))
        return
    for path in filter(None, (out, tokenizer)):     # before a download, or half the output
        check_output_file(path)
    cfg, flat, _ = load_weights(src)
    require_finite(flat, f"{src}: the weights")
    version = {"fp32": FP32, "bf16": BF16}[dtype]
    if not isinstance(cfg, GPT2Config):
        check_expressible(cfg, src)                 # before the tokenizer file too
    if tokenizer:
        write_gpt2_tokenizer(tokenizer, cfg)
    if isinstance(cfg, GPT2Config):
        write_model(out, cfg, flat, version=version)
        print(f"wrote {out}: {dtype}, L={cfg.num_layers} NH={cfg.num_heads} C={cfg.channels} "
              f"V={cfg.vocab_size} Vp={cfg.padded_vocab_size} maxT={cfg.max_seq_len}")
        return
    write_llama_model(out, cfg, flat, version=version)
    print(f"wrote {out}: llm.c llama3 {dtype}, L={cfg.num_layers} NH={cfg.num_heads} "
          f"NKV={cfg.num_kv_heads} C={cfg.channels} F={cfg.ffn_dim} V={cfg.vocab_size} "
          f"maxT={cfg.max_seq_len}")
