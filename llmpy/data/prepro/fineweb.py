"""FineWeb and FineWeb-Edu -> token shards, the same bytes as llm.c's dev/data/fineweb.py.

Every document is EOT + its "text" as ordinary GPT-2 tokens. The token stream, in the dataset's
order (its parquet files sorted by name, the order `datasets.load_dataset` reads them; rows in
order), is cut into shards of --shard-tokens tokens: a document that overflows a shard goes on in
the next one, and the last shard holds the rest. Shard 0 is val, the others train:
NAME_val_000000.bin, NAME_train_000001.bin, ...

The dataset is ~28 GB of parquet for 10B tokens, so it is streamed: one batch of parquet rows,
a few tokenizer work items and one shard of tokens are in memory at a time, and each shard is
written (NAME_..._XXXXXX.bin.partial) as soon as it fills; they are renamed into place at the end.

Tokenizing 10B tokens takes hours, so a run saves where it is in OUT/NAME_resume.json whenever a
shard begins: its arguments, the tokens in the shards written so far, and the document (its row
in the stream) and token in it that the next shard starts at. After a kill or a Ctrl-C, --resume
keeps those shards, skips the documents before that one by the parquet files' row counts, drops
the document's tokens before the offset, and goes on: the same bytes as an uninterrupted run."""
import glob
import json
import os

import numpy as np

from ...errors import LlmpyError, first_line
from ...io.files import HEADER_BYTES, ensure_dir, file_size, write_json
from ...io.tokenizer import EOT
from .common import encode_stream, partial_path, progress, write_token_files
from .text import remove_stale_shards, shard_path

DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"),      # --type: (hub repo, shard name)
            "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}
SAMPLES = {"10B": "sample/10BT", "100B": "sample/100BT"}   # the configs sample-10BT, sample-100BT
BATCH_ROWS = 1024   # parquet rows read at a time
EXTRA = "pip install 'llmpy[fineweb]'"
# Where a run is: tokens in its complete shards, the next shard's first token (the `offset`th of
# document `document`, counting its EOT), and whether the stream has ended.
START = {"tokens": 0, "document": 0, "offset": 0, "complete": False}


def pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise LlmpyError(f"prepro fineweb reads parquet with pyarrow: {EXTRA}") from None
    return pyarrow


def download(repo, sample):
    """The sample's parquet files, downloaded into the Hugging Face cache (resumable; a second
    run finds them there)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise LlmpyError(f"{repo}: downloading needs huggingface_hub: {EXTRA}") from None
    print(f"downloading {repo} {sample}/* into the Hugging Face cache")
    try:
        folder = snapshot_download(repo, repo_type="dataset", allow_patterns=f"{sample}/*")
    except Exception as e:   # network, hub, disk: the library's error types vary by version
        raise LlmpyError(f"{repo}: download of {sample}/* failed: {type(e).__name__}: "
                         f"{first_line(e)}") from None
    return [os.path.join(folder, sample)]


def find_files(inputs):
    """Parquet files: a directory's *.parquet sorted by name, files in the order given."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(glob.glob(os.path.join(glob.escape(path), "*.parquet")))
            if not found:
                raise LlmpyError(f"{path}: no .parquet files in the directory")
            files.extend(found)
        else:
            file_size(path)   # a missing file: one clear line
            files.append(path)
    return files


def check_file(pa, path):
    """Read a parquet file's schema (its footer only), so bad input fails before any work."""
    try:
        schema = pa.parquet.read_schema(path)
    except (pa.ArrowException, OSError) as e:
        raise LlmpyError(f"{path}: not a parquet file: {first_line(e)}") from None
    if "text" not in schema.names:
        raise LlmpyError(f'{path}: no "text" column (columns: {", ".join(schema.names)})')
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LlmpyError(f'{path}: the "text" column holds {kind}, not strings')


