"""GPT-2 BPE. Encoding uses tiktoken when installed; decoding needs only the merge ranks file,
shipped in the package (llmpy/data/gpt2.tiktoken), so the NumPy-only core can print text."""
import base64

from .data import bundled_data
from .errors import LlmpyError

EOT = 50256
EOT_TEXT = "<|endoftext|>"
# The pre-tokenizer split pattern of the original GPT-2 release.
R50K_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


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


class Tokenizer:
    def __init__(self, ranks_path=None):
        self.ranks_path = ranks_path
        ranks = load_ranks(ranks_path)
        self.token_bytes = [b""] * (max(ranks.values()) + 1)      # id -> bytes
        for tok, rank in ranks.items():
            self.token_bytes[rank] = tok
        self.token_bytes.append(EOT_TEXT.encode())
        self.eot = EOT
        self._enc = None

    @property
    def vocab_size(self):
        return len(self.token_bytes)

    def decode_bytes(self, ids):
        try:
            return b"".join(self.token_bytes[int(i)] for i in ids)
        except IndexError:
            raise LlmpyError(f"token id out of range for vocab size {self.vocab_size}") from None

    def decode(self, ids):
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def encoding(self):
        """The tiktoken Encoding for these ranks (tiktoken is an optional dependency)."""
        if self._enc is None:
            try:
                import tiktoken
                from tiktoken.load import load_tiktoken_bpe
            except ImportError:
                raise LlmpyError("encoding text needs tiktoken: pip install 'llmpy[data]'") from None
            self._enc = tiktoken.Encoding(
                name="gpt2", pat_str=R50K_PATTERN,
                mergeable_ranks=load_tiktoken_bpe(self.ranks_path or bundled_data("gpt2.tiktoken")),
                special_tokens={EOT_TEXT: EOT})
        return self._enc

    def encode(self, text):
        """Ordinary text to ids; '<|endoftext|>' in the text is encoded as text, as llm.c does."""
        return self.encoding().encode_ordinary(text)
