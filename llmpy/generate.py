"""Text generation: temperature and top-k sampling from the model's next-token distribution.

generate() keeps a KV cache: every position stores its keys and values once, and each new token
runs one position through the network, attending to the cache. generate_rows() samples several
continuations in the same steps. generate_recompute() is llm.c's way, a forward pass over the
whole window per token, kept as the benchmark's baseline.
"""
import math

import numpy as np

from .backends import get_backend
from .backends import numpy as ref
from .errors import LlmpyError
from .model.layout import FlatTensors
from .model.gpt2 import param_shapes
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


class Decoder:
    """Runs one position at a time for `rows` sequences with a KV cache, on the host, with the
    model's backend ops (where the backend's arrays are not host arrays, as on a GPU, the
    fastest CPU backend's). One position reads every weight once for two FLOPs each per row, so
    a step is bound by memory bandwidth, not by arithmetic, and a few rows cost about what one
    does. The weights are views of the model's parameters on the CPU backends (a host copy on a
    GPU)."""

    def __init__(self, model, max_len, rows=1):
        cfg = model.config
        C, NH, L, N = cfg.channels, cfg.num_heads, cfg.num_layers, rows
        host = model.backend.to_host(model.params.buf)          # (num_params,) float32
        self.params = FlatTensors(param_shapes(cfg), lambda n: host)
        self.ops = model.backend if host is model.params.buf else get_backend("auto")
        self.config = cfg
        self.k = np.zeros((L, N, NH, max_len, C // NH), np.float32)   # (L,N,NH,maxlen,hs) keys
        self.v = np.zeros((L, N, NH, max_len, C // NH), np.float32)   # (L,N,NH,maxlen,hs) values
        # one position's activations: the model's layout with B*T = N rows
        self.acts = FlatTensors([
            ("residual", (N, C)), ("ln", (N, C)), ("mean", (N,)), ("rstd", (N,)),
            ("qkv", (N, 3 * C)), ("atty", (N, C)), ("proj", (N, C)),
            ("fch", (N, 4 * C)), ("fch_gelu", (N, 4 * C)),
            ("logits", (N, cfg.vocab_size))], ref.zeros)

    def attention(self, l, pos):
        """The reference attention for each row's query at `pos`, against its cached positions
        0..pos; stores this position's keys and values first."""
        a, NH = self.acts, self.config.num_heads
        N = a.qkv.shape[0]
        q, k, v = a.qkv.reshape(N, 3, NH, -1).transpose(1, 0, 2, 3)   # each (N,NH,hs)
        self.k[l, :, :, pos], self.v[l, :, :, pos] = k, v
        keys, values = self.k[l, :, :, :pos + 1], self.v[l, :, :, :pos + 1]  # (N,NH,pos+1,hs)
        att = (keys @ q[..., None])[..., 0]                     # (N,NH,pos+1)
        att *= 1.0 / math.sqrt(q.shape[-1])
        att -= att.max(axis=-1, keepdims=True)
        np.exp(att, out=att)
        att /= att.sum(axis=-1, keepdims=True)
        a.atty[:] = (att[..., None, :] @ values).reshape(N, -1)    # (N,NH,1,hs) -> (N,C)

    def step(self, tokens, pos, logits=True):
        """Run `tokens` (one per row) at position `pos`: the next-token logits (N,V), or None
        if not wanted (the prompt's tokens only need to fill the cache)."""
        p, a, ops = self.params, self.acts, self.ops
        L, V = self.config.num_layers, self.config.vocab_size
        x = a.residual                                          # (N,C) the residual stream
        np.add(p.wte[tokens], p.wpe[pos], out=x)
        for l in range(L):
            ops.layernorm_forward(a.ln, a.mean, a.rstd, x, p.ln1w[l], p.ln1b[l])
            ops.matmul_forward(a.qkv, a.ln, p.qkvw[l], p.qkvb[l])
            self.attention(l, pos)
            ops.matmul_forward(a.proj, a.atty, p.attprojw[l], p.attprojb[l])
            ops.residual_forward(x, x, a.proj)
            ops.layernorm_forward(a.ln, a.mean, a.rstd, x, p.ln2w[l], p.ln2b[l])
            ops.matmul_forward(a.fch, a.ln, p.fcw[l], p.fcb[l])
            ops.gelu_forward(a.fch_gelu, a.fch)
            ops.matmul_forward(a.proj, a.fch_gelu, p.fcprojw[l], p.fcprojb[l])
            ops.residual_forward(x, x, a.proj)
        if not logits:
            return None
        ops.layernorm_forward(a.ln, a.mean, a.rstd, x, p.lnfw, p.lnfb)
        ops.matmul_forward(a.logits, a.ln, p.wte[:V], None)    # tied classifier weights
        return a.logits


def make_decoder(model, max_len, rows=1):
    """The model's KV-cache decoder: Decoder for GPT-2, model/llama.py's for the Llama/Gemma
    decoder (grouped kv heads, rope, sliding windows in a ring)."""
    from .model.llama import Decoder as LlamaDecoder, Llama
    return (LlamaDecoder if isinstance(model, Llama) else Decoder)(model, max_len, rows)


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
    try:
        decoder = make_decoder(model, len(seq) + n - 1, rows)   # the last new token: never run
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
