"""Token files and the DataLoader.

llm.c's data file: a 256 x int32 header (magic 20240520, version 1, token count at [2]),
then the tokens as uint16; llm.c's llama3 branch writes magic 20240801, version 7, with the
tokens as uint32 (for vocabularies past 65,536). The original llm.c README's headerless int32
stream is read too.
"""
import glob
import os

import numpy as np

from ..errors import LlmpyError
from ..io.files import HEADER_BYTES, HEADER_INTS, atomic_write, file_size, make_header, read_header

DATA_MAGIC = 20240520
DATA_VERSION = 1
UINT32_VERSION = 7
# version -> (magic, token dtype), as llm.c's dev/data/data_common.py writes them
TOKEN_FORMATS = {DATA_VERSION: (DATA_MAGIC, "<u2"), UINT32_VERSION: (20240801, "<u4")}


def token_version(vocab_size):
    """The token file version that holds every id of a vocabulary: uint16 while it fits."""
    return DATA_VERSION if vocab_size <= 2 ** 16 else UINT32_VERSION


def _looks_like_header(h, size):
    """Whether the first 256 int32s are an llm.c token header but for the magic: a known version
    at [1] and a token count at [2] that sizes the file exactly. A headerless int32 stream whose
    second and third ids happen to say this is not a realistic risk; a damaged magic is."""
    if h.size < 3 or int(h[1]) not in TOKEN_FORMATS or h[2] < 0:
        return False
    return size == HEADER_BYTES + np.dtype(TOKEN_FORMATS[int(h[1])][1]).itemsize * int(h[2])


def _is_legacy_int32(path):
    """A headerless int32 stream starts with a token id, never with a magic number; an llm.c
    header whose magic was damaged into a small number is no stream (it would read as ids)."""
    h = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    size = file_size(path)
    return (size % 4 == 0 and h.size >= 1 and 0 <= h[0] < 2 ** 17
            and not _looks_like_header(h, size))


def _read_token_header(path):
    """The header of an llm.c token file of either version -> (token count, token dtype)."""
    first = np.fromfile(path, dtype="<i4", count=1)[0]
    version = next((v for v, (magic, _) in TOKEN_FORMATS.items() if magic == first), None)
    if version is None and file_size(path) >= HEADER_BYTES:
        raise LlmpyError(f"{path}: bad magic number {first} (a token data file starts with "
                         f"{DATA_MAGIC}, or {TOKEN_FORMATS[UINT32_VERSION][0]} for uint32 tokens)")
    magic, dtype = TOKEN_FORMATS[version or DATA_VERSION]
    h = read_header(path, magic, (version,), "token data")    # truncated, or a bad version
    return int(h[2]), dtype


def check_width(path, tokens, vocab_size):
    """A uint16 file cannot hold a vocabulary past 65,536 ids: it was tokenized for another."""
    if vocab_size is not None and tokens.dtype == np.uint16 and \
            token_version(vocab_size) != DATA_VERSION:
        raise LlmpyError(f"{path}: uint16 token file (version {DATA_VERSION}) for a vocabulary "
                         f"of {vocab_size:,} tokens, whose ids need uint32 (version "
                         f"{UINT32_VERSION}): tokenize with this model's tokenizer")


def read_tokens(path, vocab_size=None):
    """The tokens of one file as a read-only memmap (uint16 or uint32 by the file's version, or
    int32 for the legacy stream). A vocabulary past uint16's ids in a uint16 file is an error:
    such a file was written for another tokenizer."""
    size = file_size(path)
    if size == 0:
        raise LlmpyError(f"{path}: empty token file")
    if size >= 4 and not _is_legacy_int32(path):
        n, dtype = _read_token_header(path)
        expected = HEADER_BYTES + np.dtype(dtype).itemsize * n
        if size != expected:
            raise LlmpyError(f"{path}: header says {n} tokens ({expected} bytes), "
                             f"but the file has {size} bytes")
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))
        check_width(path, tokens, vocab_size)
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


def write_tokens(path, tokens, version=None):
    """Write tokens in llm.c's format, uint16 (version 1) or uint32 (version 7), atomically.
    version None: 7 for a uint32 array, so that an array's dtype carries its width through
    the prepro pipeline; 1 for any other."""
    tokens = np.asarray(tokens)
    if version is None:
        version = UINT32_VERSION if tokens.dtype == np.uint32 else DATA_VERSION
    magic, dtype = TOKEN_FORMATS[version]
    if tokens.size and (tokens.min() < 0 or tokens.max() > np.iinfo(dtype).max):
        raise LlmpyError(f"{path}: token ids must fit in {np.dtype(dtype).name}")
    atomic_write(path, [make_header(magic, version, tokens.size), tokens.astype(dtype)])


