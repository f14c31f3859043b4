"""`llmpy bench gpu`: training throughput on the gpu backend beside PyTorch, in one run, for GPT-2
and for the Llama/Gemma decoder.

Both sides start from the same weights and train on the same batches of the bundled
Shakespeare, with the same step: forward, backward, global-norm clipping to 1.0, AdamW with
weight decay on the 2-D tensors, and the loss read back to the host every step.
- ours: llmpy's model on this backend (bf16, fp32 master weights), train's step (train_step).
- baseline, GPT-2: nanoGPT's recipe: torchref's model with F.scaled_dot_product_attention,
  bf16 autocast, torch.compile, fused torch.optim.AdamW; its vocabulary padded to Vp as nanoGPT
  pads it, so both sides multiply the same classifier shapes.
- baseline, decoder: transformers' own model of the family (LlamaForCausalLM,
  Gemma3ForCausalLM, ...) built from the same config (model.llama.config_to_hf) and loaded with
  the same weights, with SDPA attention, bf16 autocast, torch.compile and fused AdamW; the loss
  is the cross-entropy of its float32-cast logits, as transformers' own loss computes it.
For GPT-2 ours also runs with every layer's GELU output kept (--no-recompute-gelu: 4C more
values a position per layer, one GELU fewer) beside the default of GELU recomputed (llm.c's
-r 1); the report says which of the two train runs by default at this B on this GPU.

Under its power cap a GPU's clock drifts within a run, so the sides are interleaved: blocks of
--block timed steps, one side's then the other's, the order reversed every block, all sides'
models in memory at once. Where they do not fit together, whole runs alternate instead (each
side built alone, twice, in reversed order). Each block pairs with the baseline's block of
the same index: the report gives the tokens/s ratio over all blocks and the min/median/max of
the per-block ratios (the spread that drift and noise leave).

B is the largest of --batch-size at which every side fits (searched downward on running out of
memory). Reported per side: ms/step (mean over the timed steps), tokens/s, MFU, peak memory of
its own; for ours also the host's time to queue a backward pass against the GPU's time to run
it, and one more step op by op (each op synchronised: launch overhead included); for each side,
one more step under torch.profiler: the GPU's own time in each kernel, and where the GPU sat
idle between kernels. MFU counts 6 FLOPs per weight that multiplies per token plus attention's
products (the model's flops_per_token) against the GPU's dense bf16 peak (the backend's
peak_flops(); none for a GPU not in its table). Also: the flash-attention kernels against
F.scaled_dot_product_attention at the model's attention shape, in causal TFLOP/s (the FLOPs a
causal kernel must do: half of the full T*T), the config autotuning chose for each tuned
kernel, and, first, --track-steps steps of ours in bf16 against ours in float32 at a small
shape (TRACK_SHAPE), from the same weights on the same batches: each step's loss within
TRACK_TOL.

--dry-run runs all of it on the CPU in Triton's interpreter at a tiny shape of the same
family (tiny()), without torch.compile (CPU) and without the profiler: for CI to check the
benchmark and bench/gpu_session.sh end to end; its numbers mean nothing.
"""
import dataclasses
import functools
import gc
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from torchref.gpt2 import Block, TorchGPT

from ..backends import get_backend
from ..backends import gpu as gpu_backend
from ..data.loader import DataLoader, bundled_data
from ..errors import LlmpyError, first_line
from ..model import gpt2, llama
from ..model.build import PRESETS as GPT2_PRESETS, preset as gpt2_preset
from ..model.gpt2 import GPT2, load_params
from ..model.layout import GPT2Config
from ..train.checkpoints import git_commit
from ..train.config import default_recompute_gelu
from ..train.optim import AdamW, AdamWConfig
from ..train.step import train_step
from . import OpTimer, op_table

LR, WEIGHT_DECAY, GRAD_CLIP = 6e-4, 0.1, 1.0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (T, batch sizes to try) when not given: GPT-2 124M's of the earlier sessions; the decoders at
# the sequence length they train at
DEFAULTS = {"gpt2": (1024, (64, 32, 16)), "decoder": (2048, (16, 8, 4))}
TRACK_SHAPE, TRACK_TOL = (4, 256), 0.01            # (B, T); the largest |loss difference|
GIB = 2 ** 30


# ----------------------------------------------------------------------------- the model

