"""`llmpy bench cpu` and `llmpy bench sample`: llm.py beside its baselines, in the same run.

bench cpu: a training step (forward, backward, AdamW) on the cpu backend, beside PyTorch eager
(torchref's nanoGPT-style model for GPT-2; for the Llama / Gemma decoder transformers' own
LlamaForCausalLM, Gemma3ForCausalLM, ... with SDPA attention; torch.optim.AdamW; same weights,
batch and thread count), the NumPy reference backend, and the step's matmuls alone, which
bound the step from below, two ways: each matmul's shape as NumPy sgemm calls on warm arrays
(the sgemm bound), and the step's own matmul calls replayed back to back right after each step,
on its arrays, so that each step is compared with matmuls run under the same load. Each runs in
its own subprocess, so each peak RSS is its own and every library sees the thread count before
it starts its threads.

bench sample: tokens/s of generation with the KV cache beside llm.c's full recompute and
Hugging Face transformers' generate (its own KV cache; GPT2LMHeadModel, or the decoder's
*ForCausalLM) on the same weights.
"""
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

from ..model.layout import GPT2Config

IMPLS = ("cpu", "torch", "numpy")
BASELINES = ("torch", "hf_sample")                           # the jobs that run other libraries
NAMES = {"cpu": "llmpy cpu", "torch": "PyTorch eager", "numpy": "llmpy numpy"}
PHASES = ("zero_grad", "forward", "backward", "update")      # as train_step runs them


def peak_rss_mb():
    """This process's peak resident memory in MB, or None without the resource module
    (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2 ** 20 if sys.platform == "darwin" else peak / 1024   # bytes; Linux: KiB


def load_average():
    """The 1-minute load average, or None where the OS keeps none (Windows)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def shown(x, spec):
    """x formatted by spec, or "n/a" for a number this OS cannot give."""
    return "n/a" if x is None else format(x, spec)


def make_batch(cfg, B, T, seed=1):
    """The benchmark's (inputs, targets), (B,T) int64 each, the same in every subprocess."""
    r = np.random.default_rng(seed)
    return r.integers(0, cfg.vocab_size, (B, T)), r.integers(0, cfg.vocab_size, (B, T))


def matmul_shapes(cfg, B, T):
    """[(what, M, N, K, count)]: every GEMM of one training step as (M,K) @ (K,N). The
    attention's (T,T) products are left out: at T=64 they are under 1% of the FLOPs."""
    BT, C, L = B * T, cfg.channels, cfg.num_layers
    if isinstance(cfg, GPT2Config):
        weights = [("qkv", 3 * C, C, L), ("attproj", C, C, L), ("fc", 4 * C, C, L),
                   ("fcproj", C, 4 * C, L)]
    else:                         # the decoder: GQA's narrower k, v; the gated MLP's [up; gate]
        A, F = cfg.num_heads * cfg.head_dim, cfg.ffn_dim
        weights = [("qkv", cfg.qkv_dim, C, L), ("attproj", C, A, L), ("fc", 2 * F, C, L),
                   ("fcproj", C, F, L)]
    weights.append(("classifier", cfg.padded_vocab_size, C, 1))
    shapes = []
    for name, OC, IC, n in weights:
        shapes += [(f"{name} forward", BT, OC, IC, n), (f"{name} dinp", BT, IC, OC, n),
                   (f"{name} dweight", OC, IC, BT, n)]
    return shapes


def step_gflop(cfg, B, T):
    return sum(2 * M * N * K * n for _, M, N, K, n in matmul_shapes(cfg, B, T)) / 1e9


# ----------------------------------------------------------------------------- workers

