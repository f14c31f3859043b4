"""What the prepro commands share: reading and downloading text, encoding documents in parallel
processes with a progress bar, and writing token files all or nothing."""
import collections
import functools
import multiprocessing
import os
import re
import urllib.request

import numpy as np

from ..loader import write_tokens
from ...errors import LlmpyError
from ...io.files import ensure_dir
from ...io.tokenizer import EOT_TEXT, Tokenizer

MIN_WORK_CHARS = 1 << 20   # a process pool pays off only when each process gets this much text
# A streamed work item: tiktoken returns its tokens as a Python list (~12 MB per MiB of text)
# before they become uint16, so smaller items keep each process smaller, at no speed cost
# (bench/bench_fineweb.py's measurements are in bench/RESULTS.md).
STREAM_ITEM_CHARS = 1 << 18


def progress(**kwargs):
    """A tqdm progress bar on stderr; hidden when stderr is not a terminal."""
    try:
        from tqdm import tqdm
    except ImportError:
        raise LlmpyError("prepro needs tqdm: pip install 'llmpy[data]'") from None
    return tqdm(disable=None, **kwargs)


def read_bytes(path):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise LlmpyError(f"{path}: no such file") from None
    except OSError as e:
        raise LlmpyError(f"{path}: cannot read: {e.strerror}") from None
    if not data:
        raise LlmpyError(f"{path}: empty file")
    return data


