"""Your own corpus: .txt files (each file is a document) and .jsonl files (each record's "text"
is a document), EOT before every document, cut into shards named like llm.c's fineweb.py:
<name>_val_000000.bin, then <name>_train_000001.bin, ... (one index across both splits).
The val split is the first --val-fraction of the tokens."""
import json
import os
import re

from ...errors import LlmpyError
from ...io.files import ensure_dir
from ...io.hf_tokenizer import HFTokenizer
from .common import encode_documents, read_text, write_token_files


def read_documents(path):
    """A .jsonl file's records' "text" fields; any other file is one document."""
    text = read_text(path)
    if not path.endswith(".jsonl"):
        return [text]
    docs = []
    for i, line in enumerate(text.split("\n")):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LlmpyError(f"{path}: line {i + 1}: not valid JSON: {e.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise LlmpyError(f'{path}: line {i + 1}: no "text" string field')
            docs.append(record["text"])
    if not docs:
        raise LlmpyError(f"{path}: no records")
    return docs


def shard_path(out, name, split, index):
    """llm.c's fineweb.py shard names: one index across both splits."""
    return os.path.join(out, f"{name}_{split}_{index:06d}.bin")


def shard(tokens, n_val, shard_tokens, out, name):
    """[(path, tokens)]: val shards, then train shards, numbered in one sequence."""
    files = []
    for split, part in (("val", tokens[:n_val]), ("train", tokens[n_val:])):
        for start in range(0, part.size, shard_tokens):
            files.append((shard_path(out, name, split, len(files)),
                          part[start:start + shard_tokens]))
    return files


def remove_stale_shards(out, name, keep):
    """Shards of an earlier run with more shards would join a glob of this run's: remove them,
    and the .partial files (and their atomic writes' temporary files) of a killed run."""
    pattern = re.compile(re.escape(name) + r"_(val|train)_\d{6}\.bin(\.partial)?(\.\w+\.tmp)?")
    keep = {os.path.basename(p) for p in keep}
    for f in sorted(os.listdir(out)):
        if pattern.fullmatch(f) and f not in keep:
            os.remove(os.path.join(out, f))
            print(f"removed {os.path.join(out, f)}, left by an earlier run")


def prepro(files, out, val_fraction=0.1, shard_tokens=10 ** 8, name=None, workers=None,
           tokenizer=None):
    """tokenizer: a Hugging Face model directory (its tokenizer.json) instead of GPT-2's BPE;
    its tokens come as uint32 when its ids pass uint16's, and are written so (version 7)."""
    if not 0 <= val_fraction < 1:
        raise LlmpyError(f"--val-fraction {val_fraction}: must be at least 0 and below 1")
    if shard_tokens < 1:
        raise LlmpyError(f"--shard-tokens {shard_tokens}: must be positive")
    name = name or os.path.splitext(os.path.basename(files[0]))[0]
    tok = HFTokenizer(tokenizer) if tokenizer else None   # a bad directory fails first
    documents = [d for f in files for d in read_documents(f)]
    ensure_dir(out)
    tokens = tok.encode_documents(documents) if tok else encode_documents(documents, workers)
    n_val = int(val_fraction * tokens.size)
    if val_fraction > 0 and n_val == 0:
        raise LlmpyError(f"{files[0]}{' ...' if len(files) > 1 else ''}: {tokens.size:,} tokens "
                         f"are too few for --val-fraction {val_fraction} (val would get "
                         f"{n_val:,}, train {tokens.size - n_val:,})")
    written = shard(tokens, n_val, shard_tokens, out, name)
    write_token_files(written)
    remove_stale_shards(out, name, [p for p, _ in written])
    return [p for p, _ in written]