def documents(pa, files, skip=0):
    """Every row's "text" from row `skip` of the stream on, file after file, BATCH_ROWS rows in
    memory at a time. The files and row groups before it are skipped unread, by their footers'
    row counts."""
    for path in files:
        row = 0
        try:
            with pa.parquet.ParquetFile(path) as f:
                group = 0
                while group < f.num_row_groups and skip >= f.metadata.row_group(group).num_rows:
                    skip -= f.metadata.row_group(group).num_rows
                    row += f.metadata.row_group(group).num_rows
                    group += 1
                for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=["text"],
                                            row_groups=range(group, f.num_row_groups)):
                    drop = min(skip, batch.num_rows)     # rows of the group before row `skip`
                    batch, skip, row = batch.slice(drop), skip - drop, row + drop
                    texts = batch.column(0).to_pylist()
                    if None in texts:
                        raise LlmpyError(f'{path}: row {row + texts.index(None)}: "text" is null')
                    row += len(texts)
                    yield from texts
        except (pa.ArrowException, OSError) as e:
            raise LlmpyError(f"{path}: cannot read past row {row}: {first_line(e)}") from None


def numbered_shard(out, name, index):
    """Shard `index`'s path: shard 0 is val, the others train (llm.c's fineweb.py)."""
    return shard_path(out, name, "val" if index == 0 else "train", index)


def drop_tokens(arrays, n):
    """A stream of token arrays without its first n tokens."""
    for tokens in arrays:
        yield tokens[n:]
        n = max(0, n - tokens.size)


def shards(arrays, shard_tokens, out, name, at, save):
    """Cut a stream of token arrays, which begins at position `at` (see START), into (path,
    tokens) shards of shard_tokens tokens, each yielded as soon as it is full (and the last with
    the rest), with a progress bar each. save(position) as each shard begins, when the consumer
    has written every shard before it (it asks for the next one only then), and at the end."""
    buf = np.empty(shard_tokens, dtype=np.uint16)   # (shard_tokens,) the shard being filled
    n, index, bar = 0, at["tokens"] // shard_tokens, None
    # documents begun (their EOT passed), and the tokens passed of the last one: every document
    # is EOT + ordinary text, which never encodes to EOT
    docs, doc_tokens = at["document"] + (at["offset"] > 0), at["offset"]
    for tokens in arrays:                         # (k,) uint16
        while tokens.size:
            if bar is None:
                new_doc = tokens[0] == EOT
                save({"tokens": index * shard_tokens, "document": docs if new_doc else docs - 1,
                      "offset": 0 if new_doc else doc_tokens, "complete": False})
                bar = progress(total=shard_tokens, unit="tokens", desc=f"Shard {index}")
            take = min(tokens.size, shard_tokens - n)
            buf[n:n + take] = tokens[:take]
            eots = np.flatnonzero(tokens[:take] == EOT)   # (e,) where documents begin
            docs += eots.size
            doc_tokens = take - int(eots[-1]) if eots.size else doc_tokens + take
            n, tokens = n + take, tokens[take:]
            bar.update(take)
            if n == shard_tokens:
                bar.close()
                yield numbered_shard(out, name, index), buf
                n, index, bar = 0, index + 1, None
    if bar is not None:
        bar.close()
    if n:
        yield numbered_shard(out, name, index), buf[:n]
    save({"tokens": index * shard_tokens + n, "document": docs, "offset": 0, "complete": True})


def run_record(kind, shard_tokens, files):
    """What decides a run's bytes, as its resume state records it."""
    return {"type": kind, "shard_tokens": shard_tokens,
            "inputs": [[os.path.abspath(f), file_size(f)] for f in files]}


def difference(key, was, now):
    """How this run's `key` differs from the interrupted run's, in words."""
    if key != "inputs":
        return f"the interrupted run had --{key.replace('_', '-')} {was}, this one {now}"
    for (was_path, was_size), (path, size) in zip(was, now):
        if was_path != path:
            return f"the interrupted run read {was_path} where this one reads {path}"
        if was_size != size:
            return f"{path} has {size:,} bytes, the interrupted run read {was_size:,}"
    return f"the interrupted run read {len(was)} parquet files, this one {len(now)}"