def read_text(path):
    """A file's text exactly as llm.c's scripts get it from open(path).read(): UTF-8 with
    universal newlines."""
    data = read_bytes(path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmpyError(f"{path}: not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset "
                         f"{e.start}") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def download(url, path):
    """Download url to path with a progress bar, through a temporary name so that an interrupted
    download never looks complete."""
    print(f"downloading {url} to {path}")
    tmp = path + ".part"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f, \
                progress(desc=os.path.basename(path), total=int(r.headers.get("Content-Length") or 0)
                         or None, unit="B", unit_scale=True, unit_divisor=1024) as bar:
            while chunk := r.read(1 << 20):
                bar.update(f.write(chunk))
        os.replace(tmp, path)
    except OSError as e:   # urllib's URLError and HTTPError are OSErrors
        raise LlmpyError(f"{url}: download failed: {getattr(e, 'reason', None) or e}; "
                         "offline, pass a local copy with --input FILE (and llmpy train "
                         "--train-data shakespeare --val-data shakespeare trains on the "
                         "bundled Shakespeare, llm.c's Tiny Shakespeare split)") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch(url, out, filename):
    """out/filename, downloaded from url unless it is already there (as llm.c's scripts do).
    A failed download leaves nothing behind: not even out, where this call made it."""
    made = not os.path.exists(out)
    path = os.path.join(ensure_dir(out), filename)
    if os.path.exists(path):
        print(f"{path} already exists, skipping the download")
        return path
    try:
        download(url, path)
    except BaseException:
        if made and not os.listdir(out):
            os.rmdir(out)
        raise
    return path


@functools.lru_cache(maxsize=None)
def tokenizer():
    """One Tokenizer per process; the parent builds it before the pool starts so forked workers
    inherit it instead of each reading the ranks again."""
    tok = Tokenizer()
    tok.encoding()
    return tok


def encode_pieces(pieces):
    """[(eot_first, text)] -> (n,) uint16 tokens: every text encoded as ordinary text, EOT before
    the flagged ones. An unflagged text continues the one before it and must start where the
    pre-tokenizer splits anyway (see cut_text)."""
    tok = tokenizer()
    enc = tok.encoding()
    if any(EOT_TEXT in t for _, t in pieces):
        # a literal "<|endoftext|>" in the text stays text, as in llm.c: one call per piece
        ids = []
        for eot_first, t in pieces:
            if eot_first:
                ids.append(tok.eot)
            ids.extend(enc.encode_ordinary(t))
    else:
        # one call for all: tiktoken encodes the text between special tokens separately,
        # exactly as separate encode_ordinary calls would
        ids = enc.encode("".join((EOT_TEXT if eot_first else "") + t for eot_first, t in pieces),
                         allowed_special={EOT_TEXT})
    return np.array(ids, dtype=np.uint16)


# After a newline between two non-space characters. GPT-2's pre-tokenizer always ends a piece
# before such a newline (nothing but whitespace joins it) and after it (a lone newline before
# non-space is a piece of its own), so text cut there encodes as the same tokens as uncut text.
# Python's \S is narrower than Unicode's non-White_Space, so this never cuts in a space run.
_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def cut_text(text, size):
    """Cut text into pieces of at least `size` characters (where a cut point allows)."""
    pieces, start = [], 0
    while len(text) - start > size:
        m = _CUT.search(text, start + size)
        if not m:
            break
        pieces.append(text[start:m.start()])
        start = m.start()
    pieces.append(text[start:])
    return pieces


def worker_count(workers):
    """--workers N (at least 1), or 0 for one process per core."""
    return max(1, workers or os.cpu_count() or 1)


def ordered_map(fn, items, workers):
    """fn(item) for each item of an iterable, in order, in `workers` processes (1: in this
    process). At most 2 items per process are in flight, so a stream of any length runs in
    bounded memory (Pool.imap's results pile up whenever their consumer is the slower side)."""
    tokenizer()
    if workers == 1:
        yield from map(fn, items)
        return
    with multiprocessing.Pool(workers) as pool:
        pending = collections.deque()   # results in item order, at most 2 per process
        for item in items:
            pending.append(pool.apply_async(fn, (item,)))
            if len(pending) == 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def parallel_map(fn, items, workers, desc, sizes=None, unit="it"):
    """[fn(item) for item in items] in order, in `workers` processes (1: in this process), with a
    progress bar that advances by each item's size."""
    sizes = sizes or [1] * len(items)
    workers = max(1, min(worker_count(workers), len(items)))
    out = []
    with progress(total=sum(sizes), desc=desc, unit=unit, unit_scale=True) as bar:
        for r, size in zip(ordered_map(fn, items, workers), sizes):
            out.append(r)
            bar.update(size)
    return out


def group_pieces(documents, size):
    """Documents -> lists of (eot_first, text) of about `size` characters each, the work items of
    encode_pieces; a longer document is cut (cut_text) across items. Yields (item, characters)."""
    item, n = [], 0
    for doc in documents:
        for i, piece in enumerate(cut_text(doc, size)):
            item.append((i == 0, piece))
            n += len(piece)
            if n >= size:
                yield item, n
                item, n = [], 0
    if item:
        yield item, n


def encode_documents(documents, workers, desc="tokenizing"):
    """(n,) uint16 tokens of the documents, each with EOT before it, as llm.c's scripts make
    them, in up to `workers` processes (0: one per core). Large documents are cut (cut_text)
    so that every process gets a share."""
    total = sum(map(len, documents))
    workers = max(1, min(worker_count(workers), total // MIN_WORK_CHARS))
    size = total // (4 * workers) + 1       # 4 items per process even out their loads
    items = list(group_pieces(documents, size))
    arrays = parallel_map(encode_pieces, [item for item, _ in items], workers, desc,
                          [n for _, n in items], unit="char")
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)


def encode_stream(documents, workers):
    """The tokens of a stream of documents (any iterable), as encode_documents makes them, as a
    stream of (n,) uint16 arrays of about STREAM_ITEM_CHARS characters' tokens each."""
    items = (item for item, _ in group_pieces(documents, STREAM_ITEM_CHARS))
    return ordered_map(encode_pieces, items, worker_count(workers))


def partial_path(path):
    """Where write_token_files stages path."""
    return os.fspath(path) + ".partial"


def write_token_files(files, staged=(), keep_interrupted=False):
    """files: (path, (n,) tokens) pairs, a list or a stream. Each is written to path.partial
    (which no *.bin glob matches), and once all are, each is renamed into place, together with
    `staged`, paths whose .partial an interrupted run wrote: a run that fails (or whose stream
    does) removes its .partial files and leaves an earlier run's files as they were; with
    keep_interrupted, a Ctrl-C keeps them (each is complete: written atomically) for a run that
    resumes. Returns the paths written."""
    staged = [(path, partial_path(path)) for path in staged]
    try:
        for path, tokens in files:
            print(f"writing {len(tokens):,} tokens to {path}")
            staged.append((path, partial_path(path)))
            write_tokens(staged[-1][1], tokens)
    except BaseException as e:
        if not (keep_interrupted and isinstance(e, KeyboardInterrupt)):
            for _, partial in staged:
                if os.path.exists(partial):
                    os.remove(partial)
        raise
    for path, partial in staged:
        os.replace(partial, path)
    return [path for path, _ in staged]