def time_gemms(cfg, B, T, reps=5):
    """The step's matmuls as NumPy sgemm calls with preallocated outputs: (wall seconds,
    process CPU seconds) for one step's worth, from the median of reps per shape."""
    rng = np.random.default_rng(0)
    wall = cpu = 0.0
    for _, M, N, K, n in matmul_shapes(cfg, B, T):
        a = rng.standard_normal((M, K), dtype=np.float32)
        b = rng.standard_normal((N, K), dtype=np.float32).T            # (K,N), a transposed view
        out = np.empty((M, N), np.float32)
        times = []
        for _ in range(reps + 1):                                        # the first warms up
            c0, t0 = time.process_time(), time.perf_counter()
            np.matmul(a, b, out=out)
            times.append((time.perf_counter() - t0, time.process_time() - c0))
        wall += n * statistics.median(t[0] for t in times[1:])
        cpu += n * statistics.median(t[1] for t in times[1:])
    return wall, cpu


def timed(fn):
    """Wall seconds of fn()."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed_step(*phases):
    """One training step of the PyTorch baseline: a function per PHASES entry, run in order.
    Returns ([wall seconds of each], process CPU seconds of the step)."""
    c0, t = time.process_time(), [time.perf_counter()]
    for phase in phases:
        phase()
        t.append(time.perf_counter())
    return [b - a for a, b in zip(t, t[1:])], time.process_time() - c0


class OpTimer:
    """`backend`: the given backend with every op adding its wall time to `seconds[op name]`.
    sync (a GPU's synchronize), if given, runs before and after each op, so that an op that
    only queues work is timed to the end of that work."""

    def __init__(self, backend, sync=None):
        self.seconds, self.calls = {}, {}
        self.sync = sync or (lambda: None)
        self.backend = backend.wrapped(self._timed)

    def _timed(self, name, fn):
        def call(*args, **kwargs):
            self.sync()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)        # sum_squares returns one
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            self.calls[name] = self.calls.get(name, 0) + 1
            return result
        return call

    def table(self, step_seconds):
        """{"(step)": (1, step_seconds), op: (calls, seconds)}, op_table's input."""
        return {"(step)": (1, step_seconds),
                **{k: (self.calls[k], s) for k, s in self.seconds.items()}}


def recording_matmuls(backend):
    """(a copy of backend whose matmul ops also append (op, args) to `calls`, calls)."""
    calls = []

    def wrap(name, op):
        if name not in ("matmul_forward", "matmul_backward"):
            return op

        def call(*args, **kwargs):
            calls.append((op, args, kwargs))
            return op(*args, **kwargs)
        return call
    return backend.wrapped(wrap), calls


def replay(calls):
    """The recorded matmul calls again, back to back: the step's matmuls alone, on its own
    arrays, in its order. They write only activations, activation gradients and gradients,
    which the next step overwrites or zeroes before reading, so training goes on as if they had
    not run."""
    for op, args, kwargs in calls:
        op(*args, **kwargs)


def train_llmpy(spec, backend_name, B, T, warmup, steps):
    from ..backends import get_backend
    from ..train.optim import AdamW
    from ..train.step import train_step
    from ..model.build import build_model
    backend = get_backend(backend_name)
    model = build_model(spec, backend)
    model.backend, calls = recording_matmuls(backend)
    opt = AdamW(model)
    x, y = make_batch(model.config, B, T)

    def step():
        """(loss, [wall seconds of each of PHASES], process CPU seconds, wall seconds of the
        step's matmuls replayed alone right after it) of one train_step."""
        c0, seconds, t = time.process_time(), {}, [time.perf_counter()]

        def mark(phase):
            now = time.perf_counter()
            seconds[phase], t[0] = now - t[0], now
        calls.clear()
        loss = train_step(model, opt, [(x, y)], phase=mark).loss
        cpu = time.process_time() - c0
        return loss, [seconds[p] for p in PHASES], cpu, timed(lambda: replay(calls))

    records = [step() for _ in range(warmup + steps)]
    timer = OpTimer(backend)                    # one more step, op by op, outside the timings
    model.backend = timer.backend
    return records, timer.table(sum(step()[1]))


def torch_model(host, attn="sdpa"):
    """The PyTorch baseline holding host's weights: torchref's GPT-2, or transformers' own
    *ForCausalLM of the decoder with PyTorch's fused attention (SDPA), as users run it."""
    if isinstance(host.config, GPT2Config):
        from torchref.gpt2 import from_flat
        return from_flat(host.config, host.params.buf)
    from torchref.llama import from_flat
    return from_flat(host.config, host.params.buf, attn=attn)


def train_torch(spec, B, T, warmup, steps, threads):
    import torch
    from ..backends import get_backend
    from ..model.build import build_model
    torch.set_num_threads(threads)
    host = build_model(spec, get_backend("numpy"))
    cfg = host.config
    ref = torch_model(host)
    del host
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.0)                # llmpy's AdamW defaults
    x, y = (torch.from_numpy(a) for a in make_batch(cfg, B, T))
    loss = [None]                                   # the forward's loss tensor, for backward

    def forward():
        if isinstance(cfg, GPT2Config):
            loss[0] = ref(x, y)[1]
        else:
            from torchref.llama import loss_of
            loss[0] = loss_of(ref, x, y)[1]

    def step():
        seconds, cpu = timed_step(opt.zero_grad, forward, lambda: loss[0].backward(), opt.step)
        return loss[0].item(), seconds, cpu

    return [step() for _ in range(warmup + steps)], {}