def read_state(path, run):
    """The position (see START) that an interrupted run with the same record saved in `path`,
    or None when there is no state."""
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
        at = {key: state[key] for key in START}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LlmpyError(f"{path}: unreadable resume state: {e!r}; drop --resume to start "
                         "over") from None
    for key, value in run.items():
        if state.get(key) != value:
            raise LlmpyError(f"{path}: {difference(key, state.get(key), value)}; drop --resume "
                             "to start over")
    return at


def kept_shards(out, name, shard_tokens, at, state):
    """(shards renamed into place, shards staged as .partial) of the tokens `at` counts, each
    checked to hold its tokens. Only a complete run renames, all at the end, so only its shards
    may be in place already (it was killed while renaming)."""
    renamed, staged = [], []
    for index in range(-(-at["tokens"] // shard_tokens)):
        path = numbered_shard(out, name, index)
        done = at["complete"] and not os.path.exists(partial_path(path))
        (renamed if done else staged).append(path)
        f = path if done else partial_path(path)
        size = HEADER_BYTES + 2 * min(shard_tokens, at["tokens"] - index * shard_tokens)
        have = os.path.getsize(f) if os.path.exists(f) else None
        if have != size:
            raise LlmpyError(f"{f}: {'missing' if have is None else f'{have:,} bytes'}, but "
                             f"{state} counts it as a written shard of {size:,} bytes; drop "
                             "--resume to start over")
    return renamed, staged


def remove_state(path):
    """The resume state, and the temporary file of a write of it that was killed."""
    for f in glob.glob(glob.escape(path)) + glob.glob(glob.escape(path) + ".*.tmp"):
        os.remove(f)


def prepro(input=None, out=None, kind="classic", version="10B", shard_tokens=10 ** 8,
           workers=None, resume=False):
    """Tokenize local parquet files (directories or files), or without them download the sample
    of FineWeb (kind "classic") or FineWeb-Edu ("edu"). resume: go on from the shards of an
    interrupted run into `out` (without one, start)."""
    if kind not in DATASETS or version not in SAMPLES:
        raise LlmpyError(f"--type {kind} --version {version}: choose --type from "
                         f"{', '.join(DATASETS)} and --version from {', '.join(SAMPLES)}")
    if not 1 <= shard_tokens < 2 ** 31:   # the header's token count is an int32
        raise LlmpyError(f"--shard-tokens {shard_tokens}: must be from 1 to 2**31 - 1")
    pa = pyarrow()
    repo, name = DATASETS[kind]
    out = out or f"{name}{version}"   # llm.c's directories: fineweb10B, edu_fineweb100B, ...
    files = find_files(input or download(repo, SAMPLES[version]))
    for path in files:
        check_file(pa, path)
    ensure_dir(out)
    state, run = os.path.join(out, f"{name}_resume.json"), run_record(kind, shard_tokens, files)
    at = read_state(state, run) if resume else None
    if at:
        print(f"resuming from {state}: {at['tokens']:,} tokens written, next document "
              f"{at['document']:,} from its token {at['offset']:,}")
    elif os.path.exists(state):
        print(f"{state}: an interrupted run's progress; starting over (--resume goes on from it)")
    at = at or START
    renamed, staged = kept_shards(out, name, shard_tokens, at, state)

    def save(position):
        write_json(state, {**run, **position})
    stream = () if at["complete"] else shards(
        drop_tokens(encode_stream(documents(pa, files, at["document"]), workers), at["offset"]),
        shard_tokens, out, name, at, save)
    try:
        written = renamed + write_token_files(stream, staged, keep_interrupted=True)
        if not written:
            raise LlmpyError(f"{files[0]}{' ...' if len(files) > 1 else ''}: no documents")
    except KeyboardInterrupt:
        print(f"interrupted: the shards written so far stay in {out} (*.partial); run again "
              "with --resume to go on from them")
        raise
    except BaseException:        # a failed run leaves the directory as it was
        remove_state(state)
        raise
    remove_stale_shards(out, name, written)
    remove_state(state)
    return written
