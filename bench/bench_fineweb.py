"""`llmpy prepro fineweb` beside llm.c's dev/data/fineweb.py on a synthetic FineWeb-like parquet
corpus, in the same run: wall time, tokens/s and peak memory of each, and that both write the
same shards byte for byte.

    python bench/bench_fineweb.py [--mb 40] [--shard-tokens 1000000] [--repeats 3] [--json]

The baseline is llm.c's main loop as it is (a Pool of cpu_count - 2 processes, at least 1;
pool.imap(tokenize, documents, chunksize=16); a preallocated uint16 shard), with two changes:
the documents are read from the parquet files' "text" column with pyarrow, not with
`datasets.load_dataset` (not installed here, and it needs the network; it would also convert the
files to an Arrow cache first, and hand over every column of every row), and it has no tqdm bar
(ours shows none either when stderr is not a terminal). It runs again with a process per core,
as cores - 2 leaves one process on a small machine. Ours is the command itself, default
--workers. Each case is a fresh subprocess (interpreter start and imports included, as a user
waits for them); the cases are interleaved, and the median of --repeats is reported.
Peak memory is the process tree's: the sum of its processes' PSS (resident memory, pages shared
by forked workers counted once), sampled every SAMPLE_S seconds from /proc (Linux; else n/a).
"""
import argparse
import filecmp
import json
import math
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from llmpy.bench import load_average, shown
from llmpy.data.loader import DATA_MAGIC, DATA_VERSION, bundled_data, read_tokens
from llmpy.data.prepro.common import tokenizer
from llmpy.data.prepro.fineweb import documents as parquet_documents, find_files, pyarrow
from llmpy.data.prepro.text import shard_path

# seconds between memory samples: reading smaps_rollup costs ~2 ms a process, and sampling
# every 0.05 s took 10% of a core from the cases being measured
SAMPLE_S = 0.2
ROW_GROUP = 1000   # rows: datatrove's ParquetWriter default (datatrove wrote FineWeb)
NON_ASCII = ["Straße, naïve café, São Paulo. ", "日本語のテキストです。", " — “quoted” … ",
             "Привет, мир! ", "emoji 🙂🚀 ", "\u00a0non-breaking\u00a0spaces\u00a0"]


# ----------------------------------------------------------------------------- the corpus

def make_documents(text, n_chars, rng):
    """FineWeb-like documents of n_chars characters in all: slices of text at random places, of
    lognormal lengths (median 2,000 characters, mean ~3,300, clipped to 200..50,000), a tenth of
    them with a non-ASCII snippet inside."""
    docs, n = [], 0
    while n < n_chars:
        size = int(min(50_000, max(200, rng.lognormvariate(math.log(2000), 1.0))))
        start = rng.randrange(len(text) - size)
        doc = text[start:start + size]
        if rng.random() < 0.1:
            at = rng.randrange(len(doc))
            doc = doc[:at] + rng.choice(NON_ASCII) + doc[at:]
        docs.append(doc)
        n += len(doc)
    return docs