def worker(job):
    """Runs one measurement (in a subprocess) and returns its JSON-able result."""
    if job["impl"] == "hf_sample":
        return {"runs_s": time_hf_generate(job["model"], job["tokens"], job["seed"],
                                           job["threads"], job["repeats"])}
    if job["impl"] == "sgemm":
        from ..model.build import model_config
        wall, cpu = time_gemms(model_config(job["model"]), job["batch"], job["seq"])
        return {"seconds": wall, "cpu_time_s": cpu}
    args = job["model"], job["batch"], job["seq"], job["warmup"], job["steps"]
    if job["impl"] == "torch":
        records, ops = train_torch(*args, job["threads"])
    else:
        records, ops = train_llmpy(job["model"], job["impl"], *args[1:])
    timed = records[job["warmup"]:]
    replays = {"matmuls_s": [r[3] for r in timed]} if job["impl"] != "torch" else {}
    return {"step_s": [sum(r[1]) for r in timed], "losses": [r[0] for r in records], **replays,
            "cpu_time_s": statistics.median(r[2] for r in timed),
            "phases_s": {p: statistics.median(r[1][i] for r in timed)
                         for i, p in enumerate(PHASES)},
            "ops": ops, "peak_rss_mb": peak_rss_mb()}


# `python -m llmpy.bench` would import the llmpy of the current directory first (a clone's,
# not the one running): the worker starts from this llmpy's own parent directory instead.
WORKER = ("import runpy, sys; sys.path[0] = sys.argv.pop(1); "
          "runpy.run_module('llmpy.bench', run_name='__main__')")


def run_worker(job):
    """worker(job) in a fresh interpreter whose BLAS, OpenMP and Numba get job['threads'];
    a baseline's without llmpy's thread settings (backends.baseline_env).
    A worker that fails (out of memory, say) is one line naming the job, not its traceback."""
    from ..backends import baseline_env
    from ..errors import LlmpyError
    env = baseline_env() if job["impl"] in BASELINES else dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "NUMBA_NUM_THREADS"):
        env[var] = str(job["threads"])
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", WORKER, root, json.dumps(job)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rc = out.returncode
    if rc:
        lines = out.stderr.strip().splitlines()
        why = lines[-1] if lines else (f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}")
        raise LlmpyError(f"bench: the {job['impl']} worker on --model {job['model']} failed: "
                         f"{why}")
    sys.stderr.write(out.stderr)             # its warnings, as a worker in-process would show
    return json.loads(out.stdout.splitlines()[-1])


# ----------------------------------------------------------------------------- bench cpu

