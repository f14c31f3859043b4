"""A run's settings (TrainConfig, EvalConfig), the flags built from them, and every check of
them: bounds, the run directory's saved flags (restore_flags), the embedded default."""
import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field, fields

from ..data.loader import bundled_data, expand_files
from ..errors import LlmpyError
from ..io.files import ensure_dir
from ..model.build import DECODER_PRESETS, EMBEDDED_PRESETS, PRESETS, PRETRAINED
from ..model.gpt2 import memory as gpt2_memory
from ..model.layout import GPT2_LAYOUT, GPT2Config
from . import checkpoints
from .optim import SCHEDULES, state_bytes
from .report import embedded_run_dir


BACKEND_HELP = ("compute backend: numpy, cpu, gpu, or auto (cpu when numba and scipy are "
                "installed, else numpy)")


def _f(default, help, **bounds):
    """A field with its --help text and the bounds check_fields enforces: least=x (>= x),
    above=x (> x), below=x (< x); required=True makes the flag required."""
    return field(default=default, metadata={"help": help, **bounds})


MODEL_HELP = ("an llm.c model .bin (GPT-2's or llama3's), a Hugging Face model directory or hub "
              "name (GPT-2, Llama, Mistral, Qwen2, Gemma, Gemma 2, Gemma 3), a run directory "
              "(the weights of its newest checkpoint), OpenAI's GPT-2 by name ("
              + ", ".join(PRETRAINED) + "), or a from-scratch preset: "
              + ", ".join(PRESETS + DECODER_PRESETS) + " (random weights)")


@dataclass
class TrainConfig:
    """Defaults mirror llm.c's CPU demo (train_gpt2.c): B=4, T=64, 40 steps, AdamW lr 1e-4."""
    model: str = _f("", MODEL_HELP + " (default: the embedded default, see above)")
    train_data: str = _f("", "token .bin file, a quoted glob of shards, or `shakespeare`: the "
                         "bundled corpus (llm.c's Tiny Shakespeare split)")
    val_data: str = _f("", "token .bin file, a quoted glob of shards, or `shakespeare`")
    batch_size: int = _f(4, "micro-batch size B", least=1)
    seq_len: int = _f(64, "sequence length T", least=1)
    steps: int = _f(40, "number of optimizer steps", least=0)
    total_batch_size: int = _f(0, "tokens per optimizer step, a multiple of B*T; gradients "
                               "accumulate over that many micro-batches (0: B*T)", least=0)
    lr: float = _f(1e-4, "AdamW learning rate", least=0)
    lr_schedule: str = _f("cosine", "learning-rate schedule: cosine, linear, constant or wsd")
    warmup_steps: int = _f(0, "steps of linear warmup from 0 to --lr", least=0)
    final_lr_frac: float = _f(1.0, "the schedule decays to lr * this (1.0: no decay)", least=0)
    beta1: float = _f(0.9, "AdamW beta1", least=0, below=1)
    beta2: float = _f(0.999, "AdamW beta2", least=0, below=1)
    eps: float = _f(1e-8, "AdamW epsilon", above=0)
    weight_decay: float = _f(0.0, "AdamW decoupled weight decay, on the 2-D weights only",
                             least=0)
    # Off by default like llm.c's CPU train_gpt2.c, so a plain run matches a plain PyTorch AdamW
    # loop step for step; train_gpt2.cu, the embedded default and the README recipes use 1.0.
    grad_clip: float = _f(0.0, "clip the global gradient norm to this, e.g. 1.0 as llm.c's "
                          "train_gpt2.cu (0: no clipping; the norm is logged either way)", least=0)
    skip_update_lossz: float = _f(0.0, "skip the update when the loss z-score over the last "
                                  "64 steps exceeds this (0: off)", least=0)
    skip_update_gradz: float = _f(0.0, "skip the update when the grad-norm z-score over the "
                                  "last 64 steps exceeds this (0: off)", least=0)
    overfit_single_batch: bool = _f(False, "debug: train on the first batch over and over")
    # Off by default, unlike llm.c's trainers, so that a plain run reads its data in order as a
    # plain PyTorch loop does, and a data-parallel run reads what one process would (llm.c's
    # ranks each shuffle with their own seed).
    shuffle: bool = _f(False, "shuffle the training windows in llm.c's order (dataloader.h: "
                       "an mt19937 seeded --shuffle-seed + rank), so that --model gpt2 -b 4 "
                       "-t 64 on llm.c's data gives train_gpt2.c's losses step for step")
    shuffle_seed: int = _f(42, "seed of --shuffle's order (llm.c's: 42)", least=0)
    seed: int = _f(1337, "seed for init and sampling", least=0)
    val_every: int = _f(10, "validate every N steps (0: never)", least=0)
    val_batches: int = _f(5, "batches per validation (0: the whole val split)", least=0)
    sample_every: int = _f(20, "print a sample every N steps (0: never)", least=0)
    sample_tokens: int = _f(64, "tokens per sample")      # >= 1 when sampling: check_flags
    sample_temperature: float = _f(1.0, "sampling temperature (0: greedy)", least=0)
    sample_top_k: int = _f(0, "sample from the k likeliest tokens (0: all)", least=0)
    hellaswag_every: int = _f(0, "HellaSwag accuracy every N steps (0: never)", least=0)
    hellaswag_data: str = _f("hellaswag/hellaswag_val.bin", "HellaSwag eval file, as written by "
                             "`llmpy prepro hellaswag`")
    backend: str = _f("auto", BACKEND_HELP)
    # not given: resolve_recompute_gelu decides, once, before the model is built
    recompute_gelu: bool = _f(False, "keep one layer's GELU output instead of every layer's, "
                              "and recompute it in the backward pass (llm.c's -r 1): 4C fewer "
                              "of the 16C values a layer keeps per position, for one more GELU "
                              "per layer (default: with --backend gpu, on where keeping them "
                              "would not fit in the GPU's memory, and in Triton's interpreter; "
                              "off on the CPU)", auto=True)
    log_jsonl: str = _f("", "write one JSON object per step to this file")
    save: str = _f("", "write the final model to this llm.c .bin")
    run_dir: str = _f("", "run directory: log.jsonl, config.json and checkpoints")
    checkpoint_every: int = _f(0, "checkpoint every N steps into --run-dir (0: never)", least=0)
    keep_last: int = _f(2, "keep the newest K checkpoints (0: all)", least=0)
    major_every: int = _f(0, "never delete the checkpoints at multiples of M steps (0: none)",
                          least=0)
    resume: bool = _f(False, "continue from the newest complete checkpoint in --run-dir; the "
                      "flags not given come from RUN_DIR/config.json, as the run was started")
    # data-parallel over torch.distributed, under torchrun (see distributed.py)
    dist: bool = _f(False, "join a torch.distributed process group even when WORLD_SIZE is 1 "
                    "(it always does when WORLD_SIZE > 1)")
    zero: int = _f(0, "ZeRO stage: 1 shards AdamW's state across the ranks (0: off)")
    dist_timeout: float = _f(600.0, "seconds a collective waits for the other ranks before "
                             "the run stops with an error; longer than rank 0's evals, samples "
                             "and checkpoints", above=0)
    dist_check_every: int = _f(0, "debug: check every N steps that the parameters are "
                               "identical on every rank (0: never)", least=0)