def family_of(spec):
    """"gpt2" or "decoder" for a GPT-2 preset, a decoder preset or a Hugging Face model
    directory (by its config.json's model_type); one line for anything else."""
    if spec in GPT2_PRESETS:
        return "gpt2"
    if spec in llama.PRESETS:
        return "decoder"
    if os.path.isdir(spec):
        from ..io.hf import read_config
        model_type = read_config(os.path.join(spec, "config.json")).get("model_type")
        return "gpt2" if model_type == "gpt2" else "decoder"
    raise LlmpyError(f"bench gpu: --model {spec}: not a preset ({', '.join(GPT2_PRESETS)}, "
                     f"{', '.join(llama.PRESETS)}) nor a Hugging Face model directory")


def bench_config(spec, seq_len, dry_run=False):
    """(family, config, the initial flat float32 params) for --model: a directory's weights,
    else (and in a dry run, whose shape is tiny()) train's initialisation from seed 0."""
    family = family_of(spec)
    if spec in GPT2_PRESETS:
        cfg = gpt2_preset(spec, max_seq_len=seq_len)
    elif spec in llama.PRESETS:
        cfg = llama.preset(spec)
        cfg = dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len),
                                  padded_vocab_size=0)
    else:
        if family == "gpt2":
            from ..io.hf import read_hf as read
        else:
            from ..io.llama3 import read_llama_hf as read
        cfg, flat = read(spec)
        if cfg.max_seq_len < seq_len:
            raise LlmpyError(f"bench gpu: --seq-len {seq_len} is longer than {spec}'s "
                             f"max_position_embeddings {cfg.max_seq_len}")
        if not dry_run:
            return family, cfg, flat
    if dry_run:
        cfg = tiny(cfg, seq_len)
    return family, cfg, initial_weights(family, cfg)