def bench_cpu(args):
    from ..model.build import model_config
    from ..train.config import check_range, check_seq_len, require_positive
    from ..errors import LlmpyError
    require_positive(args, "batch_size", "seq_len")
    check_range("warmup", args.warmup, least=0)
    check_range("threads", args.threads, least=0)
    impls = [i for i in args.impls.split(",") if i]
    if any(i not in IMPLS for i in impls):
        raise LlmpyError(f"--impls {args.impls}: choose from {', '.join(IMPLS)}")
    if args.steps < 1:
        raise LlmpyError(f"--steps {args.steps}: time at least one step")
    if "torch" in impls and importlib.util.find_spec("torch") is None:
        raise LlmpyError("the PyTorch baseline needs torch (pip install torch==2.13.0), or "
                         "leave it out: --impls cpu,numpy")
    try:
        cfg = model_config(args.model)
    except LlmpyError as e:
        raise LlmpyError(f"--model {args.model}: {e}") from None
    check_seq_len(args.seq_len, cfg)
    job = dict(model=args.model, batch=args.batch_size, seq=args.seq_len, warmup=args.warmup,
               steps=args.steps, threads=args.threads or os.cpu_count())
    results = {"config": {**job, "layers": cfg.num_layers, "channels": cfg.channels,
                          "load_average_1min": load_average()},
               "matmul_gflop": step_gflop(cfg, args.batch_size, args.seq_len),
               "sgemm": run_worker({**job, "impl": "sgemm"})}
    results["sgemm_bound_s"] = results["sgemm"]["seconds"]
    for impl in impls:
        results[impl] = run_worker({**job, "impl": impl})
        results[impl]["median_s"] = statistics.median(results[impl]["step_s"])
    if "cpu" in results:
        cpu = results["cpu"]["median_s"]
        results["cpu_vs_sgemm_bound"] = cpu / results["sgemm_bound_s"]
        # each step beside its own matmuls replayed right after it: both see the same load
        pairs = zip(results["cpu"]["step_s"], results["cpu"]["matmuls_s"])
        results["cpu_vs_matmuls_alone"] = statistics.median(s / m for s, m in pairs)
        for other in ("torch", "numpy"):
            if other in results:
                results[f"{other}_over_cpu"] = results[other]["median_s"] / cpu
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print_cpu(results, impls)
    return results


def print_cpu(r, impls):
    c, gf = r["config"], r["matmul_gflop"]
    print(f"training step: L={c['layers']} C={c['channels']} ({c['model']}), B={c['batch']} "
          f"T={c['seq']}, fp32, AdamW, {c['threads']} threads; median of {c['steps']} steps "
          f"after {c['warmup']} warm-up; load average {shown(c['load_average_1min'], '.2f')}")
    bound = r["sgemm_bound_s"]
    print(f"sgemm bound: the step's {gf:.1f} GFLOP of matmuls as NumPy sgemm calls take "
          f"{bound:.3f} s ({gf / bound:.0f} GFLOP/s; CPU time {r['sgemm']['cpu_time_s']:.2f} s)")
    print("CPU time: the process's CPU seconds per step, all threads; on a busy machine it says "
          "more than the wall time\n")
    print(f"{'':16}{'step':>9}" + "".join(f"{p:>16}" for p in PHASES)
          + f"{'GFLOP/s':>9}{'CPU time':>10}{'peak RSS':>10}{'loss 1':>9}")
    for impl in impls:
        x = r[impl]
        step = x["median_s"]
        cells = "".join(f"{x['phases_s'][p]:8.3f} s {100 * x['phases_s'][p] / step:3.0f}%"
                        for p in PHASES)
        print(f"{NAMES[impl]:16}{step:7.3f} s{cells}{gf / step:9.0f}{x['cpu_time_s']:8.2f} s"
              f"{shown(x['peak_rss_mb'], '.0f'):>7} MB{x['losses'][0]:9.4f}")
    if "cpu" in r:
        print()
        for other in ("torch", "numpy"):
            if other in r:
                print(f"speedup of llmpy cpu over {NAMES[other]}: {r[other + '_over_cpu']:.2f}x")
        print(f"llmpy cpu takes {r['cpu_vs_sgemm_bound']:.2f}x the sgemm bound, and "
              f"{r['cpu_vs_matmuls_alone']:.2f}x its own matmuls replayed alone after each step "
              f"(median of the steps' ratios; the matmuls took "
              f"{statistics.median(r['cpu']['matmuls_s']):.3f} s)")
        print("\n" + op_table(r["cpu"]["ops"], "llmpy cpu"))


