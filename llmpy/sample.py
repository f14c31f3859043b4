"""Text generation: temperature and top-k sampling from the model's next-token distribution."""
import numpy as np

from .tokenizer import EOT


def sample_next(logits, rng, temperature=1.0, top_k=0):
    """logits: (V,) float host array -> one token id. temperature 0 means greedy."""
    logits = np.asarray(logits, dtype=np.float64)
    if temperature <= 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max())
    return int(rng.choice(p.size, p=p / p.sum()))


def generate_recompute(model, prompt, n, rng, temperature=1.0, top_k=0, T=None):
    """llm.c's way: re-run the forward pass over the whole window for every new token.
    Yields n token ids. Runs at the model's current (B,T) so no new activations are allocated."""
    cfg = model.config
    B = max(model.B, 1)
    T = T or model.T or min(cfg.max_seq_len, 64)
    seq = list(prompt) or [EOT]
    tokens = np.full((B, T), EOT, dtype=np.int64)                # (B,T), row 0 holds the text
    for _ in range(n):
        window = seq[-T:]
        tokens[0, :len(window)] = window
        model.forward(tokens)
        logits = model.backend.to_host(model.acts.logits[0, len(window) - 1, :cfg.vocab_size])
        nxt = sample_next(logits, rng, temperature, top_k)
        seq.append(nxt)
        yield nxt