@dataclass
class EvalConfig:
    """`llmpy eval`: a model's loss on token files and its HellaSwag accuracy. B and T default
    to training's, so a run's val loss comes out as its log has it; pass -t 1024 to score GPT-2
    over its whole context."""
    model: str = _f("", "an llm.c model .bin, a Hugging Face model directory, OpenAI's GPT-2 "
                    "from the Hugging Face hub (" + ", ".join(PRETRAINED) + "), or a run "
                    "directory: its newest checkpoint, and the run's --val-data, -b, -t and "
                    "--backend unless given, and its --val-batches unless --val-data, -b or -t is "
                    "given (so that its last val loss comes out as its log has it)",
                    required=True)
    val_data: str = _f("", "token .bin file, a quoted glob of shards, or `shakespeare` (default: "
                       "the bundled Shakespeare val, unless only --hellaswag-data is given)")
    val_batches: int = _f(0, "batches to evaluate (0: every B*T window of the data, once)",
                          least=0)
    hellaswag_data: str = _f("", "HellaSwag eval file, as written by `llmpy prepro hellaswag` "
                             "(default: none)")
    batch_size: int = _f(4, "batch size B", least=1)
    seq_len: int = _f(64, "sequence length T", least=1)
    backend: str = _f("auto", BACKEND_HELP)
    json: bool = _f(False, "print the results as one JSON object")


# What the embedded default changes, for every field the user did not set on the command line:
# a from-scratch model needs a larger learning rate and more steps than a GPT-2 fine-tune.
EMBEDDED_DEFAULT = dict(model="tiny", batch_size=8, steps=500, lr=2e-3, warmup_steps=30,
                        final_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, shuffle=True,
                        val_every=250, val_batches=0, sample_every=500, sample_tokens=96,
                        sample_temperature=0.8, sample_top_k=40, checkpoint_every=250)


