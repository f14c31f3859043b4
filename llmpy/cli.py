"""`llmpy <subcommand>`: the command line. Bad input ends in one line on stderr and exit 1."""
import argparse
import sys
import textwrap

from . import __version__
from .backends import set_thread_env
from .bench import add_parsers as add_bench_parsers
from .data.prepro import add_parser as add_prepro_parser
from .errors import LlmpyError
from .train.signals import Stopped
from .train.config import (BACKEND_HELP, EMBEDDED_DEFAULT, MODEL_HELP, EvalConfig, TrainConfig,
                           add_arguments, check_range, from_arguments, require_positive)


def cmd_train(args):
    from .train.loop import train
    cfg, explicit = from_arguments(TrainConfig, args)
    train(cfg, explicit)


def cmd_eval(args):
    from .evals import evaluate
    evaluate(*from_arguments(EvalConfig, args))


def cmd_sample(args):
    import numpy as np
    from .backends import get_backend
    from .generate import generate_rows
    from .model.build import build_model, model_tokenizer, require_tokenizer, start_ids
    from .train.report import readable
    require_positive(args, "num_samples")
    for name in ("tokens", "temperature", "top_k", "seed"):
        check_range(name, getattr(args, name), least=0)
    model = build_model(args.model, get_backend(args.backend))
    if model.source.checkpoint:       # stderr: stdout is the text alone
        print(f"sampling from {model.source.checkpoint}", file=sys.stderr)
    tok = model_tokenizer(model) or require_tokenizer(model, f"sample --model {args.model}")
    prompt = start_ids(tok, tok.encode(args.prompt) if args.prompt else [])
    rng = np.random.default_rng(args.seed)
    try:          # checks the prompt, runs it and samples the first token: before any output
        rows = generate_rows(model, prompt, args.tokens, rng, args.num_samples,
                             args.temperature, args.top_k)
    except LlmpyError as e:
        raise LlmpyError(f"{args.model}: {e}") from None
    if args.num_samples > 1:          # all rows in the same decode steps, printed at the end
        rows = np.array(list(rows), dtype=np.int64).reshape(-1, args.num_samples)  # (tokens,N)
        for i, ids in enumerate(rows.T):
            print(f"--- sample {i + 1} ---\n{args.prompt}{readable(tok, ids.tolist())}")
        return
    sys.stdout.write(args.prompt)
    # the text of all the ids so far, printed as it grows: a SentencePiece tokenizer decodes a
    # token's leading space only after another token; tail, the output's last two characters
    out, shown, tail = [], "", args.prompt[-2:]
    for ids in rows:
        if int(ids[0]) == tok.eot:      # a document boundary: a blank line, not its name
            text = tok.decode(out)[len(shown):]
            tail = (tail + text)[-2:]
            sys.stdout.write(text + "\n" * (2 - (len(tail) - len(tail.rstrip("\n")))))
            out, shown, tail = [], "", "\n\n"
            continue
        out.append(int(ids[0]))
        text = tok.decode(out)
        if not text.endswith("\ufffd"):   # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            tail, shown = (tail + text[len(shown):])[-2:], text
    sys.stdout.write(tok.decode(out)[len(shown):] + "\n")


def cmd_plot(args):
    from .plot import plot
    plot(args.run_dir, args.out)


def cmd_convert(args):
    from .io.hf import convert
    convert(args.src, args.out, args.dtype, args.tokenizer)


def cmd_debug_state(args):
    from .debugstate import default_out, make_debug_state
    require_positive(args, "batch_size", "seq_len")
    make_debug_state(args.model, args.data, args.batch_size, args.seq_len,
                     args.out or default_out(args.model))


def cmd_test_model(args):
    from .backends import get_backend
    from .debugstate import TOL, check_model
    check_range("steps", args.steps, least=0)
    if args.tol is not None:
        check_range("tol", args.tol, least=0)
    check_model(args.model, args.state, get_backend(args.backend), args.steps,
                tol=TOL if args.tol is None else args.tol)


def cmd_bench_gpu(args):
    try:
        from .bench.gpu import bench_gpu
    except ImportError as e:
        raise LlmpyError(f"bench gpu needs torch, triton and a CUDA GPU: {e}") from None
    bench_gpu(args.model, args.batch_size, args.seq_len, args.steps, args.warmup, args.block,
              args.track_steps, args.dry_run, args.json)