def op_table(ops, who):
    """The lines of OpTimer's results, {"(step)": (1, seconds), op: (calls, seconds)}, largest
    first, in milliseconds."""
    ops = dict(ops)
    step = ops.pop("(step)")[1]
    lines = [f"{who}, op by op (one more step, {1e3 * step:.1f} ms):",
             f"{'op':28}{'calls':>6}{'time':>12}{'share':>7}"]
    for name, (calls, s) in sorted(ops.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"{name:28}{calls:6d}{1e3 * s:9.2f} ms{100 * s / step:6.1f}%")
    rest = step - sum(s for _, s in ops.values())
    lines.append(f"{'(outside the ops)':28}{'':6}{1e3 * rest:9.2f} ms{100 * rest / step:6.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- bench sample

def time_weight_reads(model, reps=5):
    """Seconds for one matrix-vector product with every weight matrix, one after the other:
    the memory traffic that a decode step cannot avoid (median of reps)."""
    decoder, L = model.decoder(1), model.config.num_layers
    p = decoder.params
    mats = [p.wte] + [w[l] for w in (p.qkvw, p.attprojw, p.fcw, p.fcprojw) for l in range(L)]
    mats += [p.lm_head] if hasattr(p, "lm_head") else []          # an untied classifier
    vecs = [(np.ones((1, W.shape[1]), np.float32), np.empty((1, W.shape[0]), np.float32))
            for W in mats]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for W, (x, out) in zip(mats, vecs):
            decoder.ops.matmul_forward(out, x, W, None)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), sum(W.nbytes for W in mats)


def hf_model(model):
    """transformers' model holding the model's weights, in eval mode: GPT2LMHeadModel, or the
    decoder's *ForCausalLM with SDPA attention."""
    import torch
    import transformers
    from ..io.hf import config_to_hf, params_to_hf
    cfg = model.config
    if not isinstance(cfg, GPT2Config):
        return torch_model(model).eval()
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config_to_hf(cfg)))
    flat = model.backend.to_host(model.params.buf)             # (num_params,) float32
    tensors = {k: torch.from_numpy(v) for k, v in params_to_hf(cfg, flat).items()}
    hf.load_state_dict(tensors, strict=False)       # the one key left, lm_head.weight, is wte
    return hf.eval()


def hf_generate(hf, prompt, n, **sampling):
    """n new token ids from transformers' generate, with its KV cache: never fewer (an
    <|endoftext|> does not stop it), so that it does the same work as generate()."""
    import torch
    x = torch.tensor([prompt])                                  # (1,len(prompt))
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=torch.ones_like(x), min_new_tokens=n,
                          max_new_tokens=n, use_cache=True,
                          pad_token_id=prompt[0], **sampling)   # else it warns
    return out[0, len(prompt):].tolist()


def time_hf_generate(spec, n, seed, threads, repeats):
    """[Seconds of each of `repeats` runs] of transformers sampling n tokens after bench_start
    (temperature 1, no top-k) from the weights build_model(spec) gives every backend, after a
    short warm-up.
    A run_worker
    job: in a process of its own, as a user runs it (in the process of our cpu backend, with
    its Numba threads and its libgomp settings, it takes longer: bench/RESULTS.md)."""
    import torch
    from ..backends import get_backend
    from ..model.build import build_model
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = build_model(spec, get_backend("numpy"))
    start, hf = bench_start(model), hf_model(model)
    sampling = dict(do_sample=True, top_k=0, temperature=1.0)
    hf_generate(hf, start, 2, **sampling)                                 # warm-up
    return [timed(lambda: hf_generate(hf, start, n, **sampling)) for _ in range(repeats)]


