"""HellaSwag -> llm.c's eval file, tokenized as llm.c's dev/data/hellaswag.py does it:
the context `ctx`, then each of the 4 endings with a space in front (GPT-2's BPE)."""
import json
import os

from ..errors import LlmpyError
from ..evals import write_evalfile
from ..files import ensure_dir
from .common import download, progress, read_text, tokenizer

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
SPLITS = ("val", "train")   # the test split has no labels


def render(example, tok):
    """One jsonl record -> (label, context tokens, [ending tokens] * 4)."""
    ctx = tok.encode(example["ctx"])
    return int(example["label"]), ctx, [tok.encode(" " + e) for e in example["endings"]]


def prepro(input=None, out="hellaswag", split="val"):
    """Write OUT/hellaswag_{split}.bin from a jsonl file (default: download the split)."""
    if split not in SPLITS:
        raise LlmpyError(f"unknown HellaSwag split {split!r} (choose from {', '.join(SPLITS)})")
    ensure_dir(out)
    if not input:
        input = os.path.join(out, f"hellaswag_{split}.jsonl")
        if os.path.exists(input):
            print(f"{input} already exists, skipping the download")
        else:
            download(URL.format(split=split), input)
    lines = [line for line in read_text(input).splitlines() if line.strip()]
    tok = tokenizer()
    examples = []
    with progress(total=len(lines), desc="HellaSwag", unit="example") as bar:
        for i, line in enumerate(lines):
            try:
                examples.append(render(json.loads(line), tok))
            except (ValueError, KeyError, TypeError) as e:
                raise LlmpyError(f"{input}: line {i + 1} is not a HellaSwag record: "
                                 f"{e!r}") from None
            bar.update()
    path = os.path.join(out, f"hellaswag_{split}.bin")
    print(f"writing {len(examples):,} examples to {path}")
    write_evalfile(path, examples)
    return path