def add_arguments(parser, cls, short=None):
    """One --flag per dataclass field; defaults are None so callers can tell what was given."""
    short = short or {}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        names = [short[f.name], flag] if f.name in short else [flag]
        help = f.metadata.get("help", "")
        if f.default not in ("", None) and not f.metadata.get("auto"):
            help += f" (default: {f.default})"
        if f.type in (bool, "bool"):
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            parser.add_argument(*names, dest=f.name, type=typ, default=None, help=help,
                                required=f.metadata.get("required", False))


def check_range(name, value, least=None, above=None, below=None):
    """One line naming the flag --name, for a NaN or inf, or a value out of its bounds."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, float) and not math.isfinite(value):
        raise LlmpyError(f"{flag} must be a finite number (got {value})")
    if least is not None and value < least:
        raise LlmpyError(f"{flag} must be at least {least} (got {value})")
    if above is not None and value <= above:
        raise LlmpyError(f"{flag} must be greater than {above} (got {value})")
    if below is not None and value >= below:
        raise LlmpyError(f"{flag} must be less than {below} (got {value})")


def check_fields(cfg):
    """check_range on every field of a config dataclass, with the bounds its metadata gives,
    so that a bad flag fails before any work."""
    for f in fields(cfg):
        bounds = {k: f.metadata[k] for k in ("least", "above", "below") if k in f.metadata}
        check_range(f.name, getattr(cfg, f.name), **bounds)


def require_positive(cfg, *names):
    """One line naming the flag, for a field that must be at least 1 (B, T, ...)."""
    for name in names:
        check_range(name, getattr(cfg, name), least=1)


def check_seq_len(T, cfg, flag="--seq-len"):
    """One line, before any work, when T does not fit in the model's context."""
    if T > cfg.max_seq_len:
        raise LlmpyError(f"{flag} {T} exceeds the model's max_seq_len {cfg.max_seq_len}")


def from_arguments(cls, args):
    """(config, names of the fields given on the command line)."""
    given = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name) is not None}
    return cls(**given), set(given)


# Corpora shipped in the package, by the short name --train-data / --val-data take: the
# bundled Shakespeare is tokenized as llm.c's tinyshakespeare.py splits it (data/prepro).
BUNDLED = {"shakespeare": "shakespeare_{split}.bin"}


def data_path(name, split):
    """A --train-data / --val-data value as the path it means, checked to exist before any
    model is built or downloaded (the files themselves are read later, where their problems
    are named): a bundled corpus's short name (unless a file of that name is here) is its file
    of that split; "" stays "" (none)."""
    if name in BUNDLED and not os.path.exists(name):
        return bundled_data(BUNDLED[name].format(split=split))
    if name:
        expand_files(name)
    return name


def check_inputs(cfg):
    """Every local input file of a training run exists (data_path)."""
    cfg.train_data = data_path(cfg.train_data, "train")
    cfg.val_data = data_path(cfg.val_data, "val")
    check_exists(cfg.hellaswag_data if cfg.hellaswag_every else "")


def check_exists(path):
    if path and not os.path.exists(path):
        raise LlmpyError(f"{path}: no such file")


def is_embedded(cfg):
    """Whether cfg asks for the embedded default: no --train-data, and no --model or a small
    from-scratch preset. It makes its own run directory."""
    return not cfg.train_data and cfg.model in ("", *EMBEDDED_PRESETS)


def apply_embedded_default(cfg, explicit):
    """No model and no data: train a small model from scratch on the bundled Shakespeare, into
    a new run directory (runs/shakespeare-DATE-TIME) unless --run-dir is given."""
    for k, v in EMBEDDED_DEFAULT.items():
        if k not in explicit:
            setattr(cfg, k, v)
    cfg.train_data = bundled_data("shakespeare_train.bin")
    if "val_data" not in explicit:
        cfg.val_data = bundled_data("shakespeare_val.bin")
    if "run_dir" not in explicit:
        cfg.run_dir = embedded_run_dir()