def bench_start(model):
    """The token every side starts from: <|endoftext|> in GPT-2's vocabulary, else id 0 (the
    time per token does not depend on which)."""
    from ..io.tokenizer import EOT
    return [EOT] if model.config.vocab_size > EOT else [0]


def bench_sample(args):
    from ..backends import get_backend
    from ..train.config import check_range, require_positive
    from ..generate import generate, generate_recompute
    from ..model.build import build_model
    require_positive(args, "tokens", "batch_size", "seq_len", "repeats")
    check_range("seed", args.seed, least=0)
    model = build_model(args.model, get_backend(args.backend))
    n, B, T = args.tokens, args.batch_size, min(args.seq_len, model.config.max_seq_len)
    model.forward(np.zeros((B, T), np.int64))     # llm.c's shape for the recompute, warmed up
    start = bench_start(model)
    list(generate(model, start, 2, np.random.default_rng(0)))          # warm-up
    ids = {}

    def run(name, gen):
        ids[name] = list(gen(np.random.default_rng(args.seed)))
    # the KV cache and HF generate, the two sides of the comparison, each take the fastest of
    # `repeats` runs, as a busy machine only ever adds time; the slow recompute runs once
    kv_runs = [timed(lambda: run("kv_cache", lambda rng: generate(model, start, n, rng)))
               for _ in range(args.repeats)]
    times = {"kv_cache": min(kv_runs), "recompute": timed(lambda: run(
        "recompute", lambda rng: generate_recompute(model, start, n, rng, T=T)))}
    sweep_s, nbytes = time_weight_reads(model)
    hf_s, hf_runs, hf_skipped = None, None, None
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        hf_skipped = f"needs {' and '.join(missing)} (pip install torch==2.13.0 'llmpy[hf]')"
    else:
        job = dict(impl="hf_sample", model=args.model, tokens=n, seed=args.seed,
                   threads=os.cpu_count(), repeats=args.repeats)    # bench cpu's default
        hf_runs = run_worker(job)["runs_s"]
        hf_s = min(hf_runs)
    from ..model.llama import ARCHITECTURES
    r = {"hf_class": ARCHITECTURES.get(getattr(model.config, "model_type", ""),
                                       "GPT2LMHeadModel"),
         "config": {"model": args.model, "tokens": n, "recompute_B": B, "recompute_T": T,
                    "repeats": args.repeats, "backend": model.backend.name,
                    "load_average_1min": load_average()},
         "kv_cache_s": times["kv_cache"], "kv_cache_runs_s": kv_runs,
         "recompute_s": times["recompute"],
         "kv_cache_tokens_per_s": n / times["kv_cache"],
         "recompute_tokens_per_s": n / times["recompute"],
         # the recompute's one run against the KV cache's middle run, not its fastest
         "speedup": times["recompute"] / statistics.median(kv_runs),
         "same_tokens": ids["kv_cache"] == ids["recompute"],
         "weight_reads_s": sweep_s, "weight_gb_per_s": nbytes / sweep_s / 1e9,
         # a decode step reads every weight once, so a token costs at least sweep_s
         "speedup_bound": times["recompute"] / n / sweep_s, "hf_skipped": hf_skipped}
    if hf_s is not None:
        r.update(hf_s=hf_s, hf_runs_s=hf_runs, hf_tokens_per_s=n / hf_s,
                 hf_over_kv_cache=hf_s / times["kv_cache"])
    if args.json:
        print(json.dumps(r, indent=1))
        return r
    c = r["config"]
    print(f"sampling {n} tokens from {c['model']} (backend {c['backend']}), load average "
          f"{shown(c['load_average_1min'], '.2f')}; the KV cache and HF: the fastest of "
          f"{args.repeats} runs")
    print(f"KV cache:                       {r['kv_cache_s']:8.2f} s "
          f"{r['kv_cache_tokens_per_s']:8.1f} tokens/s")
    print(f"full recompute at B={B}, T={T}:   {r['recompute_s']:8.2f} s "
          f"{r['recompute_tokens_per_s']:8.1f} tokens/s   (llm.c's way)")
    if hf_s is None:
        print(f"HF transformers generate:       skipped: {hf_skipped}")
    else:
        print(f"HF transformers generate:       {hf_s:8.2f} s {r['hf_tokens_per_s']:8.1f} "
              f"tokens/s   ({r['hf_class']}, its KV cache, {os.cpu_count()} threads)")
    print(f"KV cache is {r['speedup']:.1f}x faster than the recompute; same tokens: "
          f"{r['same_tokens']}")
    if hf_s is not None:
        print(f"HF generate takes {r['hf_over_kv_cache']:.2f}x the KV cache's time "
              "(different random numbers, so different tokens)")
    print(f"a decode step reads every weight once: {nbytes / 1e6:.0f} MB, alone "
          f"{1e3 * sweep_s:.1f} ms ({r['weight_gb_per_s']:.1f} GB/s), so no cache can beat this "
          f"recompute by more than {r['speedup_bound']:.0f}x here "
          f"(KV cache: {1e3 * r['kv_cache_s'] / n:.1f} ms per token)")
    return r


