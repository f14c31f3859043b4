"""Text generation: temperature and top-k sampling from the model's next-token distribution.

generate() keeps a KV cache: every position stores its keys and values once, and each new token
runs one position through the network, attending to the cache: the model's decoder (GPT2's and
Llama's `decoder(max_len, rows)`, whose `step(tokens, pos)` gives the next-token logits).
generate_rows() samples several continuations in the same steps. generate_recompute() is
llm.c's way, a forward pass over the whole window per token, kept as the benchmark's baseline.
"""
import sys

import numpy as np

from .backends import host_ops
from .errors import LlmpyError
from .io.tokenizer import EOT


def sample_next(logits, rng, temperature=1.0, top_k=0):
    """logits: (V,) float host array -> one token id. temperature 0 means greedy."""
    logits = np.asarray(logits, dtype=np.float64)
    if not np.isfinite(logits).all():
        raise LlmpyError("the model's logits are not finite (NaN or inf weights?)")
    if temperature <= 0:
        return int(np.argmax(logits))
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    # scaled after subtracting the max: logits / a tiny temperature would overflow to inf;
    # this way only the unlikeliest go to -inf, and exp makes them 0
    with np.errstate(over="ignore"):
        p = np.exp((logits - logits.max()) / temperature)
    return int(rng.choice(p.size, p=p / p.sum()))


def sample_rows(logits, rng, temperature, top_k):
    """logits: (rows,V) -> (rows,) token ids, one sample_next per row."""
    return np.array([sample_next(row, rng, temperature, top_k) for row in logits])


def generate_rows(model, prompt, n, rng, rows, temperature=1.0, top_k=0):
    """An iterator of n (rows,) arrays of token ids: `rows` continuations of the same prompt,
    sampled independently, one cached decode step for all of them. The prompt and the new
    tokens must fit in the model's max_seq_len (a cache cannot slide: positions are baked into
    it). The checks, the prompt's steps and the first sample happen before it returns, so that
    bad input fails before any output."""
    seq = list(prompt) or [EOT]
    model.check_tokens(np.array([seq]), "prompt" if prompt else "the start (<|endoftext|>)")
    if n <= 0:
        return iter(())
    maxT = model.config.max_seq_len
    if len(seq) + n - 1 > maxT:
        raise LlmpyError(f"the prompt ({len(seq)} tokens) and {n} new tokens do not fit in the "
                         f"model's max_seq_len {maxT}")
    ops = host_ops(model.backend)
    if ops is not model.backend:      # said, as it is slower than the model's own device
        print(f"sampling: the decode step runs on the host with the {ops.name} backend, on a "
              f"copy of the {model.backend.name} backend's weights", file=sys.stderr)
    try:
        decoder = model.decoder(len(seq) + n - 1, rows, ops)   # the last token is never run
    except MemoryError:
        raise LlmpyError(f"{rows} rows of {len(seq) + n - 1} positions: the KV cache does not "
                         "fit in memory") from None
    for pos, tok in enumerate(seq[:-1]):
        decoder.step(np.full(rows, tok), pos, logits=False)
    logits = decoder.step(np.full(rows, seq[-1]), len(seq) - 1)     # (rows,V)
    first = sample_rows(logits, rng, temperature, top_k)
    return decode(decoder, first, len(seq), n, rng, temperature, top_k)


def decode(decoder, nxt, pos, n, rng, temperature, top_k):
    """generate_rows' tokens: nxt (rows,), sampled for position pos, then n - 1 more."""
    yield nxt
    for i in range(1, n):
        logits = decoder.step(nxt, pos + i - 1)                     # (rows,V)
        nxt = sample_rows(logits, rng, temperature, top_k)
        yield nxt


def generate(model, prompt, n, rng, temperature=1.0, top_k=0):
    """An iterator of n token ids: one continuation of the prompt (generate_rows with one
    row, checked at once as it is)."""
    return (int(ids[0]) for ids in generate_rows(model, prompt, n, rng, 1, temperature, top_k))


def generate_recompute(model, prompt, n, rng, temperature=1.0, top_k=0, T=None):
    """llm.c's way: re-run the forward pass over the whole window for every new token.
    Yields n token ids. Runs at the model's current (B,T) so no new activations are allocated."""
    cfg = model.config
    B = max(model.B, 1)
    T = T or model.T or min(cfg.max_seq_len, 64)
    seq = list(prompt) or [EOT]
    # (B,T), row 0 holds the text; the padding after it is never attended to (causal mask)
    tokens = np.zeros((B, T), dtype=np.int64)
    for _ in range(n):
        window = seq[-T:]
        tokens[0, :len(window)] = window
        model.forward(tokens)
        logits = model.backend.to_host(model.acts.logits[0, len(window) - 1, :cfg.vocab_size])
        nxt = sample_next(logits, rng, temperature, top_k)
        seq.append(nxt)
        yield nxt