def expand_files(pattern):
    """A file name or a glob of shards, sorted."""
    files = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not files:
        raise LlmpyError(f"{pattern}: no files match")
    for f in files:
        file_size(f)  # a clear error for a missing file
    return files


def mt19937(seed):
    """A Mersenne Twister seeded as llm.c's manual_seed (rand.h) seeds it (Matsumoto and
    Nishimura's init_genrand), on NumPy's MT19937 for the draws themselves."""
    key = [seed & 0xFFFFFFFF]
    for j in range(1, 624):
        key.append((1812433253 * (key[-1] ^ (key[-1] >> 30)) + j) & 0xFFFFFFFF)
    mt = np.random.MT19937()
    # pos 624: the first draw regenerates the state first, as llm.c's left_ = 1 makes it
    mt.state = {"bit_generator": "MT19937", "state": {"key": np.array(key, np.uint32),
                                                      "pos": 624}}
    return mt


def skip_draws(mt, n):
    """Advance mt by n 32-bit draws, in bounded memory."""
    while n > 0:
        mt.random_raw(min(n, 1 << 20))
        n -= 1 << 20


def random_permutation(perm, mt):
    """llm.c's random_permutation (rand.h), in place: Fisher-Yates from the last element down,
    j = randint32 % (i + 1), one draw per element but the first."""
    n = len(perm)
    draws = mt.random_raw(max(0, n - 1))              # (n-1,) for i = n-1, ..., 1
    for k, i in enumerate(range(n - 1, 0, -1)):
        j = int(draws[k]) % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


class DataLoader:
    """Serves (inputs, targets) batches of shape (B,T): windows of B*T+1 tokens, targets shifted
    by one. In order, window i of a shard starts at token (i*world + rank)*B*T, as in llm.c.
    Shuffled, the order is exactly llm.c's (dataloader.h): one mt19937 per rank, seeded
    seed + rank (llm.c: 42 + rank), permutes the shard order at the start of every epoch (the
    previous epoch's order, in place) and each shard's windows (from 0, 1, ...) as the shard
    is opened. The generator's draws per epoch are fixed by the window counts, so the position
    is still just (epoch, shard, window): a resumed loader skips the draws before it."""

    def __init__(self, pattern, B, T, vocab_size=None, shuffle=False, seed=42, rank=0, world=1):
        self.files = expand_files(pattern)
        self.B, self.T = B, T
        self.shuffle, self.seed, self.rank, self.world = shuffle, seed, rank, world
        self.vocab_size, self._tokens, self._cached = vocab_size, {}, (None, None)
        # headers and sizes only: FineWeb 10B is 20 GB of shards, read by every rank. A shard's
        # token ids are checked as it is opened, the first one's before any work.
        sizes = []
        for f in self.files:
            tokens = read_tokens(f)
            check_width(f, tokens, vocab_size)
            sizes.append(tokens.size)
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
        """(shard, window order within it) at the current (epoch, shard_pos)."""
        if not self.shuffle:
            return self.shard_pos, range(self.windows[self.shard_pos])
        key = (self.epoch, self.shard_pos)
        if self._cached[0] != key:
            self._cached = key, self._shuffled(*key)
        return self._cached[1]

    def _shuffled(self, epoch, shard_pos):
        """llm.c's draws replayed up to (epoch, shard_pos): each epoch draws the shard order
        (len(files)-1 draws) and then each shard's windows (windows-1 draws each)."""
        per_shard = [max(0, n - 1) for n in self.windows]
        mt = mt19937(self.seed + self.rank)
        shards = list(range(len(self.files)))
        for e in range(epoch + 1):   # in place: each epoch permutes the one before it
            random_permutation(shards, mt)
            if e < epoch:
                skip_draws(mt, sum(per_shard))
        skip_draws(mt, sum(per_shard[s] for s in shards[:shard_pos]))
        shard = shards[shard_pos]
        return shard, random_permutation(list(range(self.windows[shard])), mt)

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
        """A position that state() gave for these files. One outside them is an error, not a
        wrap-around to some other window: a resume with other data, or a damaged state."""
        self.epoch, self.shard_pos, self.window_pos = (state["epoch"], state["shard_pos"],
                                                       state["window_pos"])
        if not (0 <= self.shard_pos < len(self.files)
                and 0 <= self.window_pos < len(self._order()[1])):
            pos = f"shard {self.shard_pos}, window {self.window_pos}"
            self.reset()
            raise LlmpyError(f"{self.files[0]}: the saved position ({pos}) is outside these "
                             f"{len(self.files)} file(s) at B={self.B} T={self.T}: resume with "
                             "the data the run was written with")
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
