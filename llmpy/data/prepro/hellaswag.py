"""HellaSwag -> llm.c's eval file, tokenized as llm.c's dev/data/hellaswag.py does it:
the context `ctx`, then each of the 4 endings with a space in front (GPT-2's BPE)."""
import json
import os

from ...errors import LlmpyError
from ...evals import NUM_COMPLETIONS, write_evalfile
from ...io.files import ensure_dir
from .common import fetch, progress, read_text, tokenizer

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("val", "train")   # the test split has no labels


def check(example):
    """Why a jsonl record is not a HellaSwag example that llm.c's eval file can hold, or None."""
    if not isinstance(example, dict):
        return "not a JSON object"
    ctx, label, endings = (example.get(k) for k in ("ctx", "label", "endings"))
    if not isinstance(ctx, str) or not ctx:
        return '"ctx" is not a non-empty string'
    if type(label) is not int or not 0 <= label < NUM_COMPLETIONS:
        return f"label {label!r} not in 0..{NUM_COMPLETIONS - 1}"
    if not (isinstance(endings, list) and len(endings) == NUM_COMPLETIONS and
            all(isinstance(e, str) and e for e in endings)):
        return f'"endings" is not a list of {NUM_COMPLETIONS} non-empty strings'
    return None


def render(example, tok):
    """One checked jsonl record -> (label, context tokens, [ending tokens] * 4)."""
    ctx = tok.encode(example["ctx"])
    return example["label"], ctx, [tok.encode(" " + e) for e in example["endings"]]


def prepro(input=None, out="hellaswag", split="val"):
    """Write OUT/hellaswag_{split}.bin from a jsonl file (default: download the split)."""
    if split not in SPLITS:
        raise LlmpyError(f"unknown HellaSwag split {split!r} (choose from {', '.join(SPLITS)})")
    input = input or fetch(URL.format(split=split), out, f"hellaswag_{split}.jsonl")
    ensure_dir(out)
    lines = [(i + 1, line) for i, line in enumerate(read_text(input).splitlines())
             if line.strip()]
    if not lines:
        raise LlmpyError(f"{input}: no HellaSwag records")
    tok = tokenizer()
    examples = []
    with progress(total=len(lines), desc="HellaSwag", unit="example") as bar:
        for n, line in lines:
            try:
                example = json.loads(line)
            except ValueError as e:
                raise LlmpyError(f"{input}: line {n} is not JSON: {e}") from None
            problem = check(example)
            if problem:
                raise LlmpyError(f"{input}: line {n}: {problem}")
            examples.append(render(example, tok))
            bar.update()
    path = os.path.join(out, f"hellaswag_{split}.bin")
    print(f"writing {len(examples):,} examples to {path}")
    write_evalfile(path, examples)
    return path