def tiny(cfg, T):
    """A config of the same family and switches at a shape Triton's interpreter runs in
    seconds (it takes about 0.1 s a kernel launch, whatever the size): one layer of each kind
    the model has (a sliding and a full one for Gemma 3, with a window of T/2), 32 channels, a
    vocabulary of 256 (the data's ids taken modulo it); a decoder keeps its grouping of query
    heads (up to 4 a kv head), its norms and activation."""
    if isinstance(cfg, GPT2Config):
        return GPT2Config(max_seq_len=T, vocab_size=256, num_layers=1, num_heads=2, channels=32)
    kinds = tuple(dict.fromkeys(cfg.layer_types))
    return dataclasses.replace(
        cfg, max_seq_len=max(cfg.max_seq_len, T), vocab_size=256, padded_vocab_size=0,
        num_layers=len(kinds), num_heads=4,
        num_kv_heads=max(1, 4 * cfg.num_kv_heads // cfg.num_heads), channels=32, head_dim=16,
        ffn_dim=64, layer_types=kinds, sliding_window=max(T // 2, 1) if "sliding" in kinds else 0)


def initial_weights(family, cfg, seed=0):
    """From scratch, as train initialises each family: the flat float32 params."""
    host = new_model(family, cfg, get_backend("numpy"))
    (gpt2 if family == "gpt2" else llama).init_weights(host, seed)
    return host.params.buf


def new_model(family, cfg, backend, recompute_gelu=True):
    return GPT2(cfg, backend, recompute_gelu) if family == "gpt2" else llama.Llama(cfg, backend)


def flops_per_token(family, cfg, T):
    return (gpt2 if family == "gpt2" else llama).flops_per_token(cfg, T)


def batches(cfg, B, T, n):
    """n batches of the bundled Shakespeare (GPT-2's token ids, taken modulo a smaller
    vocabulary: the throughput does not depend on which ids)."""
    loader = DataLoader(bundled_data("shakespeare_train.bin"), B, T)
    return [tuple(t % cfg.vocab_size for t in loader.next_batch()) for _ in range(n)]


def ours_optimizer(model):
    decayed = model.layout.decayed() if isinstance(model, GPT2) else model.decayed
    return AdamW(model, AdamWConfig(lr=LR, beta2=0.95, weight_decay=WEIGHT_DECAY),
                 decayed=decayed)


def sync():
    """Wait for the GPU's queued work (nothing to wait for in the interpreter)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def allocated():
    return torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0


def free_memory():
    """Give back what the freed sides held: to the allocator, and torch.compile's graphs
    (their guards keep the baseline's parameters alive)."""
    gc.collect()
    torch._dynamo.reset()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the sides
# A side is make(B, T) -> (step(x, y) -> loss, details(x, y) -> {...}, info {...}): its model
# and optimizer built on the GPU, for the driver (run_at) to warm up, time in blocks and free.

def ours(family, cfg, flat, recompute_gelu=True):
    def make(B, T):
        backend = get_backend("gpu")
        model = new_model(family, cfg, backend, recompute_gelu)
        load_params(model, flat)
        opt = ours_optimizer(model)
        info = {}
        # as train decides; the memory it counts as available is this process's too, so the
        # baseline's, held beside it, does not change the answer
        if family == "gpt2":
            need = sum(model.memory(B, T, recompute_gelu=False).values()) + opt.state_bytes()
            info["train_keeps_gelu"] = not default_recompute_gelu(need, backend)

        def step(x, y):                           # train's step (train/step.py)
            return train_step(model, opt, [(x, y)], grad_clip=GRAD_CLIP).loss
        return step, functools.partial(ours_details, model, opt, step), info
    return make


def ours_details(model, opt, step, x, y):
    """Outside the timings: one step under the profiler (kernel_times); how long the host takes
    to queue a backward pass against how long the GPU takes to run it (a CUDA graph would save
    only the first, and only where it is not hidden behind the second); one more step op by op
    (OpTimer, synchronising around every op: where the time goes); the buffers' planned sizes."""
    kernels, gaps = kernel_times(step, (x, y))
    model.forward(x, y)
    model.zero_grad()
    sync()
    t0 = time.perf_counter()
    model.backward()
    queued = time.perf_counter()
    sync()
    host = {"backward_queue_ms": 1e3 * (queued - t0),
            "backward_ms": 1e3 * (time.perf_counter() - t0)}
    backend = model.backend
    timer = OpTimer(backend, sync=sync)
    model.backend = timer.backend
    sync()
    t0 = time.perf_counter()
    step(x, y)
    sync()
    model.backend = backend
    ops = timer.table(time.perf_counter() - t0)
    planned = sum(model.memory(model.B, model.T).values()) + opt.state_bytes()
    return {"ops": ops, "planned_memory_gib": planned / GIB, "kernels": kernels, "gaps": gaps,
            **host}


def torch_step(compiled, params, opt):
    """The baselines' step: compiled(x, y) -> the loss, under bf16 autocast."""
    def step(x, y):
        x, y = torch.from_numpy(x).to(DEVICE), torch.from_numpy(y).to(DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return step


def torch_side(module):
    """(step, details, info) of a torch module(x, y) -> loss: fused AdamW, weight decay on the
    2-D tensors, torch.compile on a GPU (the interpreter's CPU runs it eagerly)."""
    params = list(module.parameters())
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2],
                              "weight_decay": WEIGHT_DECAY},
                             {"params": [p for p in params if p.dim() < 2],
                              "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.95),
                            fused=DEVICE.type == "cuda")
    # dynamic=False: a retry at a smaller B after running out of memory compiles anew for
    # that B, instead of a slower graph with a symbolic batch dimension
    compiled = torch.compile(module, dynamic=False) if DEVICE.type == "cuda" else module
    step = torch_step(compiled, params, opt)

    def details(x, y):
        kernels, gaps = kernel_times(step, (x, y))
        return {"kernels": kernels, "gaps": gaps}
    return step, details, {}


class SDPABlock(Block):
    """torchref's block with F.scaled_dot_product_attention for attention (nanoGPT's)."""

    def attention(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))


class NanoGPTLoss(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model(x, y)[1]


def nanogpt(cfg, flat):
    def make(B, T):
        padded = GPT2Config(max_seq_len=cfg.max_seq_len, vocab_size=cfg.padded_vocab_size,
                            num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                            channels=cfg.channels)
        model = TorchGPT(padded).load_flat(flat).to(DEVICE)
        for block in model.blocks:              # the same module, with SDPA for attention
            block.__class__ = SDPABlock
        return torch_side(NanoGPTLoss(model))
    return make


class HFLoss(torch.nn.Module):
    """A transformers *ForCausalLM and the loss of its logits against targets already shifted
    (as ours reads them); the logits cast to float32 first, as transformers' own loss does."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))


def hf_model(cfg, flat):
    """transformers' model of cfg's family, float32, SDPA attention, holding flat's weights."""
    import transformers
    c = llama.config_to_hf(cfg)
    hc = transformers.AutoConfig.for_model(c.pop("model_type"), **c)
    with torch.device(DEVICE):          # no random init on the host first
        model = transformers.AutoModelForCausalLM.from_config(hc, attn_implementation="sdpa",
                                                              dtype=torch.float32)
    state = {k: torch.from_numpy(v) for k, v in llama.params_to_hf(cfg, flat).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied lm_head is the embedding, which was loaded
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tied_embeddings
                                               else set()), (missing, unexpected)
    return model.train()


def transformers_side(cfg, flat):
    def make(B, T):
        return torch_side(HFLoss(hf_model(cfg, flat)))
    return make


def sides(family, cfg, flat):
    """[(name, make, optional)]: the baseline, ours; for GPT-2 ours with GELU kept too,
    optional (dropped where it alone does not fit beside the others)."""
    base = nanogpt(cfg, flat) if family == "gpt2" else transformers_side(cfg, flat)
    # the baseline first: where B is too large for it, the search learns so with one compile
    out = [("baseline", base, False), ("ours", ours(family, cfg, flat), False)]
    if family == "gpt2":
        out.append(("ours_stored_gelu", ours(family, cfg, flat, recompute_gelu=False), True))
    return out


# ----------------------------------------------------------------------------- the driver

def start(make, B, T, data, warmup):
    """Builds a side and runs its warmup steps (torch.compile compiles in the first): a dict of
    its step, details, info, losses, the seconds of its timed blocks (none yet), and its peak
    memory beyond what was allocated before it (the other sides'), in GiB (None on the CPU)."""
    before = allocated()
    if DEVICE.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    step, details, info = make(B, T)
    losses = [step(*xy) for xy in data[:warmup]]
    sync()
    peak = (torch.cuda.max_memory_allocated() - before) / GIB if DEVICE.type == "cuda" else None
    return {"step": step, "details": details, "info": info, "losses": losses, "blocks": [],
            "peak_memory_gib": peak}


def time_block(side, data):
    sync()
    t0 = time.perf_counter()
    side["losses"] += [side["step"](*xy) for xy in data]
    sync()
    side["blocks"].append(time.perf_counter() - t0)


def run_at(named, B, T, data, warmup, block, blocks):
    """Every side at batch size B: interleaved blocks with all of them in memory, else
    alternating whole runs: the first side (the baseline, whose compile is the costly build)
    goes on alone with the first half of its blocks, then each other side alone, and back in
    reverse order for the second half (ABBA: a drift in the clock falls on both halves alike).
    Returns ({name: started side, or {"error", "oom"}}, mode), or None when a side that is not
    optional runs out of memory alone (B is too large)."""
    def blocks_of(i):
        return data[warmup + i * block:warmup + (i + 1) * block]

    live, out = {}, {}
    for name, make, optional in named:
        out[name] = survive(start, make, B, T, data, warmup)
        if "error" not in out[name]:
            live[name] = out[name]
        elif out[name]["oom"] and not optional:
            if not live:                        # alone: B is too large
                free_memory()
                return None
            break
    else:
        for i in range(blocks):                 # the order reversed every block
            for name in (list(live) if i % 2 == 0 else list(live)[::-1]):
                time_block(live[name], blocks_of(i))
        for side in live.values():              # the report keeps no model alive
            side["details"], side["step"] = survive(side["details"], *data[-1]), None
        live.clear()
        free_memory()
        return out, "interleaved"
    # one did not fit beside the others: the first goes on alone, the others are freed
    first = next(iter(live))
    running = {first: live[first]}
    live.clear()
    out = {first: running[first]}
    free_memory()
    half = (blocks + 1) // 2
    order = [name for name, _, _ in named]
    runs = [(n, range(half)) for n in order] + [(n, range(half, blocks)) for n in order[::-1]]
    runs = [(n, indices) for n, indices in runs if indices]
    makes = {name: (make, optional) for name, make, optional in named}
    for k, (name, indices) in enumerate(runs):
        if "error" in out.get(name, {}):
            continue
        side = running.pop(name, None)
        if side is None:
            make, optional = makes[name]
            side = survive(start, make, B, T, data, warmup)
            if "error" in side:
                free_memory()
                if side["oom"] and not optional:
                    return None
                out[name] = side
                continue
            if name in out:                     # its second run goes on with the first's
                side["blocks"], side["losses"] = out[name]["blocks"], out[name]["losses"]
                side["peak_memory_gib"] = max(side["peak_memory_gib"] or 0,
                                              out[name]["peak_memory_gib"] or 0) or None
            out[name] = side
        for i in indices:
            time_block(side, blocks_of(i))
        if k + 1 < len(runs) and runs[k + 1][0] == name:
            running[name] = side                # its next run follows at once: no rebuild
            continue
        last = name not in (n for n, _ in runs[k + 1:])
        side["details"] = survive(side["details"], *data[-1]) if last else None
        side["step"] = None
        free_memory()
    return out, "alternating runs"


def side_report(side, B, T, flops, peak_flops, block):
    """A timed side's numbers (its details merged in), or its error."""
    if "error" in side:
        return side
    seconds = sum(side["blocks"]) / (len(side["blocks"]) * block)
    details = side["details"] if isinstance(side["details"], dict) else {}
    if "error" in details:                      # the side ran; only its details failed
        details = {"details_error": details["error"]}
    return {"ms_per_step": seconds * 1e3, "tokens_per_s": B * T / seconds,
            "mfu": flops * B * T / seconds / peak_flops if peak_flops else None,
            "peak_memory_gib": side["peak_memory_gib"], "first_loss": side["losses"][0],
            "last_loss": side["losses"][-1],
            "block_ms": [1e3 * s / block for s in side["blocks"]], **side["info"], **details}


def spread(ratios):
    return {"min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)}


def throughput(family, cfg, flat, batch_sizes, T, steps, warmup, block, make_sides=sides):
    """The sides (make_sides(family, cfg, flat)) at the largest B that all of them fit (see
    run_at), with each side's ratio to the baseline: over all blocks, and the spread of the
    per-block ratios."""
    blocks = steps // block
    tried = []
    for B in sorted(batch_sizes, reverse=True):
        data = batches(cfg, B, T, warmup + blocks * block)
        ran = run_at(make_sides(family, cfg, flat), B, T, data, warmup, block, blocks)
        if ran is None:
            tried.append(B)
            print(f"bench gpu: B={B} does not fit, trying a smaller batch", file=sys.stderr,
                  flush=True)
            continue
        out, mode = ran
        peak = get_backend("gpu").peak_flops()
        flops = flops_per_token(family, cfg, T)
        result = {"B": B, "T": T, "mode": mode, "block": block, "blocks": blocks,
                  "did_not_fit": tried,
                  **{name: side_report(side, B, T, flops, peak, block)
                     for name, side in out.items()}}
        base = out.get("baseline", {})
        for name, side in out.items():
            if name != "baseline" and "error" not in side and "error" not in base:
                key = f"speedup{name[4:]}"              # speedup, speedup_stored_gelu
                result[key] = sum(base["blocks"]) / sum(side["blocks"])
                result[f"{key}_spread"] = spread([b / s for b, s in zip(base["blocks"],
                                                                        side["blocks"])])
        return result
    raise LlmpyError(f"bench gpu: no batch size in {list(batch_sizes)} fits in GPU memory")


def tracking(family, cfg, flat, B, T, steps):
    """Ours in bf16 (fp32 master weights) against ours in float32, from the same weights on the
    same batches: each step's loss, and the largest difference. In the interpreter, which reads
    bf16 wrongly, float16 stands in for bf16."""
    low = "bfloat16" if DEVICE.type == "cuda" else "float16"
    data = batches(cfg, B, T, steps)
    losses = {}
    for dtype in (low, "float32"):
        model = new_model(family, cfg, get_backend("gpu", dtype=dtype))
        load_params(model, flat)
        opt = ours_optimizer(model)
        losses[dtype] = [train_step(model, opt, [xy], grad_clip=GRAD_CLIP).loss for xy in data]
        del model, opt
        free_memory()
    diff = float(np.max(np.abs(np.subtract(losses[low], losses["float32"]))))
    return {"B": B, "T": T, "steps": steps, "dtype": low, "losses": losses,
            "max_abs_diff": diff, "tolerance": TRACK_TOL, "within": diff <= TRACK_TOL}


def kernel_times(step, xy):
    """One more step under torch.profiler: {kernel: [launches, GPU ms]}, the GPU's own time in
    each kernel (cuBLAS's, Triton's, torch.compile's, memcpy and memset), with none of the op
    table's synchronisations, and idle_gaps of the same kernels; None, None in the
    interpreter."""
    if DEVICE.type != "cuda":
        return None, None
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step(*xy)
        sync()
    times, spans = {}, []
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            calls, ms = times.get(e.name, (0, 0.0))
            times[e.name] = [calls + 1, ms + e.time_range.elapsed_us() / 1e3]
            spans.append((e.time_range.start, e.time_range.end, e.name))
    return times, idle_gaps(spans)


def idle_gaps(spans, top=5):
    """Where the GPU ran no kernel, between the first kernel's start and the last one's end, from
    each kernel's (start us, end us, name): {"span_ms", "idle_ms", "largest": [[ms, the kernel
    before, the kernel after], ...]}. A step's wall time beyond its kernels' sum is here (or
    before its first kernel or after its last)."""
    spans = sorted(spans)
    idle, gaps, end, before = 0.0, [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            idle += start - end
            gaps.append([(start - end) / 1e3, before, name])
        if stop > end:
            end, before = stop, name
    return {"span_ms": (end - spans[0][0]) / 1e3, "idle_ms": idle / 1e3,
            "largest": sorted(gaps, reverse=True)[:top]}


GEMM_NAMES = ("gemm", "nvjet", "cutlass", "xmma", "cublas")


def kernel_table(kernels, who, top=14):
    """The lines of kernel_times' results: the matmuls' total, then the other kernels, largest
    first."""
    total = sum(ms for _, ms in kernels.values())
    others = sorted(((ms, calls, name) for name, (calls, ms) in kernels.items()
                     if not any(g in name.lower() for g in GEMM_NAMES)), reverse=True)
    gemm = total - sum(ms for ms, _, _ in others)
    lines = [f"{who}, GPU time by kernel (one more step, profiled): {total:.2f} ms in kernels, "
             f"{gemm:.2f} ms of them in matmuls; the others:"]
    lines += [f"  {ms:8.2f} ms {calls:4d}x {name[:90]}" for ms, calls, name in others[:top]]
    if others[top:]:
        lines.append(f"  {sum(o[0] for o in others[top:]):8.2f} ms in {len(others) - top} more")
    return lines


def survive(fn, *args):
    """fn(*args), or {"error": ..., "oom": whether it ran out of memory} when it fails: one side,
    or the baseline's toolchain, breaking on a GPU must not lose the other side's numbers from a
    device session that may not come again. Other failures print their traceback on stderr."""
    try:
        return fn(*args)
    except Exception as e:                                      # noqa: BLE001 (reported)
        # cuBLAS reports a failed allocation in its own words, not as torch's OutOfMemoryError
        oom = isinstance(e, torch.cuda.OutOfMemoryError) or any(
            s in str(e) for s in ("out of memory", "ALLOC_FAILED"))
        if not oom:
            traceback.print_exc()
        return {"error": f"{type(e).__name__}: {first_line(e)}", "oom": oom}




# ----------------------------------------------------------------------------- attention

def attention(B, T, NH, NKV, hs):
    """Forward and forward+backward of causal attention on one (B,T,(NH+2*NKV)*hs) qkv
    buffer, ours against SDPA (its grouped-query form where NKV < NH)."""
    QKV, C = (NH + 2 * NKV) * hs, NH * hs
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    qkv = torch.randn(B, T, QKV, device=DEVICE, dtype=dtype)
    dout = torch.randn(B, T, C, device=DEVICE, dtype=dtype)
    out = torch.empty(B, T, C, device=DEVICE, dtype=dtype)
    lse = torch.empty(B, NH, T, device=DEVICE, dtype=torch.float32)
    dqkv = torch.zeros_like(qkv)

    def ours_fwd():
        gpu_backend.attention_forward(out, lse, qkv)

    def ours_fwd_bwd():
        gpu_backend.attention_forward(out, lse, qkv)
        gpu_backend.attention_backward(dqkv, dout, qkv, out, lse)

    leaf = qkv.clone().requires_grad_()

    def sdpa(x):
        q, k, v = x.split([C, NKV * hs, NKV * hs], dim=2)
        q, k, v = (t.view(B, T, -1, hs).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=NKV < NH)

    def sdpa_fwd():
        return sdpa(leaf.detach())

    def sdpa_fwd_bwd():
        sdpa(leaf).transpose(1, 2).reshape(B, T, C).backward(dout)

    fwd_flops = 4 * B * NH * T * T * hs / 2                   # two matmuls, causal half
    result = {"B": B, "T": T, "NH": NH, "NKV": NKV, "hs": hs}
    for name, fn, flops in (("ours_fwd", ours_fwd, fwd_flops), ("sdpa_fwd", sdpa_fwd, fwd_flops),
                            ("ours_fwd_bwd", ours_fwd_bwd, 3.5 * fwd_flops),
                            ("sdpa_fwd_bwd", sdpa_fwd_bwd, 3.5 * fwd_flops)):
        result[name] = survive(timing, fn, flops, [leaf] if fn is sdpa_fwd_bwd else None)
    return result


def tuned_configs():
    """{kernel and its autotuning key: the config chosen}, for every autotuned kernel so far."""
    from ..backends.gpu import (attention as a, classifier, glu, gelu, layernorm, rmsnorm)
    return {f"{name} {key}": str(config)
            for module in (a, classifier, glu, gelu, layernorm, rmsnorm)
            for name, kernel in vars(module).items() if isinstance(kernel, triton.runtime.Autotuner)
            for key, config in kernel.cache.items()}


def timing(fn, flops, grads=None):
    if DEVICE.type != "cuda":                   # the dry run: one call, timed as it is
        t0 = time.perf_counter()
        fn()
        ms = 1e3 * (time.perf_counter() - t0)
    else:
        # grad_to_none: otherwise every timed backward also adds into the leaf's .grad
        ms = do_bench(fn, grad_to_none=grads, return_mode="median")
    return {"ms": ms, "tflops": flops / ms / 1e9}


# ----------------------------------------------------------------------------- report

def percent(x):
    return "-" if x is None else format(x, ".1%")


def gib(x):
    return "-" if x is None else format(x, ".2f")


def ratio_line(t, key, what):
    s = t[f"{key}_spread"]
    return (f"{what}: {t[key]:.3f}x (per block of {t['block']} steps: min {s['min']:.3f}x, "
            f"median {s['median']:.3f}x, max {s['max']:.3f}x)")


def summary(r):
    t, a = r["training"], r["attention"]
    lines = [f"{r['device']} | {r['date']} | commit {r['commit']} | torch {r['torch']} | "
             f"triton {r['triton']} | {r['family']} {r['model']} B={t['B']} T={t['T']}"
             + (" | DRY RUN (CPU, Triton's interpreter, tiny shape)" if r.get("dry_run") else "")]
    k = r.get("tracking")
    if k:
        lines.append(f"{k['dtype']} against float32, {k['steps']} steps at B={k['B']} "
                     f"T={k['T']}: largest loss difference {k['max_abs_diff']:.4f} "
                     f"({'within' if k['within'] else 'OVER'} {k['tolerance']})")
    sides = "interleaved in blocks" if t["mode"] == "interleaved" else "alternating whole runs"
    lines.append(f"{t['blocks']} blocks of {t['block']} timed steps a side, {sides}"
                 + (f"; did not fit at B={t['did_not_fit']}" if t["did_not_fit"] else ""))
    lines.append(f"{'':16s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} "
                 f"{'loss first->last':>18s}")
    for side in ("ours", "ours_stored_gelu", "baseline"):
        s = t.get(side)
        if s is None:
            continue
        lines.append(f"{side:16s} failed: {s['error']}" if "error" in s else
                     f"{side:16s} {s['ms_per_step']:9.1f} {s['tokens_per_s']:10.0f} "
                     f"{percent(s['mfu']):>6s} {gib(s['peak_memory_gib']):>9s} "
                     f"{s['first_loss']:8.4f}->{s['last_loss']:.4f}")
    base = "nanoGPT" if r["family"] == "gpt2" else "transformers"
    if "speedup" in t:
        lines.append(ratio_line(t, "speedup", f"speedup (tokens/s, ours / {base} + "
                                              "torch.compile)"))
    if "speedup_stored_gelu" in t:
        lines.append(ratio_line(t, "speedup_stored_gelu",
                                "speedup with every GELU output kept (--no-recompute-gelu)"))
        keeps = t["ours"].get("train_keeps_gelu")
        if keeps is not None:
            lines.append("llmpy train's default at this B on this GPU: " + (
                f"every GELU output kept (they fit): {t['speedup_stored_gelu']:.3f}x" if keeps
                else f"GELU recomputed: {t['speedup']:.3f}x"))
    tflops = {k: (f"{a[k]['tflops']:.0f}" if "tflops" in a[k] else "failed")
              for k in ("ours_fwd", "sdpa_fwd", "ours_fwd_bwd", "sdpa_fwd_bwd")}
    lines.append(f"attention B={a['B']} T={a['T']} NH={a['NH']} NKV={a['NKV']} hs={a['hs']}, "
                 f"causal TFLOP/s: fwd ours {tflops['ours_fwd']} vs SDPA {tflops['sdpa_fwd']} | "
                 f"fwd+bwd ours {tflops['ours_fwd_bwd']} vs SDPA {tflops['sdpa_fwd_bwd']}")
    ours = t["ours"]
    if "error" not in ours and "ops" in ours:
        lines.append(f"ours, peak memory {gib(ours['peak_memory_gib'])} GiB, of which "
                     f"the buffers' own sizes {ours['planned_memory_gib']:.2f} GiB")
        lines.append(f"ours, backward pass: queued by the host in "
                     f"{ours['backward_queue_ms']:.1f} ms, run by the GPU in "
                     f"{ours['backward_ms']:.1f} ms")
        lines.append(op_table(ours["ops"], "ours"))
    for side in ("ours", "baseline"):
        if t.get(side, {}).get("kernels"):
            lines += kernel_table(t[side]["kernels"], side)
        if t.get(side, {}).get("gaps"):
            g = t[side]["gaps"]
            lines.append(f"  idle between its kernels: {g['idle_ms']:.2f} ms of the "
                         f"{g['span_ms']:.2f} ms from the first to the last; the longest:")
            lines += [f"  {ms:8.3f} ms after {before[:50]} | before {after[:50]}"
                      for ms, before, after in g["largest"]]
    lines += [f"tuned: {kernel}: {config}" for kernel, config in r.get("tuned", {}).items()]
    return "\n".join(lines)


def check_args(batch_sizes, seq_len, steps, warmup, block, track_steps):
    """Before minutes of compiling: one line about the first bad argument."""
    for flag, values, least in (("--batch-size", batch_sizes or [1], 1),
                                ("--seq-len", [seq_len or 1], 1), ("--steps", [steps], 1),
                                ("--warmup", [warmup], 1), ("--block", [block], 1),
                                ("--track-steps", [track_steps], 0)):
        if min(values) < least:
            raise LlmpyError(f"bench gpu: {flag} must be >= {least}, got {min(values)}")
    if steps < block:
        raise LlmpyError(f"bench gpu: --steps {steps} must be at least --block {block}")


def bench_gpu(model="d12", batch_sizes=None, seq_len=None, steps=30, warmup=3, block=5,
              track_steps=20, dry_run=False, as_json=False):
    """Prints the results as a table (see summary), or as JSON; batch_sizes and seq_len None:
    the family's DEFAULTS. Progress and each part's raw result go to stderr as they come, so
    that a device session cut short keeps what it measured."""
    check_args(batch_sizes, seq_len, steps, warmup, block, track_steps)
    family = family_of(model)                   # a bad --model fails here, before any work
    if not torch.cuda.is_available() and not (dry_run and os.environ.get("TRITON_INTERPRET")
                                              == "1"):
        raise LlmpyError("bench gpu needs a CUDA GPU (torch.cuda.is_available() is False)"
                         + ("; --dry-run needs TRITON_INTERPRET=1" if dry_run else ""))
    T, batch_sizes = seq_len or DEFAULTS[family][0], batch_sizes or DEFAULTS[family][1]
    family, cfg, flat = bench_config(model, T, dry_run)
    r = {"device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu",
         "date": time.strftime("%Y-%m-%d"),
         "commit": (os.environ.get("LLMPY_COMMIT") or git_commit() or "unknown")[:7],
         "torch": torch.__version__, "triton": triton.__version__, "model": model,
         "family": family, "dry_run": dry_run, "config": dataclasses.asdict(cfg)}
    if track_steps:
        B, Tk = (min(batch_sizes), T) if dry_run else TRACK_SHAPE
        r["tracking"] = tracking(family, cfg, flat, B, Tk, track_steps)
        print(f"bench gpu: tracking: {json.dumps(r['tracking'])}", file=sys.stderr, flush=True)
    r["training"] = throughput(family, cfg, flat, batch_sizes, T, steps, warmup, block)
    print(f"bench gpu: training: {json.dumps(r['training'])}", file=sys.stderr, flush=True)
    r["attention"] = attention(r["training"]["B"], T, cfg.num_heads,
                               getattr(cfg, "num_kv_heads", cfg.num_heads),
                               getattr(cfg, "head_dim", cfg.channels // cfg.num_heads))
    r["tuned"] = tuned_configs()
    print(json.dumps(r, indent=1) if as_json else summary(r))
    return r
