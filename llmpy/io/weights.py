"""The model inside a run checkpoint (train/checkpoints.py's ckpt_XXXXXXXX/ directories).

- GPT-2: `model.bin`, an llm.c model file in float32, which llm.c itself loads.
- The Llama / Gemma decoder: `model/`, a Hugging Face directory: config.json and
  model.safetensors in float32 (io/llama3.py's write_llama_hf), with the tokenizer's
  tokenizer.json and tokenizer_config.json where the model came with them.

Why a Hugging Face directory and not llm.c's llama3 .bin: that file has no slot for what Gemma
adds (the norms after attention and the MLP, QK-norm, softcaps, windows, a head_dim apart from
C/NH, x*(1+w) norms) nor for Qwen2's q,k,v biases, and it cannot say which family a model is; a
config.json says all of it for all six families (Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma
3), and transformers loads the checkpoint as it is. float32 safetensors hold the weights bit for
bit; the vocabulary's padded rows that the directory leaves out are zeros that no gradient ever
reaches, so reading the directory back gives the same flat buffer, and --resume continues
exactly. AdamW's state stays in the flat layout (checkpoints.py), which the config fixes.
"""
import os

import numpy as np

from ..errors import LlmpyError
from ..model.layout import GPT2Config
from .files import atomic_write
from .hf_tokenizer import TOKENIZER_CONFIG, TOKENIZER_JSON
from .modelfile import read_model, write_model

MODEL_BIN, MODEL_DIR = "model.bin", "model"


def write_weights(ckpt, model, params):
    """The model's weights (params: its flat float32 host buffer) into checkpoint directory
    ckpt, in the format of its architecture."""
    cfg = model.config
    if isinstance(cfg, GPT2Config):
        write_model(os.path.join(ckpt, MODEL_BIN), cfg, params)
        return
    from .llama3 import write_llama_hf
    out = os.path.join(ckpt, MODEL_DIR)
    write_llama_hf(out, cfg, params)
    source = getattr(model, "source", None)
    src_dir = source.model_dir if source else None
    for name in (TOKENIZER_JSON, TOKENIZER_CONFIG) if src_dir else ():
        copy_file(os.path.join(src_dir, name), os.path.join(out, name))


def copy_file(src, dst):
    """src's bytes into dst, written atomically, where src exists."""
    if os.path.isfile(src):
        atomic_write(dst, [np.fromfile(src, dtype=np.uint8)])


def weights_dir(ckpt):
    """The decoder checkpoint's HF directory (where its tokenizer is), or None for GPT-2's."""
    d = os.path.join(ckpt, MODEL_DIR)
    return d if os.path.isdir(d) else None


def read_weights(ckpt):
    """(config, flat float32 params) of the model in checkpoint directory ckpt."""
    if os.path.exists(os.path.join(ckpt, MODEL_BIN)):
        return read_model(os.path.join(ckpt, MODEL_BIN))
    if weights_dir(ckpt):
        from .llama3 import read_llama_hf
        return read_llama_hf(weights_dir(ckpt))
    raise LlmpyError(f"{ckpt}: a checkpoint with neither {MODEL_BIN} nor {MODEL_DIR}/")


def file_sizes(directory):
    """{path relative to directory: bytes} of every file under it (a checkpoint's manifest)."""
    sizes = {}
    for d, _, files in os.walk(directory):
        for f in files:
            path = os.path.join(d, f)
            sizes[os.path.relpath(path, directory).replace(os.sep, "/")] = \
                os.path.getsize(path)
    return sizes
