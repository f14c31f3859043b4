"""Every way to get a model: a from-scratch preset, an llm.c model file (GPT-2's or llama3's),
a Hugging Face directory or hub name (GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3), a
run directory's newest checkpoint. Also what each model brings with it: its tokenizer, its
FLOP count, and where its weights go at the end of a run."""
import os
from dataclasses import dataclass

from ..errors import LlmpyError
from ..io import hf
from ..io.hf import HUB_ID, LOCAL_SUFFIXES, is_hf_dir, read_config, read_hf
from ..io.hf_tokenizer import TOKENIZER_JSON
from ..io.modelfile import read_model, write_model
from ..io.tokenizer import GPT2_VOCAB, Tokenizer
from . import llama
from .gpt2 import GPT2, init_weights, load_params
from .gpt2 import flops_per_token as gpt2_flops
from .layout import GPT2Config

# From-scratch shapes, (num_layers, num_heads, channels), as llm.c's train_gpt2.cu names them.
_DEPTHS = {
    "d6": (6, 6, 384), "d12": (12, 12, 768), "d24": (24, 16, 1024),
    "d36": (36, 20, 1280), "d48": (48, 25, 1600),
    # The embedded default: small enough to train on 2 CPU cores in minutes.
    "tiny": (4, 4, 128),
}
PRESETS = tuple(_DEPTHS)
# The Llama / Gemma decoder's from-scratch shapes (model/llama.py's PRESETS)
DECODER_PRESETS = tuple(llama.PRESETS)
# From-scratch presets that train on the bundled Shakespeare when no --train-data is given:
# GPT-2's vocabulary (the bundled tokens') and small enough for 2 CPU cores.
EMBEDDED_PRESETS = ("tiny", "llama-tiny")
# OpenAI's GPT-2 on the Hugging Face hub, and the preset of its shape: `--model gpt2` means these
# weights, as nanoGPT's init_from="gpt2" and transformers' from_pretrained("gpt2") do.
PRETRAINED = {"gpt2": "d12", "gpt2-medium": "d24", "gpt2-large": "d36", "gpt2-xl": "d48"}
GPT2_MAGIC, LLAMA_MAGIC = 20240326, 20240803       # io/modelfile.py's and io/llama3.py's


def preset(name, max_seq_len=1024, vocab_size=50257):
    """A model shape by name: a preset (d6, d12, d24, d36, d48, tiny) or a PRETRAINED name; or
    a decoder preset (llama-tiny, smollm2-135m, gemma3-270m) as model/llama.py defines it."""
    if name in DECODER_PRESETS:
        return llama.preset(name)
    L, NH, C = _DEPTHS[PRETRAINED.get(name, name)]
    return GPT2Config(max_seq_len=max_seq_len, vocab_size=vocab_size,
                      num_layers=L, num_heads=NH, channels=C)


@dataclass
class Source:
    """Where a model came from: what --model said, the directory its tokenizer.json would be in
    (an HF directory, a decoder checkpoint's model/; None for an llm.c file or a preset), and
    the checkpoint directory a run directory resolved to."""
    spec: str
    model_dir: str = None
    checkpoint: str = None

    def tokenizer_path(self):
        """model_dir's tokenizer.json, or None where it has none."""
        if self.model_dir and os.path.isfile(os.path.join(self.model_dir, TOKENIZER_JSON)):
            return os.path.join(self.model_dir, TOKENIZER_JSON)
        return None


def looks_local(spec):
    """Whether spec can only be a local path, so that it never goes to the hub: a file name's
    suffix, no hub id's shape (absolute, ./, ~, backslashes, more than one /), or a first
    component that exists here ("runs/run1" when runs/ does)."""
    if spec.endswith(LOCAL_SUFFIXES) or not HUB_ID.match(spec):
        return True
    return "/" in spec and os.path.exists(spec.split("/")[0])


def is_model_dir(path):
    """Whether path is a Hugging Face model directory (its weights; or a config.json, whose
    problems or missing weights reading it names), not a run directory (whose config.json holds
    the run's flags under "train")."""
    if is_hf_dir(path):
        return True
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        return "train" not in read_config(config)
    except LlmpyError:
        return True


def _hf_dir(path, source):
    """(config, params) of an HF directory: GPT-2 by io/hf.py, the decoder family by
    io/llama3.py, anything else refused in one line."""
    from ..io.llama3 import read_llama_hf
    config_path = os.path.join(path, "config.json")
    model_type = read_config(config_path).get("model_type")
    source.model_dir = path
    if model_type == "gpt2":
        return read_hf(path)
    if model_type not in llama.MODEL_TYPES and model_type != "gemma3":
        raise LlmpyError(f"{config_path}: model_type {model_type!r} is not supported (gpt2, "
                         f"{', '.join(llama.MODEL_TYPES)})")
    return read_llama_hf(path)


def _model_file(path):
    """(config, params) of an llm.c model file, GPT-2's or llama3's, told apart by the magic."""
    from ..io.llama3 import read_llama_model
    try:
        with open(path, "rb") as f:
            magic = int.from_bytes(f.read(4), "little")
    except OSError:
        magic = None                         # read_model says what is wrong, in one line
    if magic == LLAMA_MAGIC:
        return read_llama_model(path)[:2]
    return read_model(path)


