"""Tiny Shakespeare, tokenized exactly as llm.c's dev/data/tinyshakespeare.py does."""
import os

from ...errors import LlmpyError
from ...io.files import ensure_dir
from .common import encode_documents, fetch, read_text, write_token_files

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
VAL_TOKENS = 32768


def tokenize(text, workers=1, source="text"):
    """Every section between blank lines is a document with EOT before it; llm.c keeps the "\\n\\n"
    at the end of all but the last section (for compatibility with its first version).
    Returns (val tokens, train tokens): the first 32,768 tokens are val."""
    sections = text.split("\n\n")
    tokens = encode_documents([s + "\n\n" for s in sections[:-1]] + sections[-1:], workers)
    if tokens.size <= VAL_TOKENS:
        raise LlmpyError(f"{source}: {tokens.size:,} tokens are too few for the "
                         f"{VAL_TOKENS:,}-token val split and a train split")
    return tokens[:VAL_TOKENS], tokens[VAL_TOKENS:]


def write_split(text, out_dir, prefix="tiny_shakespeare", workers=1, source="text"):
    val, train = tokenize(text, workers, source)
    paths = [os.path.join(out_dir, f"{prefix}_{split}.bin") for split in ("val", "train")]
    write_token_files([(paths[0], val), (paths[1], train)])
    return paths


def prepro(input=None, out="tinyshakespeare", workers=None):
    """Tokenize a text file, or without one download llm.c's tinyshakespeare into out first."""
    input = input or fetch(URL, out, "tiny_shakespeare.txt")
    text = read_text(input)
    return write_split(text, ensure_dir(out), workers=workers, source=input)
