"""Every way to get a model: a from-scratch preset, an llm.c model file, a Hugging Face
directory or hub name, a run directory's newest checkpoint."""
import os

from ..errors import LlmpyError
from ..io.hf import is_hf_dir, read_hf
from ..io.modelfile import read_model
from .gpt2 import GPT2, init_weights, load_params
from .layout import GPT2Config

# From-scratch shapes, (num_layers, num_heads, channels), as llm.c's train_gpt2.cu names them.
_DEPTHS = {
    "d6": (6, 6, 384), "d12": (12, 12, 768), "d24": (24, 16, 1024),
    "d36": (36, 20, 1280), "d48": (48, 25, 1600),
    # The embedded default: small enough to train on 2 CPU cores in minutes.
    "tiny": (4, 4, 128),
}
PRESETS = tuple(_DEPTHS)
# OpenAI's GPT-2 on the Hugging Face hub, and the preset of its shape: `--model gpt2` means these
# weights, as nanoGPT's init_from="gpt2" and transformers' from_pretrained("gpt2") do.
PRETRAINED = {"gpt2": "d12", "gpt2-medium": "d24", "gpt2-large": "d36", "gpt2-xl": "d48"}


def preset(name, max_seq_len=1024, vocab_size=50257):
    """A model shape by name: a preset (d6, d12, d24, d36, d48, tiny) or a PRETRAINED name."""
    L, NH, C = _DEPTHS[PRETRAINED.get(name, name)]
    return GPT2Config(max_seq_len=max_seq_len, vocab_size=vocab_size,
                      num_layers=L, num_heads=NH, channels=C)


def build_model(spec, backend, seed=0, max_seq_len=1024, recompute_gelu=False):
    """A model from an llm.c .bin path, a Hugging Face model directory (as `llmpy convert`
    writes one), a run directory (its newest checkpoint), OpenAI's GPT-2 by its hub name
    (downloaded once into the Hugging Face cache), or from scratch from a preset name."""
    if spec in PRESETS:
        model = GPT2(preset(spec, max_seq_len=max_seq_len), backend, recompute_gelu)
        init_weights(model, seed)
        return model
    if is_hf_dir(spec) or (spec in PRETRAINED and not os.path.exists(spec)):
        cfg, params = read_hf(spec)
    elif os.path.isdir(spec):
        cfg, params = _newest_weights(spec)
    elif not os.path.exists(spec):
        raise LlmpyError(f"{spec}: no such file or directory, and no model name (presets: "
                         f"{', '.join(PRESETS)}; OpenAI's GPT-2 from the Hugging Face hub: "
                         f"{', '.join(PRETRAINED)})")
    else:
        cfg, params = read_model(spec)
    model = GPT2(cfg, backend, recompute_gelu)
    load_params(model, params)
    return model


def _newest_weights(run_dir):
    # the run directory's format is the trainer's (train/checkpoints.py)
    from ..train.checkpoints import newest_weights
    return newest_weights(run_dir)