def load_weights(spec):
    """(config, flat float32 params, Source) from anything but a preset."""
    source = Source(spec)
    if is_model_dir(spec):
        cfg, params = _hf_dir(spec, source)
    elif os.path.isdir(spec):
        # the trainer's run directory format
        from ..io.weights import weights_dir
        from ..train.checkpoints import newest_checkpoint, newest_weights
        cfg, params = newest_weights(spec)
        source.checkpoint = newest_checkpoint(spec)
        source.model_dir = weights_dir(source.checkpoint)
    elif os.path.exists(spec) or looks_local(spec):
        cfg, params = _model_file(spec)
    elif "/" not in spec and spec not in PRETRAINED:   # the hub's other models have an owner/
        raise LlmpyError(f"{spec}: no such file or directory, and no model name (presets: "
                         f"{', '.join(PRESETS + DECODER_PRESETS)}; from the Hugging Face hub: "
                         f"{', '.join(PRETRAINED)}, or an id such as HuggingFaceTB/SmolLM2-135M)")
    else:                                     # a hub id: downloaded once into the HF cache
        cfg, params = _hf_dir(hf.download(spec), source)
    return cfg, params, source


def model_source(spec, max_seq_len=1024):
    """(config, flat float32 params, Source) of --model spec: from a preset (params None: the
    weights are initialised when the model is built), an llm.c .bin path (GPT-2 or llama3), a
    Hugging Face model directory, a run directory (its newest checkpoint) or a hub name
    (downloaded once into the Hugging Face cache). Read apart from build_model so that train can
    plan memory from the config before it builds anything."""
    if spec in PRESETS or spec in DECODER_PRESETS:
        return preset(spec, max_seq_len=max_seq_len), None, Source(spec)
    return load_weights(spec)


def build_model(spec, backend, seed=0, max_seq_len=1024, recompute_gelu=False, source=None):
    """The model of model_source(spec) (or of `source`, read already), a preset's weights
    initialised from `seed`. model.source says where it came from (Source)."""
    cfg, params, model_from = source or model_source(spec, max_seq_len)
    gpt2 = isinstance(cfg, GPT2Config)
    model = GPT2(cfg, backend, recompute_gelu) if gpt2 else llama.Llama(cfg, backend)
    if params is None:
        (init_weights if gpt2 else llama.init_weights)(model, seed)
    else:
        load_params(model, params)
    model.source = model_from
    return model


def model_config(spec):
    """The config of --model spec without building the model (a preset's without its
    weights)."""
    if spec in PRESETS or spec in DECODER_PRESETS:
        return preset(spec)
    return load_weights(spec)[0]


def flops_per_token(cfg, T):
    """Training FLOPs per token at sequence length T, for either architecture."""
    return gpt2_flops(cfg, T) if isinstance(cfg, GPT2Config) else llama.flops_per_token(cfg, T)


# ----------------------------------------------------------------------------- tokenizers

def model_tokenizer(model):
    """The tokenizer the model's ids mean: tokenizer.json beside its weights (an HF directory,
    a decoder run's checkpoint), else GPT-2's for a model with GPT-2's vocabulary, else None."""
    if isinstance(model, GPT2):
        return Tokenizer()
    source = getattr(model, "source", None)
    path = source.tokenizer_path() if source else None
    if path:
        from ..io.hf_tokenizer import HFTokenizer
        tok = HFTokenizer(path)
        tok.check_vocab(model.config.vocab_size, source.spec)
        return tok
    return Tokenizer() if model.config.vocab_size >= GPT2_VOCAB else None


def require_tokenizer(model, what):
    """model_tokenizer, or one line saying that `what` needs one: a tokenizer whose
    start-of-document token is in the model's vocabulary."""
    tok = model_tokenizer(model)
    if tok is None or tok.eot >= model.config.vocab_size:
        spec = getattr(getattr(model, "source", None), "spec", "the model")
        raise LlmpyError(f"{what}: the vocabulary has {model.config.vocab_size:,} tokens, not "
                         f"GPT-2's {GPT2_VOCAB:,}, and {spec} has no tokenizer.json beside its "
                         "weights: no tokenizer to decode its ids")
    return tok


def has_gpt2_ids(model):
    """Whether the model's token ids are GPT-2's (files tokenized for GPT-2, such as llm.c's
    HellaSwag, mean the same to it): a GPT-2, or a decoder with GPT-2's vocabulary and no
    tokenizer of its own."""
    if isinstance(model, GPT2):
        return True
    source = getattr(model, "source", None)
    return model.config.vocab_size == GPT2_VOCAB and not (source and source.tokenizer_path())


def is_gpt2_tokenizer(tok):
    return isinstance(tok, Tokenizer)


def start_ids(tok, prompt_ids):
    """What generation starts from: GPT-2's prompt as it is, or <|endoftext|> alone without
    one (as llm.c samples); with a Hugging Face tokenizer, the token it puts before every
    document (Llama 3's <|begin_of_text|>), then the prompt, as the training data has it."""
    if is_gpt2_tokenizer(tok):
        return list(prompt_ids) or [tok.eot]
    return [tok.eot] + list(prompt_ids)


# ----------------------------------------------------------------------------- --save

def check_save(path, model):
    """Before a run: one line if --save cannot hold this model (a decoder that llm.c's llama3
    file cannot express, such as Gemma or Qwen2: its run checkpoints hold it instead)."""
    if isinstance(model, llama.Llama):
        from ..io.llama3 import check_expressible
        check_expressible(model.config, path)


def save_model(path, model, params):
    """The final weights as an llm.c model file: GPT-2's, or llama3's for the decoder."""
    if isinstance(model, llama.Llama):
        from ..io.llama3 import write_llama_model
        write_llama_model(path, model.config, params)
    else:
        write_model(path, model.config, params)