def restore_flags(cfg, explicit, run_dir, names):
    """Each of the fields `names` not given on the command line takes the value the run in
    run_dir was started with (its config.json): so `llmpy train --run-dir D --resume` continues
    the same run, and `llmpy eval --model D` scores it on the same data. Adds the names taken
    to `explicit` (a set): they are chosen now. Returns the flags restored, as they would be
    typed."""
    saved = checkpoints.saved_flags(run_dir)
    types = {f.name: f.type for f in dataclasses.fields(cfg)}
    restored = []
    for k in sorted(set(names) & set(saved) - set(explicit)):
        explicit.add(k)
        if saved[k] == getattr(cfg, k):
            continue
        if not valid_value(saved[k], types[k]):
            raise LlmpyError(f"{run_dir}/config.json: {k}: expected "
                             f"{types[k].__name__}, got {saved[k]!r}")
        setattr(cfg, k, saved[k])
        flag = "--" + k.replace("_", "-")
        restored.append(flag if saved[k] is True else f"--no-{flag[2:]}" if saved[k] is False
                        else f"{flag} {saved[k]}")
    return restored


def valid_value(value, typ):
    """Whether a value read from JSON can stand for a TrainConfig field of type typ."""
    if typ is float:
        return type(value) in (int, float)
    return type(value) is typ


def check_flags(cfg):
    """What the flags alone can tell, before any work: each number in TrainConfig's bounds,
    the schedule's name, --save's directory."""
    check_fields(cfg)
    if cfg.sample_every:
        require_positive(cfg, "sample_tokens")
    if cfg.save:                        # fail now, not after the whole run
        ensure_dir(os.path.dirname(os.path.abspath(cfg.save)))
        if os.path.isdir(cfg.save):
            raise LlmpyError(f"{cfg.save}: --save names a directory, not a file")
    if cfg.lr_schedule not in SCHEDULES:
        raise LlmpyError(f"unknown --lr-schedule {cfg.lr_schedule!r} (choose from "
                         f"{', '.join(SCHEDULES)})")
    if (cfg.resume or cfg.checkpoint_every) and not cfg.run_dir and not is_embedded(cfg):
        raise LlmpyError("--resume and --checkpoint-every need a --run-dir")


def grad_accum_steps(cfg, world=1):
    """Micro-batches per optimizer step, on each of `world` data-parallel ranks."""
    tokens = cfg.batch_size * cfg.seq_len * world
    total = cfg.total_batch_size or tokens
    if total % tokens:
        raise LlmpyError(f"--total-batch-size {total} is not a multiple of B*T"
                         + (f"*ranks = {cfg.batch_size}*{cfg.seq_len}*{world}" if world > 1
                            else "") + f" = {tokens}")
    return total // tokens


# Room kept beyond the buffers' own sizes (model.gpt2.memory, optim.state_bytes) before a run
# keeps every GELU output: cuBLAS's workspace, the allocator's rounding, the kernels'
# temporaries (bench/RESULTS.md has what GPT-2 124M took on an H200).
MEMORY_MARGIN = 1.1, 2 ** 30            # (times the plan, plus bytes)


def default_recompute_gelu(need, backend):
    """--recompute-gelu's default, given `need`: the bytes of the model's and AdamW's buffers
    with every layer's GELU output kept. On a GPU: recompute GELU in the backward pass (llm.c's
    -r 1) only where those would not fit in what the GPU has for this process, as keeping them
    saves a GELU a layer (bench/RESULTS.md). On the gpu backend in Triton's interpreter, which
    has no GPU memory to fill: recompute, as llm.c does by default. On the CPU: keep them
    (memory is rarely the limit). Each rank of a distributed run decides for its own GPU; both
    ways give the same numbers."""
    if not backend.caps.fused:            # the CPU backends: llm.c's CPU trainer keeps them
        return False
    available = backend.available_memory()
    if available is None:                 # no device memory to fill: llm.c's CUDA default
        return True
    scale, extra = MEMORY_MARGIN
    return need * scale + extra > available


def resolve_recompute_gelu(cfg, explicit, model_config, backend, dist):
    """cfg.recompute_gelu as given (or restored), else default_recompute_gelu for a GPT-2 of
    model_config at cfg's B and T, with an AdamW over this rank's shard (dist.shard).
    Before the model is built, which sizes its buffers by it; config.json records the result."""
    if "recompute_gelu" in explicit:
        return
    if not isinstance(model_config, GPT2Config):    # the gated MLP has no GELU to keep
        cfg.recompute_gelu = False
        return
    itemsize = backend.zeros(1).itemsize               # of the compute dtype
    need = sum(gpt2_memory(model_config, cfg.batch_size, cfg.seq_len, itemsize,
                           backend.caps.fused, recompute_gelu=False).values())
    shard = dist.shard(GPT2_LAYOUT.num_params(model_config))
    need += state_bytes(shard.stop - shard.start, itemsize)
    cfg.recompute_gelu = default_recompute_gelu(need, backend)