def add_parsers(bench):
    """`bench cpu` and `bench sample`, on the `bench` subcommand's subparsers."""
    c = bench.add_parser("cpu", help="training step: cpu backend vs PyTorch eager, the NumPy "
                         "backend and the sgemm bound", description=__doc__.split("\n\n")[1])
    s = bench.add_parser("sample", help="tokens/s: KV-cache sampling vs llm.c's full recompute "
                         "and HF transformers' generate",
                         description="Generate with the KV cache, with a forward pass over "
                         "the whole (B,T) window per token, as llm.c's train_gpt2.c samples, and "
                         "with HF transformers' GPT2LMHeadModel.generate on the same weights "
                         "(where torch and transformers are installed).")
    c.add_argument("--model", default="d12", help="as train's --model: a preset (GPT-2's, or "
                   "llama-tiny, smollm2-135m, gemma3-270m), an llm.c .bin, an HF directory "
                   "(default: d12, GPT-2 124M with random weights)")
    s.add_argument("--model", default="d12", help="as sample's --model (default: d12, random "
                   "weights: the time per token does not depend on them)")
    c.add_argument("-b", "--batch-size", type=int, default=4, help="B (default: 4)")
    c.add_argument("-t", "--seq-len", type=int, default=64, help="T (default: 64)")
    s.add_argument("-b", "--batch-size", type=int, default=4,
                   help="B of the full recompute's forward pass, as llm.c samples at the "
                   "training shape (default: 4)")
    s.add_argument("-t", "--seq-len", type=int, default=64,
                   help="T of the full recompute's window, clamped to the model's maxT "
                   "(default: 64)")
    for q in (c, s):
        q.add_argument("--json", action="store_true", help="print the results as JSON")
    c.add_argument("--steps", type=int, default=5, help="timed steps (default: 5)")
    c.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: 1)")
    c.add_argument("--threads", type=int, default=0, help="threads (default: all cores)")
    c.add_argument("--impls", default=",".join(IMPLS),
                   help=f"what to time, of {','.join(IMPLS)} (default: all)")
    c.set_defaults(func=bench_cpu)
    s.add_argument("--tokens", type=int, default=64, help="tokens to generate (default: 64)")
    s.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    s.add_argument("--repeats", type=int, default=3, help="runs of the KV cache and of HF "
                   "generate, each side's fastest counts (default: 3)")
    s.add_argument("--backend", default="auto", help="backend (default: auto)")
    s.set_defaults(func=bench_sample)
