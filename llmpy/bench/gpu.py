"""`llmpy bench gpu`: GPT-2 training throughput on the gpu backend beside PyTorch, in one run.

Both sides start from the same weights and train on the same batches of the bundled
Shakespeare, with the same step: forward, backward, global-norm clipping to 1.0, AdamW with
weight decay on the 2-D tensors, and the loss read back to the host every step.
- ours: llmpy's GPT2 on this backend (bf16, fp32 master weights), the step of train.py.
- baseline: nanoGPT's recipe: torchref's model with F.scaled_dot_product_attention, bf16
  autocast, torch.compile, fused torch.optim.AdamW; its vocabulary padded to Vp as nanoGPT pads
  it, so both sides multiply the same classifier shapes.
Ours runs with GELU recomputed in the backward pass (one layer's output kept, llm.c's -r 1)
and, where the baseline ran, again with every layer's GELU output kept (--no-recompute-gelu: 4C
more values a position per layer, one GELU fewer); the report says which of the two train.py
runs by default at this B on this GPU (the second where it fits: default_recompute_gelu).
Reported per side: ms/step (mean over the timed steps), tokens/s, MFU, peak memory; for ours
also the host's time to queue a backward pass against the GPU's time to run it, and one more
step op by op (each op synchronised: launch overhead included); for each side, one more step
under torch.profiler: the GPU's own time in each kernel, and where the GPU sat idle between
kernels. MFU counts 6 FLOPs per weight that multiplies per token (the classifier's and the
layers' matrices; biases, layernorms and the embedding lookups left out) plus 12*L*C*T for
attention, as PaLM and nanoGPT count attention (model.flops_per_token), against the GPU's dense
bf16 peak (the backend's peak_flops(); none for a GPU not in its table). B is the largest of --batch-size
at which both sides fit. Also: the flash-attention kernels against F.scaled_dot_product_attention at
GPT-2's attention shape, in causal TFLOP/s (the FLOPs a causal kernel must do: half of the full
T*T), and the config autotuning chose for each tuned kernel.
"""
import functools
import gc
import json
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from torchref.gpt2 import Block, TorchGPT

from ..backends import get_backend
from ..backends.gpu import attention as attention_kernels, classifier, gelu, layernorm
from ..data.loader import DataLoader, bundled_data
from ..errors import LlmpyError, first_line
from ..model.build import preset
from ..model.gpt2 import GPT2, flops_per_token, init_weights, load_params
from ..model.layout import GPT2Config
from ..train.checkpoints import git_commit
from ..train.config import default_recompute_gelu
from ..train.optim import AdamW, AdamWConfig
from ..train.step import train_step
from . import OpTimer, op_table

LR, WEIGHT_DECAY, GRAD_CLIP = 6e-4, 0.1, 1.0
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def batches(cfg, B, T, n):
    loader = DataLoader(bundled_data("shakespeare_train.bin"), B, T, cfg.vocab_size)
    return [loader.next_batch() for _ in range(n)]


