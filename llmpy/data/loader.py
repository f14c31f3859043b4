"""Token files and the DataLoader.

llm.c's data file: a 256 x int32 header (magic 20240520, version 1, token count at [2]),
then the tokens as uint16. The original llm.c README's headerless int32 stream is read too.
"""
import glob
import os

import numpy as np

from ..errors import LlmpyError
from ..io.files import HEADER_BYTES, atomic_write, file_size, make_header, read_header

DATA_MAGIC = 20240520
DATA_VERSION = 1


def _is_legacy_int32(path):
    """A headerless int32 stream starts with a token id, never with a magic number."""
    first = np.fromfile(path, dtype="<i4", count=1)
    return file_size(path) % 4 == 0 and first.size == 1 and 0 <= first[0] < 2 ** 17


def read_tokens(path, vocab_size=None):
    """The tokens of one file as a read-only memmap (uint16, or int32 for the legacy stream)."""
    size = file_size(path)
    if size == 0:
        raise LlmpyError(f"{path}: empty token file")
    if size >= 4 and not _is_legacy_int32(path):
        h = read_header(path, DATA_MAGIC, (DATA_VERSION,), "token data")
        n = int(h[2])
        if size != HEADER_BYTES + 2 * n:
            raise LlmpyError(f"{path}: header says {n} tokens ({HEADER_BYTES + 2 * n} bytes), "
                             f"but the file has {size} bytes")
        tokens = np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(n,))
    elif size % 4 == 0:
        tokens = np.memmap(path, dtype="<i4", mode="r")
        if tokens.min() < 0:
            raise LlmpyError(f"{path}: negative token id in legacy int32 token stream")
    else:
        raise LlmpyError(f"{path}: neither an llm.c token file nor an int32 token stream")
    if vocab_size is not None and tokens.size and tokens.max() >= vocab_size:
        i = int(np.argmax(tokens >= vocab_size))
        raise LlmpyError(f"{path}: token id {int(tokens[i])} at position {i} is out of range "
                         f"for vocab size {vocab_size}")
    return tokens


def write_tokens(path, tokens):
    """Write tokens in llm.c's format (uint16), atomically."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2 ** 16):
        raise LlmpyError(f"{path}: token ids must fit in uint16")
    atomic_write(path, [make_header(DATA_MAGIC, DATA_VERSION, tokens.size),
                        tokens.astype("<u2")])


def expand_files(pattern):
    """A file name or a glob of shards, sorted."""
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files:
        raise LlmpyError(f"{pattern}: no files match")
    for f in files:
        file_size(f)  # a clear error for a missing file
    return files


class DataLoader:
    """Serves (inputs, targets) batches of shape (B,T): windows of B*T+1 tokens, targets shifted
    by one. In order, window i of a shard starts at token (i*world + rank)*B*T, as in llm.c;
    shuffled, the shard order and the windows within each shard are permuted per epoch by a
    generator seeded with (seed, epoch), so the position is just (epoch, shard, window)."""

    def __init__(self, pattern, B, T, vocab_size=None, shuffle=False, seed=0, rank=0, world=1):
        self.files = expand_files(pattern)
        self.B, self.T = B, T
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.vocab_size, self._tokens = vocab_size, {}
        # headers and sizes only: FineWeb 10B is 20 GB of shards, read by every rank. A shard's
        # token ids are checked as it is opened, the first one's before any work.
        sizes = [read_tokens(f).size for f in self.files]
        self.windows = [max(0, (n - 1) // (B * T * world)) for n in sizes]
        if not any(self.windows):
            raise LlmpyError(f"{pattern}: {sum(sizes)} tokens are too few for one batch of "
                             f"B*T+1 = {B * T + 1} tokens" + (f" per each of {world} ranks"
                                                               if world > 1 else ""))
        self.reset()
        self._shard(self._order()[0])

    def _shard(self, i):
        if i not in self._tokens:                      # one shard open at a time
            self._tokens = {i: read_tokens(self.files[i], self.vocab_size)}
        return self._tokens[i]

    def _order(self):
        """(shard order, window order within the current shard) for this epoch."""
        shards = np.arange(len(self.files))
        if self.shuffle:
            shards = np.random.default_rng([self.seed, self.epoch]).permutation(shards)
        shard = int(shards[self.shard_pos])
        windows = np.arange(self.windows[shard])
        if self.shuffle:
            windows = np.random.default_rng([self.seed, self.epoch, shard]).permutation(windows)
        return shard, windows

    def reset(self):
        self.epoch, self.shard_pos, self.window_pos = 0, 0, 0
        self._skip_empty()

    def _skip_empty(self):
        while True:
            shard, windows = self._order()
            if self.window_pos < len(windows):
                return
            self.window_pos = 0
            self.shard_pos += 1
            if self.shard_pos == len(self.files):
                self.shard_pos, self.epoch = 0, self.epoch + 1

    def require_batches(self, n, pattern):
        """One line when n batches (--val-batches) would wrap around the data, so that the
        mean loss would count some windows twice."""
        if n > sum(self.windows):
            raise LlmpyError(f"{pattern}: --val-batches {n}, but the data holds "
                             f"{sum(self.windows)} batches of B*T = {self.B}*{self.T} tokens")

    def state(self):
        return {"epoch": self.epoch, "shard_pos": self.shard_pos, "window_pos": self.window_pos}

    def load_state(self, state):
        self.epoch, self.shard_pos, self.window_pos = (state["epoch"], state["shard_pos"],
                                                       state["window_pos"])
        self._skip_empty()

    def next_batch(self):
        """Returns inputs, targets: (B,T) int64 arrays."""
        B, T = self.B, self.T
        shard, windows = self._order()
        start = (int(windows[self.window_pos]) * self.world + self.rank) * B * T
        buf = np.asarray(self._shard(shard)[start:start + B * T + 1], dtype=np.int64)  # (B*T+1,)
        self.window_pos += 1
        self._skip_empty()
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def bundled_data(name):
    """Path of a file shipped in llmpy/data (the embedded default corpus and tokenizer)."""
    return os.path.join(os.path.dirname(__file__), name)