def corpus(mb, files=4, seed=0):
    """A directory of `files` parquet files holding about `mb` MB of text in a "text" column
    (with an "id" column beside it, as FineWeb has), cached in the temp directory."""
    folder = os.path.join(tempfile.gettempdir(), f"llmpy_bench_fineweb_{mb:g}mb_{seed}")
    if os.path.isdir(folder):
        return folder
    pa = pyarrow()
    with open(bundled_data("shakespeare.txt"), encoding="utf-8") as f:
        text = f.read()
    docs = make_documents(text, int(mb * 1e6), random.Random(seed))
    tmp = tempfile.mkdtemp(dir=tempfile.gettempdir())
    per_file = -(-len(docs) // files)
    for i in range(0, len(docs), per_file):
        rows = docs[i:i + per_file]
        table = pa.table({"id": [f"<urn:uuid:{j}>" for j in range(i, i + len(rows))],
                          "text": rows})
        pa.parquet.write_table(table, os.path.join(tmp, f"{i // per_file:03d}_00000.parquet"),
                               row_group_size=ROW_GROUP, compression="snappy")
    os.replace(tmp, folder)   # atomic: a cached corpus is always whole
    return folder


# ----------------------------------------------------------------------------- the baseline

def llmc_tokenize(doc):
    """llm.c's tokenize(doc): EOT + the text's ordinary tokens, checked to fit uint16."""
    tok = tokenizer()   # llm.c's module-level enc; built once per process (fork or spawn)
    tokens = [tok.eot]
    tokens.extend(tok.encoding().encode_ordinary(doc["text"]))
    tokens_np = np.array(tokens)
    assert (0 <= tokens_np).all() and (tokens_np < 2 ** 16).all(), "token dictionary too large"
    return tokens_np.astype(np.uint16)


def llmc_write_datafile(path, tokens):
    """llm.c's data_common.write_datafile for GPT-2: a 256-int32 header, then the uint16 tokens."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = DATA_MAGIC, DATA_VERSION, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


def llmc_fineweb(folder, out, shard_size, procs):
    """llm.c's main loop, documents read from folder's parquet files in name order."""
    pa = pyarrow()
    # the rows as datasets yields them: dicts (of "text" only; datasets gives every column)
    fw = ({"text": t} for t in parquet_documents(pa, find_files([folder])))
    os.makedirs(out, exist_ok=True)
    tokenizer()   # llm.c's module-level enc: built before the pool, so forked workers share it
    with multiprocessing.Pool(procs) as pool:
        shard_index = 0
        all_tokens_np = np.empty((shard_size,), dtype=np.uint16)   # (shard_size,) this shard
        token_count = 0
        for tokens in pool.imap(llmc_tokenize, fw, chunksize=16):
            if token_count + len(tokens) < shard_size:
                all_tokens_np[token_count:token_count + len(tokens)] = tokens
                token_count += len(tokens)
            else:   # fill the shard, write it, the document's rest starts the next one
                split = "val" if shard_index == 0 else "train"
                remainder = shard_size - token_count
                all_tokens_np[token_count:token_count + remainder] = tokens[:remainder]
                llmc_write_datafile(shard_path(out, "fineweb", split, shard_index), all_tokens_np)
                shard_index += 1
                all_tokens_np[0:len(tokens) - remainder] = tokens[remainder:]
                token_count = len(tokens) - remainder
        if token_count != 0:
            split = "val" if shard_index == 0 else "train"
            llmc_write_datafile(shard_path(out, "fineweb", split, shard_index),
                                all_tokens_np[:token_count])


# ----------------------------------------------------------------------------- measuring

def tree_memory_mb(root):
    """(sum of PSS, sum of RSS) in MB over root and its descendants, from /proc (a process that
    ends while being read adds what was read of it)."""
    pss = rss = 0
    todo = [root]
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:                    # "Pss:   1504 kB"
                    if line.startswith(("Pss:", "Rss:")):
                        kb = int(line.split()[1])
                        pss, rss = (pss + kb, rss) if line[0] == "P" else (pss, rss + kb)
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return pss / 1024, rss / 1024


def measured(cmd):
    """Run cmd; (wall seconds, peak tree PSS MB, peak tree RSS MB, the sampler's CPU seconds).
    The memory is None where /proc has no smaps_rollup."""
    sampling = os.path.exists("/proc/self/smaps_rollup")
    peak = [0.0, 0.0, 0.0]          # PSS, RSS, sampler CPU seconds
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def sample():
        c0 = time.thread_time()
        while proc.poll() is None:
            pss, rss = tree_memory_mb(proc.pid)
            peak[0], peak[1] = max(peak[0], pss), max(peak[1], rss)
            time.sleep(SAMPLE_S)
        peak[2] = time.thread_time() - c0

    sampler = threading.Thread(target=sample) if sampling else None
    if sampler:
        sampler.start()
    err = proc.communicate()[1]
    seconds = time.perf_counter() - t0
    if sampler:
        sampler.join()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{err}")
    return seconds, *(peak[:2] if sampling else (None, None)), peak[2]


def bench_cases(folder, shard_tokens):
    """(name, command) of each case; the first is llm.c's as it is, the reference for the bytes."""
    cores = os.cpu_count() or 1
    llmc = [sys.executable, os.path.abspath(__file__), "--input", folder, "--shard-tokens",
            str(shard_tokens)]
    procs = max(1, cores - 2)
    cases = [(f"llm.c's loop, Pool({procs}) (cores - 2)", llmc + ["--llmc-procs", str(procs)])]
    if cores != procs:
        cases.append((f"llm.c's loop, Pool({cores}) (all cores)",
                      llmc + ["--llmc-procs", str(cores)]))
    cases.append(("llmpy prepro fineweb, default --workers",
                  [sys.executable, "-m", "llmpy", "prepro", "fineweb", "--input", folder,
                   "--shard-tokens", str(shard_tokens)]))
    return cases


def same_shards(a, b):
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and \
        all(filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False) for n in names)


def run_cases(cases, repeats, work):
    """{name: [measured(...) of each repeat]}, the cases interleaved. The first run, llm.c's as it
    is, writes work/reference; every other run's shards must equal those."""
    reference = os.path.join(work, "reference")
    runs = {name: [] for name, _ in cases}
    for _ in range(repeats):
        for name, cmd in cases:
            out = os.path.join(work, "out") if os.path.isdir(reference) else reference
            runs[name].append(measured(cmd + ["--out", out]))
            if out != reference:
                if not same_shards(reference, out):
                    sys.exit(f"{name}: its shards differ from llm.c's ({out}, {reference})")
                shutil.rmtree(out)
    return runs, sorted(os.path.join(reference, f) for f in os.listdir(reference))


def run_all(args):
    folder = corpus(args.mb)
    text_bytes = sum(len(t.encode()) for t in parquet_documents(pyarrow(), find_files([folder])))
    cases = bench_cases(folder, args.shard_tokens)
    load_before = load_average()
    with tempfile.TemporaryDirectory() as work:
        runs, shards = run_cases(cases, args.repeats, work)
        tokens = sum(read_tokens(p).size for p in shards)
    result = {"corpus": {"folder": folder, "files": len(os.listdir(folder)),
                         "text_bytes": text_bytes, "tokens": tokens, "shards": len(shards),
                         "shard_tokens": args.shard_tokens},
              "cores": os.cpu_count(), "repeats": args.repeats, "same_bytes": True,
              "load_average_1min": {"before": load_before, "after": load_average()},
              "cases": {}}
    for name, _ in cases:
        seconds, pss, rss, sampler = zip(*runs[name])
        median = statistics.median(seconds)
        result["cases"][name] = {
            "seconds": list(seconds), "median_s": median, "tokens_per_s": tokens / median,
            "peak_tree_pss_mb": None if pss[0] is None else statistics.median(pss),
            "peak_tree_rss_mb": None if rss[0] is None else statistics.median(rss),
            "sampler_cpu_s": statistics.median(sampler)}
    ours = result["cases"][cases[-1][0]]
    result["ours_over_baseline"] = {
        name: {"seconds": ours["median_s"] / c["median_s"],
               "tokens_per_s": ours["tokens_per_s"] / c["tokens_per_s"],
               "peak_tree_pss": None if c["peak_tree_pss_mb"] is None
               else ours["peak_tree_pss_mb"] / c["peak_tree_pss_mb"]}
        for name, c in list(result["cases"].items())[:-1]}
    return result


def report(r):
    c = r["corpus"]
    load = r["load_average_1min"]
    print(f"corpus {c['text_bytes']:,} bytes of text in {c['files']} parquet files "
          f"({c['folder']}) -> {c['tokens']:,} tokens in {c['shards']} shards of "
          f"{c['shard_tokens']:,} | {r['cores']} cores | load {shown(load['before'], '.2f')} "
          f"-> {shown(load['after'], '.2f')} | median of {r['repeats']} | "
          f"shards byte-identical: {r['same_bytes']}")
    print(f"{'case':44s} {'wall':>8s} {'tokens/s':>10s} {'peak tree PSS':>14s}")
    for name, x in r["cases"].items():
        print(f"{name:44s} {x['median_s']:7.2f}s {x['tokens_per_s'] / 1e6:8.2f} M "
              f"{shown(x['peak_tree_pss_mb'], '11.0f'):>11s} MB")
    for name, x in r["ours_over_baseline"].items():
        print(f"ours / {name}: time {x['seconds']:.2f}x, tokens/s {x['tokens_per_s']:.2f}x, "
              f"peak memory {shown(x['peak_tree_pss'], '.2f')}x")


def main_bench():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=40, help="MB of text (default: %(default)s)")
    ap.add_argument("--shard-tokens", type=int, default=10 ** 6,
                    help="tokens per shard (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    # one run of llm.c's loop, in this subprocess (how run_all starts the baseline)
    ap.add_argument("--llmc-procs", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.llmc_procs:
        llmc_fineweb(args.input, args.out, args.shard_tokens, args.llmc_procs)
        return
    r = run_all(args)
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        report(r)


if __name__ == "__main__":
    main_bench()