def sync():
    """Wait for the GPU's queued work (nothing to wait for in the interpreter, where the tests
    run ours())."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(step, data, warmup):
    """Mean seconds per step over data after `warmup` untimed steps, and the losses."""
    losses = [step(*xy) for xy in data[:warmup]]
    sync()
    t0 = time.perf_counter()
    losses += [step(*xy) for xy in data[warmup:]]
    sync()
    return (time.perf_counter() - t0) / (len(data) - warmup), losses


# ----------------------------------------------------------------------------- the two sides

def ours(cfg, flat, data, warmup, recompute_gelu=True):
    """The timed steps; then, outside the timings, how long the host takes to queue a backward
    pass against how long the GPU takes to run it (a CUDA graph would save only the first,
    and only where it is not hidden behind the second), and one more step op by op (OpTimer,
    synchronising around every op: where the time goes)."""
    gpu = get_backend("gpu")
    model = GPT2(cfg, gpu, recompute_gelu)
    load_params(model, flat)
    opt = AdamW(model, AdamWConfig(lr=LR, beta2=0.95, weight_decay=WEIGHT_DECAY), decayed=model.layout.decayed())

    def step(x, y):
        return train_step(model, opt, [(x, y)], grad_clip=GRAD_CLIP).loss

    B, T = data[0][0].shape
    keeps_gelu = not default_recompute_gelu(            # as train decides
        sum(model.memory(B, T, recompute_gelu=False).values()) + opt.state_bytes(), gpu)
    seconds, losses = timed(step, data, warmup)
    kernels, gaps = kernel_times(step, data[-1])
    model.forward(*data[-1])
    model.zero_grad()
    sync()
    t0 = time.perf_counter()
    model.backward()
    queued = time.perf_counter()
    sync()
    host = {"backward_queue_ms": 1e3 * (queued - t0),
            "backward_ms": 1e3 * (time.perf_counter() - t0)}
    timer = OpTimer(gpu, sync=sync)
    model.backend = timer.backend
    sync()
    t0 = time.perf_counter()
    step(*data[-1])
    sync()
    ops = timer.table(time.perf_counter() - t0)
    planned = sum(model.memory(B, T).values()) + opt.state_bytes()    # the buffers' own sizes
    return seconds, losses, {"ops": ops, "planned_memory_gib": planned / 2 ** 30,
                             "kernels": kernels, "gaps": gaps, "train_keeps_gelu": keeps_gelu,
                             **host}


def baseline(cfg, flat, data, warmup):
    class SDPABlock(Block):
        def attention(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.NH, C // self.NH).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.attn_proj(y.transpose(1, 2).reshape(B, T, C))

    padded = GPT2Config(max_seq_len=cfg.max_seq_len, vocab_size=cfg.padded_vocab_size,
                        num_layers=cfg.num_layers, num_heads=cfg.num_heads,
                        channels=cfg.channels)
    model = TorchGPT(padded).load_flat(flat).cuda()
    for block in model.blocks:                  # the same module, with SDPA for attention
        block.__class__ = SDPABlock
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR,
                            betas=(0.9, 0.95), fused=True)
    # dynamic=False: a retry at a smaller B after running out of memory compiles anew for
    # that B, instead of a slower graph with a symbolic batch dimension
    compiled = torch.compile(model, dynamic=False)

    def step(x, y):
        x, y = torch.from_numpy(x).cuda(), torch.from_numpy(y).cuda()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    seconds, losses = timed(step, data, warmup)
    kernels, gaps = kernel_times(step, data[-1])
    return seconds, losses, {"kernels": kernels, "gaps": gaps}


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


def measure(side, cfg, flat, data, warmup):
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    seconds, losses, extra = side(cfg, flat, data, warmup)
    B, T = data[0][0].shape
    tokens, peak = B * T, get_backend("gpu").peak_flops()
    return {"ms_per_step": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "mfu": flops_per_token(cfg, T) * tokens / seconds / peak if peak else None,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30,
            "first_loss": losses[0], "last_loss": losses[-1], **extra}


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


def training(cfg, batch_sizes, T, steps, warmup):
    """Both sides from the same initial weights at the largest B that both fit."""
    host = GPT2(cfg, get_backend("numpy"))
    init_weights(host, 0)
    for B in sorted(batch_sizes, reverse=True):
        data = batches(cfg, B, T, warmup + steps)
        result, oom = {"B": B, "T": T}, False
        for name, side in (("ours", ours), ("baseline", baseline)):
            result[name] = survive(measure, side, cfg, host.params.buf, data, warmup)
            oom = result[name].get("oom", False)
            if oom:                             # both sides run at the same B
                break
        if oom:
            print(f"bench gpu: B={B}: {name} ran out of memory, trying a smaller batch",
                  file=sys.stderr, flush=True)
            continue
        if "error" not in result["baseline"]:
            stored = functools.partial(ours, recompute_gelu=False)
            result["ours_stored_gelu"] = survive(measure, stored, cfg, host.params.buf, data,
                                                 warmup)
            for side in ("ours", "ours_stored_gelu"):
                if "error" not in result[side]:
                    result[f"speedup{side[4:]}"] = (result[side]["tokens_per_s"]
                                                    / result["baseline"]["tokens_per_s"])
        return result
    raise LlmpyError(f"bench gpu: no batch size in {batch_sizes} fits in GPU memory")


# ----------------------------------------------------------------------------- attention

def attention(B, T, NH, hs):
    """Forward and forward+backward of causal attention on one (B,T,3C) qkv buffer."""
    C = NH * hs
    qkv = torch.randn(B, T, 3 * C, device=DEVICE, dtype=torch.bfloat16)
    dout = torch.randn(B, T, C, device=DEVICE, dtype=torch.bfloat16)
    out = torch.empty(B, T, C, device=DEVICE, dtype=torch.bfloat16)
    lse = torch.empty(B, NH, T, device=DEVICE, dtype=torch.float32)
    dqkv = torch.zeros_like(qkv)

    def ours_fwd():
        attention_kernels.attention_forward(out, lse, qkv)

    def ours_fwd_bwd():
        attention_kernels.attention_forward(out, lse, qkv)
        attention_kernels.attention_backward(dqkv, dout, qkv, out, lse)

    leaf = qkv.clone().requires_grad_()

    def sdpa_fwd():
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in leaf.detach().split(C, dim=2))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def sdpa_fwd_bwd():
        q, k, v = (t.view(B, T, NH, hs).transpose(1, 2) for t in leaf.split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y.transpose(1, 2).reshape(B, T, C).backward(dout)

    fwd_flops = 4 * B * NH * T * T * hs / 2                   # two matmuls, causal half
    result = {"B": B, "T": T, "NH": NH, "hs": hs}
    for name, fn, flops in (("ours_fwd", ours_fwd, fwd_flops), ("sdpa_fwd", sdpa_fwd, fwd_flops),
                            ("ours_fwd_bwd", ours_fwd_bwd, 3.5 * fwd_flops),
                            ("sdpa_fwd_bwd", sdpa_fwd_bwd, 3.5 * fwd_flops)):
        result[name] = survive(timing, fn, flops, [leaf] if fn is sdpa_fwd_bwd else None)
    return result


def tuned_configs():
    """{kernel and its autotuning key: the config chosen}, for every autotuned kernel so far."""
    return {f"{name} {key}": str(config)
            for module in (attention_kernels, classifier, gelu, layernorm)
            for name, kernel in vars(module).items() if isinstance(kernel, triton.runtime.Autotuner)
            for key, config in kernel.cache.items()}


def timing(fn, flops, grads=None):
    # grad_to_none: otherwise every timed backward also adds into the leaf's .grad
    ms = do_bench(fn, grad_to_none=grads, return_mode="median")
    return {"ms": ms, "tflops": flops / ms / 1e9}


# ----------------------------------------------------------------------------- report

def summary(r):
    t, a = r["training"], r["attention"]
    lines = [f"{r['device']} | {r['date']} | commit {r['commit']} | torch {r['torch']} | "
             f"triton {r['triton']} | GPT-2 {r['model']} B={t['B']} T={t['T']}",
             f"{'':16s} {'ms/step':>9s} {'tokens/s':>10s} {'MFU':>6s} {'peak GiB':>9s} "
             f"{'loss first->last':>18s}"]
    for side in ("ours", "ours_stored_gelu", "baseline"):
        s = t.get(side)
        if s is None:
            continue
        lines.append(f"{side:16s} failed: {s['error']}" if "error" in s else
                     f"{side:16s} {s['ms_per_step']:9.1f} {s['tokens_per_s']:10.0f} "
                     f"{'-' if s['mfu'] is None else format(s['mfu'], '.1%'):>6s} "
                     f"{s['peak_memory_gib']:9.2f} "
                     f"{s['first_loss']:8.4f}->{s['last_loss']:.4f}")
    if "speedup" in t:
        lines.append(f"speedup (tokens/s, ours / torch.compile baseline): {t['speedup']:.3f}x")
    if "speedup_stored_gelu" in t:
        lines.append(f"speedup with every GELU output kept (--no-recompute-gelu): "
                     f"{t['speedup_stored_gelu']:.3f}x")
        keeps = t["ours"].get("train_keeps_gelu")
        if keeps is not None:
            lines.append("llmpy train's default at this B on this GPU: " + (
                f"every GELU output kept (they fit): {t['speedup_stored_gelu']:.3f}x" if keeps
                else f"GELU recomputed: {t['speedup']:.3f}x"))
    tflops = {k: (f"{a[k]['tflops']:.0f}" if "tflops" in a[k] else "failed")
              for k in ("ours_fwd", "sdpa_fwd", "ours_fwd_bwd", "sdpa_fwd_bwd")}
    lines.append(f"attention B={a['B']} T={a['T']} NH={a['NH']} hs={a['hs']}, causal TFLOP/s: "
                 f"fwd ours {tflops['ours_fwd']} vs SDPA {tflops['sdpa_fwd']} | fwd+bwd ours "
                 f"{tflops['ours_fwd_bwd']} vs SDPA {tflops['sdpa_fwd_bwd']}")
    if "error" not in t["ours"]:
        lines.append(f"ours, peak memory {t['ours']['peak_memory_gib']:.2f} GiB, of which "
                     f"the buffers' own sizes {t['ours']['planned_memory_gib']:.2f} GiB")
        lines.append(f"ours, backward pass: queued by the host in "
                     f"{t['ours']['backward_queue_ms']:.1f} ms, run by the GPU in "
                     f"{t['ours']['backward_ms']:.1f} ms")
        lines.append(op_table(t["ours"]["ops"], "ours"))
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


def check_args(batch_sizes, seq_len, steps, warmup):
    """Before minutes of compiling: one line about the first bad argument."""
    for flag, values in (("--batch-size", batch_sizes), ("--seq-len", [seq_len]),
                         ("--steps", [steps]), ("--warmup", [warmup])):
        if min(values) < 1:
            raise LlmpyError(f"bench gpu: {flag} must be >= 1, got {min(values)}")


def bench_gpu(model="d12", batch_sizes=(64, 32, 16), seq_len=1024, steps=30, warmup=3,
              as_json=False):
    """Prints the results as a table (see summary), or as JSON."""
    check_args(batch_sizes, seq_len, steps, warmup)
    if not torch.cuda.is_available():
        raise LlmpyError("bench gpu needs a CUDA GPU (torch.cuda.is_available() is False)")
    cfg = preset(model, max_seq_len=seq_len)
    r = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
         "commit": (os.environ.get("LLMPY_COMMIT") or git_commit() or "unknown")[:7],
         "torch": torch.__version__, "triton": triton.__version__, "model": model}
    r["training"] = training(cfg, batch_sizes, seq_len, steps, warmup)
    # kept on stderr at once: the attention timings below may not finish in a device session
    print(f"bench gpu: training: {json.dumps(r['training'])}", file=sys.stderr, flush=True)
    r["attention"] = attention(r["training"]["B"], seq_len, cfg.num_heads,
                               cfg.channels // cfg.num_heads)
    r["tuned"] = tuned_configs()
    print(json.dumps(r, indent=1) if as_json else summary(r))
    return r
