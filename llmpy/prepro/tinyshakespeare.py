"""Tiny Shakespeare, tokenized exactly as llm.c's dev/data/tinyshakespeare.py does."""
import os

from ..data import write_tokens
from ..errors import LlmpyError
from ..tokenizer import EOT, Tokenizer

VAL_TOKENS = 32768


def tokenize(text, tokenizer):
    """Split on blank lines, EOT before each section, "\\n\\n" re-appended to all but the last.
    Returns (val tokens, train tokens): the first 32,768 tokens are val."""
    sections = text.split("\n\n")
    tokens = []
    for i, s in enumerate(sections):
        tokens.append(EOT)
        tokens.extend(tokenizer.encode(s + "\n\n" if i < len(sections) - 1 else s))
    if len(tokens) <= VAL_TOKENS:
        raise LlmpyError(f"corpus has {len(tokens)} tokens, too few for a {VAL_TOKENS}-token "
                         "val split")
    return tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]


def write_split(text, out_dir, prefix="tiny_shakespeare", tokenizer=None):
    val, train = tokenize(text, tokenizer or Tokenizer())
    paths = [os.path.join(out_dir, f"{prefix}_{split}.bin") for split in ("val", "train")]
    write_tokens(paths[0], val)
    write_tokens(paths[1], train)
    return paths
