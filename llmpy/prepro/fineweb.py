"""FineWeb and FineWeb-Edu -> token shards, the same bytes as llm.c's dev/data/fineweb.py.

Every document is EOT + its "text" as ordinary GPT-2 tokens. The token stream, in the dataset's
order (its parquet files sorted by name, the order `datasets.load_dataset` reads them; rows in
order), is cut into shards of --shard-tokens tokens: a document that overflows a shard goes on in
the next one, and the last shard holds the rest. Shard 0 is val, the others train:
NAME_val_000000.bin, NAME_train_000001.bin, ...

The dataset is ~28 GB of parquet for 10B tokens, so it is streamed: one batch of parquet rows,
a few tokenizer work items and one shard of tokens are in memory at a time, and each shard is
written as soon as it fills."""
import glob
import os

import numpy as np

from ..errors import LlmpyError, first_line
from ..files import ensure_dir, file_size
from .common import encode_stream, progress, write_token_files
from .text import remove_stale_shards, shard_path

DATASETS = {"classic": ("HuggingFaceFW/fineweb", "fineweb"),      # --type: (hub repo, shard name)
            "edu": ("HuggingFaceFW/fineweb-edu", "edu_fineweb")}
SAMPLES = {"10B": "sample/10BT", "100B": "sample/100BT"}   # the configs sample-10BT, sample-100BT
BATCH_ROWS = 1024   # parquet rows read at a time
EXTRA = "pip install 'llmpy[fineweb]'"


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


def documents(pa, files):
    """Every row's "text", file after file, BATCH_ROWS rows in memory at a time."""
    for path in files:
        row = 0
        try:
            with pa.parquet.ParquetFile(path) as f:
                for batch in f.iter_batches(batch_size=BATCH_ROWS, columns=["text"]):
                    texts = batch.column(0).to_pylist()
                    if None in texts:
                        raise LlmpyError(f'{path}: row {row + texts.index(None)}: "text" is null')
                    row += len(texts)
                    yield from texts
        except (pa.ArrowException, OSError) as e:
            raise LlmpyError(f"{path}: cannot read past row {row}: {first_line(e)}") from None


def shards(arrays, shard_tokens, out, name):
    """Cut a stream of token arrays into (path, tokens) shards of shard_tokens tokens, each
    yielded as soon as it is full (and the last with the rest), with a progress bar each."""
    buf = np.empty(shard_tokens, dtype=np.uint16)   # (shard_tokens,) the shard being filled
    n, index, bar = 0, 0, None
    for tokens in arrays:                         # (k,) uint16
        while tokens.size:
            if bar is None:
                bar = progress(total=shard_tokens, unit="tokens", desc=f"Shard {index}")
            take = min(tokens.size, shard_tokens - n)
            buf[n:n + take] = tokens[:take]
            n, tokens = n + take, tokens[take:]
            bar.update(take)
            if n == shard_tokens:
                bar.close()
                yield shard_path(out, name, "val" if index == 0 else "train", index), buf
                n, index, bar = 0, index + 1, None
    if bar is not None:
        bar.close()
    if n:
        yield shard_path(out, name, "val" if index == 0 else "train", index), buf[:n]


def prepro(input=None, out=None, kind="classic", version="10B", shard_tokens=10 ** 8,
           workers=None):
    """Tokenize local parquet files (directories or files), or without them download the sample
    of FineWeb (kind "classic") or FineWeb-Edu ("edu")."""
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
    tokens = encode_stream(documents(pa, files), workers)
    written = write_token_files(shards(tokens, shard_tokens, out, name))
    if not written:
        raise LlmpyError(f"{files[0]}{' ...' if len(files) > 1 else ''}: no documents")
    remove_stale_shards(out, name, written)
    return written
