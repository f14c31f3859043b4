"""`llmpy <subcommand>`: the command line. Bad input ends in one line on stderr and exit 1."""
import argparse
import sys

from .config import TrainConfig, add_arguments, from_arguments
from .errors import LlmpyError


def cmd_train(args):
    from .train import train
    cfg, explicit = from_arguments(TrainConfig, args)
    train(cfg, explicit)


def cmd_sample(args):
    import numpy as np
    from .backends import get_backend
    from .sample import generate_recompute
    from .tokenizer import Tokenizer
    from .train import build_model
    model = build_model(args.model, get_backend(args.backend))
    tok = Tokenizer()
    prompt = tok.encode(args.prompt) if args.prompt else []
    T = min(model.config.max_seq_len, len(prompt) + args.tokens)
    rng = np.random.default_rng(args.seed)
    sys.stdout.write(args.prompt)
    out = []
    for t in generate_recompute(model, prompt, args.tokens, rng, args.temperature, args.top_k, T):
        out.append(t)
        text = tok.decode(out)
        if not text.endswith("\ufffd"):   # wait for the rest of a multi-byte character
            sys.stdout.write(text)
            sys.stdout.flush()
            out = []
    sys.stdout.write(tok.decode(out) + "\n")


def make_parser():
    p = argparse.ArgumentParser(prog="llmpy", description="GPT-2 training in simple, fast Python.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a GPT-2 (default: a small model on the bundled "
                                     "Shakespeare)", description="Train a GPT-2 with AdamW.")
    add_arguments(t, TrainConfig, short={"batch_size": "-b", "seq_len": "-t"})
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="generate text from a model .bin",
                       description="Generate text from an llm.c model file.")
    s.add_argument("--model", required=True, help="llm.c model .bin")
    s.add_argument("--prompt", default="", help="text to continue (default: start of document)")
    s.add_argument("--tokens", type=int, default=64, help="tokens to generate (default: 64)")
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1.0)")
    s.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0 = all)")
    s.add_argument("--seed", type=int, default=1337, help="sampling seed (default: 1337)")
    s.add_argument("--backend", default="numpy", help="numpy, cpu or gpu (default: numpy)")
    s.set_defaults(func=cmd_sample)
    return p


def main(argv=None):
    args = make_parser().parse_args(argv)
    try:
        args.func(args)
    except LlmpyError as e:
        print(f"llmpy: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("llmpy: interrupted", file=sys.stderr)
        return 130
    return 0