def make_parser():
    p = argparse.ArgumentParser(prog="llmpy", description="GPT-2 training in simple, fast Python.")
    p.add_argument("--version", action="version", version=f"llmpy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    # wrapped here, as argparse would break a --flag-name at its hyphens
    t = sub.add_parser("train", help="train a GPT-2 (default: a small model on the bundled "
                       "Shakespeare)", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill(
                           "Train a GPT-2 with AdamW. With no --model and no --train-data, the "
                           "embedded default: a model trained from scratch, into a new run "
                           "directory runs/shakespeare-DATE-TIME, on the bundled Shakespeare, "
                           "with " + " ".join(f"--{k.replace('_', '-')}" + (
                               "" if v is True else f" {v}")
                               for k, v in EMBEDDED_DEFAULT.items())
                           + " in place of the defaults below, for the flags not given.",
                           width=78, break_on_hyphens=False))
    add_arguments(t, TrainConfig, short={"batch_size": "-b", "seq_len": "-t"})
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="a model's loss on token files and its HellaSwag accuracy",
                       description="Evaluate a model without training it: the mean loss (and "
                       "perplexity) over token files, HellaSwag accuracy, or both.")
    add_arguments(e, EvalConfig, short={"batch_size": "-b", "seq_len": "-t"})
    e.set_defaults(func=cmd_eval)

    s = sub.add_parser("sample", help="generate text from a model",
                       description="Generate text from a model (--model: an llm.c .bin, an HF "
                       "directory, a run directory, a hub name or a preset) with a KV cache. "
                       "--prompt needs tiktoken (pip install 'llmpy[data]').")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--prompt", default="", help="text to continue (default: start of document)")
    s.add_argument("--tokens", type=int, default=64,
                   help="tokens to generate (default: 64; 0 prints the prompt)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    s.add_argument("--num-samples", type=int, default=1,
                   help="continuations to sample, all in the same decode steps; more than one "
                   "are printed when done (default: 1, streamed)")
    s.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    s.add_argument("--backend", default="auto", help=BACKEND_HELP + " (default: auto)")
    s.set_defaults(func=cmd_sample)

    c = sub.add_parser("convert", help="Hugging Face GPT-2 <-> llm.c model .bin",
                       description="SRC an llm.c model .bin: write OUT as a Hugging Face model "
                       "directory. SRC an HF directory (config.json + model.safetensors or "
                       "pytorch_model.bin) or hub name (gpt2, gpt2-medium, ...): write OUT as an "
                       "llm.c model .bin.")
    c.add_argument("src", help="llm.c .bin, HF model directory, or HF hub name")
    c.add_argument("out", help="output .bin or directory")
    c.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="llm.c .bin precision: fp32 (version 3) or bf16 (version 5)")
    c.add_argument("--tokenizer", default="", metavar="PATH",
                   help="also write llm.c's tokenizer file (e.g. gpt2_tokenizer.bin) for the "
                   "GPT-2 vocabulary")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("debug-state", help="write llm.c's debug state with the PyTorch reference",
                       description="Run the PyTorch reference (torchref) on the first batch of "
                       "DATA and write llm.c's debug state: inputs, targets, logits, loss and "
                       "all gradients, for `llmpy test-model` or llm.c's test_gpt2.")
    d.add_argument("model", help="llm.c model .bin")
    d.add_argument("--data", default="", help="token .bin (default: the bundled Shakespeare val)")
    d.add_argument("-b", "--batch-size", type=int, default=4, help="B (default: 4)")
    d.add_argument("-t", "--seq-len", type=int, default=64, help="T (default: 64)")
    d.add_argument("--out", default="", help="output file (default: MODEL_debug_state.bin)")
    d.set_defaults(func=cmd_debug_state)

    m = sub.add_parser("test-model", help="check llm.py against a debug state (llm.c's test_gpt2)",
                       description="Forward and backward on the debug state's batch, compared "
                       "tensor by tensor, then AdamW steps (lr 1e-4, weight decay 0.01) compared "
                       "with the PyTorch reference's losses. Exit 1 on any FAIL.")
    m.add_argument("model", help=MODEL_HELP)
    m.add_argument("state", help="llm.c debug state .bin")
    m.add_argument("--backend", default="numpy", help="numpy, cpu or gpu (default: numpy)")
    m.add_argument("--steps", type=int, default=10,
                   help="AdamW steps to compare (default: 10; 0 needs no PyTorch)")
    m.add_argument("--tol", type=float, default=None,
                   help="OK when max|ours - ref| / max|ref| <= TOL per tensor (default: 1e-4)")
    m.set_defaults(func=cmd_test_model)

    add_prepro_parser(sub)

    pl = sub.add_parser("plot", help="plot a run's losses and HellaSwag accuracy (PNG)",
                        description="Train and val loss, and HellaSwag accuracy, against the "
                        "step, from RUN_DIR/log.jsonl (needs matplotlib: llmpy[plot]).")
    pl.add_argument("run_dir", help="a run directory (--run-dir), or a log .jsonl")
    pl.add_argument("--out", default=None, help="output PNG (default: RUN_DIR/plot.png)")
    pl.set_defaults(func=cmd_plot)

    b = sub.add_parser("bench", help="benchmarks, each against its baseline in the same run")
    bench = b.add_subparsers(dest="bench", required=True)
    add_bench_parsers(bench)
    g = bench.add_parser("gpu", help="training on the gpu backend vs PyTorch + torch.compile "
                         "(nanoGPT's GPT-2, transformers' Llama/Gemma), and flash attention vs "
                         "SDPA", description="Training throughput on the gpu backend beside the usual PyTorch "
                         "recipe (torch.compile, bf16 autocast, SDPA, fused AdamW: nanoGPT's "
                         "GPT-2, transformers' Llama/Gemma) from the same weights on the same "
                         "batches: ms/step, tokens/s, MFU and peak memory per side, each side's "
                         "kernel times, and flash attention against "
                         "F.scaled_dot_product_attention. Needs a CUDA GPU, torch and triton "
                         "(pip install '.[gpu]' beside a CUDA build of torch).")
    g.add_argument("--model", default="d12",
                   help="a GPT-2 preset (d6 ... d48, tiny), a decoder preset (llama-tiny, "
                        "smollm2-135m, llama-3.2-1b, gemma3-270m) or a Hugging Face model "
                        "directory (default: d12, GPT-2 124M's shape)")
    g.add_argument("-b", "--batch-size", type=int, nargs="+", default=None,
                   help="the batch sizes to try; the largest that fits runs (default: 64 32 16 "
                        "for GPT-2, 16 8 4 for the decoders)")
    g.add_argument("-t", "--seq-len", type=int, default=None,
                   help="T (default: 1024 for GPT-2, 2048 for the decoders)")
    g.add_argument("--steps", type=int, default=30,
                   help="timed steps per side (default: 30; under its power cap a GPU's clock "
                        "moves, and single steps by up to 10%%)")
    g.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    g.add_argument("--block", type=int, default=5,
                   help="timed steps a side in a row: the sides alternate by blocks "
                        "(default: 5)")
    g.add_argument("--track-steps", type=int, default=20,
                   help="steps of bf16 against float32 first, at B=4 T=256 (default: 20; 0: "
                        "none)")
    g.add_argument("--dry-run", action="store_true",
                   help="on the CPU in Triton's interpreter (TRITON_INTERPRET=1), at a tiny "
                        "shape of the model's family: a check of the benchmark, not a "
                        "measurement")
    g.add_argument("--json", action="store_true", help="print the results as JSON")
    g.set_defaults(func=cmd_bench_gpu)
    return p


def main(argv=None):
    set_thread_env()                  # the process starts here: before any backend loads
    args = make_parser().parse_args(argv)
    # Sampled text can hold any character; a console or file whose encoding lacks one (cp1252
    # on Windows, when redirected) shows a replacement instead of ending the run.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    try:
        args.func(args)
    except LlmpyError as e:
        print(f"llmpy: error: {e}", file=sys.stderr)
        return 1
    except Stopped as e:              # a preempted run, after its checkpoint
        print(f"llmpy: {e}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("llmpy: interrupted", file=sys.stderr)
        return 130
    return 0
