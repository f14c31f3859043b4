"""Tokenization throughput of `llmpy prepro tinyshakespeare` on the bundled 1.2 MB corpus, beside
plain single-process tiktoken encode_ordinary of the whole text, measured in the same run.

    python bench/bench_tokenize.py [--repeats 7]
"""
import argparse
import contextlib
import io
import os
import statistics
import subprocess
import tempfile
import time
from unittest import mock

from llmpy.data.loader import bundled_data, read_tokens
from llmpy.data.prepro import common
from llmpy.data.prepro.common import tokenizer
from llmpy.data.prepro.tinyshakespeare import prepro, tokenize


def timed(fn):
    """(wall seconds, fn's token count)."""
    t0 = time.perf_counter()
    n = fn()
    return time.perf_counter() - t0, n


def main_bench():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    path = bundled_data("shakespeare.txt")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    t0 = time.perf_counter()
    enc = tokenizer().encoding()   # built once per process; not part of the timings below
    build = time.perf_counter() - t0
    sections = text.split("\n\n")
    documents = [s + "\n\n" for s in sections[:-1]] + sections[-1:]   # llm.c's, see tokenize()
    out = tempfile.mkdtemp()

    def command():
        with contextlib.redirect_stdout(io.StringIO()):
            paths = prepro(path, out)
        return sum(read_tokens(p).size for p in paths)

    def forced_pool(workers):
        """tokenize() in a pool although the corpus is under MIN_WORK_CHARS per process."""
        with mock.patch.object(common, "MIN_WORK_CHARS", 1 << 16):
            return sum(map(len, tokenize(text, workers)))

    cases = [
        ("baseline: tiktoken encode_ordinary(whole text), 1 process",
         lambda: len(enc.encode_ordinary(text))),
        ("llm.c's loop: encode_ordinary per section, 1 process",
         lambda: sum(len(enc.encode_ordinary(d)) + 1 for d in documents)),
        ("llmpy tokenize(), 1 process", lambda: sum(map(len, tokenize(text, 1)))),
        ("llmpy tokenize(), forced pool of 2 processes", lambda: forced_pool(2)),
        ("llmpy prepro tinyshakespeare: read + tokenize + write, default --workers", command),
    ]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    print(f"corpus {len(text.encode()):,} bytes | {os.cpu_count()} cores | commit {commit} | "
          f"tokenizer build {build:.3f} s (once per process) | median of {args.repeats}, "
          "the cases interleaved so that load from other processes hits them alike")
    runs = [[timed(fn) for _, fn in cases] for _ in range(args.repeats)]
    base = None
    for i, (name, _) in enumerate(cases):
        seconds = statistics.median(r[i][0] for r in runs)
        n = runs[0][i][1]
        rate = n / seconds
        base = base or rate
        print(f"{name:70s} {n:8,} tok {seconds * 1e3:8.1f} ms {rate / 1e6:6.2f} M tok/s "
              f"{rate / base:5.2f}x")


if __name__ == "__main__":
    main_bench()
