"""GPT-2 BPE. Encoding uses tiktoken when installed; decoding needs only the token table, read
from the merge ranks shipped in the package (llmpy/data/gpt2.tiktoken) or from llm.c's
tokenizer file, so the NumPy-only core can print text.

llm.c's tokenizer file (gpt2_tokenizer.bin): a 256 x int32 header (magic 20240328, version 2,
vocab size at [2], EOT id at [3]; version 1 has no EOT field and means 50256), then for every
token id in order a uint8 length and that many bytes.
"""
import base64

import numpy as np

from ..data.loader import bundled_data
from ..errors import LlmpyError
from .files import HEADER_BYTES, atomic_write, file_size, make_header, read_header

EOT = 50256
GPT2_VOCAB = EOT + 1          # <|endoftext|> is the last of GPT-2's tokens
EOT_TEXT = "<|endoftext|>"
# The pre-tokenizer split pattern of the original GPT-2 release (tiktoken's r50k pattern).
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
TOKENIZER_MAGIC = 20240328


def load_ranks(path=None):
    """{token bytes: rank} from a tiktoken ranks file (one 'base64 rank' per line)."""
    path = path or bundled_data("gpt2.tiktoken")
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise LlmpyError(f"{path}: no such file") from None
    ranks = {}
    for i, line in enumerate(lines):
        if line:
            try:
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
            except ValueError:
                raise LlmpyError(f"{path}: line {i + 1} is not 'base64 rank'") from None
    return ranks


def read_tokenizer_file(path):
    """llm.c's tokenizer file -> (list of token bytes indexed by id, EOT id)."""
    h = read_header(path, TOKENIZER_MAGIC, (1, 2), "tokenizer")
    n, eot = int(h[2]), int(h[3]) if h[1] == 2 else EOT
    with open(path, "rb") as f:
        data = f.read()[HEADER_BYTES:]
    tokens, pos = [], 0
    for i in range(n):
        end = pos + 1 + (data[pos] if pos < len(data) else 0)
        if end > len(data):
            raise LlmpyError(f"{path}: truncated tokenizer file: header says {n} tokens, "
                             f"the file ends in token {i}")
        tokens.append(data[pos + 1:end])
        pos = end
    if pos != len(data):
        raise LlmpyError(f"{path}: {len(data) - pos} bytes after the last of {n} tokens")
    if not 0 <= eot < n:
        raise LlmpyError(f"{path}: EOT id {eot} is out of range for vocab size {n}")
    return tokens, eot


def write_tokenizer_file(path, token_bytes, eot):
    """Write llm.c's tokenizer file (version 2), atomically."""
    for i, b in enumerate(token_bytes):
        if not 0 < len(b) < 256:
            raise LlmpyError(f"{path}: token {i} has {len(b)} bytes; the file stores 1 to 255")
    body = b"".join(bytes([len(b)]) + b for b in token_bytes)
    atomic_write(path, [make_header(TOKENIZER_MAGIC, 2, len(token_bytes), eot),
                        np.frombuffer(body, dtype=np.uint8)])


def _is_tokenizer_file(path):
    return file_size(path) >= 4 and np.fromfile(path, dtype="<i4", count=1)[0] == TOKENIZER_MAGIC


class Tokenizer:
    """path: a tiktoken ranks file (default: the bundled GPT-2 ranks) or llm.c's tokenizer file."""

    def __init__(self, path=None):
        if path and _is_tokenizer_file(path):
            self.token_bytes, self.eot = read_tokenizer_file(path)   # id -> bytes
        else:
            ranks = load_ranks(path)
            self.token_bytes = [b""] * (max(ranks.values()) + 1)     # id -> bytes
            for tok, rank in ranks.items():
                self.token_bytes[rank] = tok
            self.eot = len(self.token_bytes)
            self.token_bytes.append(EOT_TEXT.encode())
        self._enc = None

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def save(self, path):
        """Write llm.c's tokenizer file, which llm.c's C code reads to print text."""
        write_tokenizer_file(path, self.token_bytes, self.eot)

    def decode_bytes(self, ids):
        try:
            return b"".join(self.token_bytes[int(i)] for i in ids)
        except IndexError:
            raise LlmpyError(f"token id out of range for vocab size {self.vocab_size}") from None

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encoding(self):
        """The tiktoken Encoding for this table (tiktoken is an optional dependency). In GPT-2
        BPE a token's id is its merge rank, so the table alone gives the merge ranks."""
        if self._enc is None:
            try:
                import tiktoken
            except ImportError:
                raise LlmpyError("encoding text needs tiktoken: pip install 'llmpy[data]'") from None
            ranks = {b: i for i, b in enumerate(self.token_bytes) if i != self.eot}
            self._enc = tiktoken.Encoding(name="gpt2", pat_str=R50K_PATTERN, mergeable_ranks=ranks,
                                          special_tokens={EOT_TEXT: self.eot},
                                          explicit_n_vocab=self.vocab_size)
        return self._enc

    def encode(self, text):
        """Ordinary text to ids; '<|endoftext|>' in the text is encoded as text, as llm.c does."""
        return self.encoding().encode_ordinary(text)
