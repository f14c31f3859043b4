"""A Hugging Face model directory's tokenizer (tokenizer.json: Llama 3, Mistral, Qwen2, Gemma),
encoded and decoded by Hugging Face's `tokenizers` library: its BPE / SentencePiece models,
normalizers and pre-tokenizers are the definition of these tokenizers, so none is rewritten here.

The text is encoded as llm.c's llama3 dev/data scripts encode it: no special tokens added, and
special tokens' text in a document encoded as text (their split_special_tokens=True), with one
token before every document: the one the tokenizer adds to an empty text (llm.c's
`tokenizer.encode('')[0]`, Llama 3's <|begin_of_text|>), or, for a tokenizer that adds none
(Qwen2), tokenizer_config.json's eos_token.
"""
import json
import os

import numpy as np

from ..data.loader import TOKEN_FORMATS, token_version
from ..errors import LlmpyError, first_line

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


def _special_token_text(value):
    """tokenizer_config.json writes a special token as its text or as {"content": text, ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """path: a model directory holding tokenizer.json, or the tokenizer.json file itself.
    Has the interface of llmpy.tokenizer.Tokenizer that prepro and sampling use: vocab_size,
    eot (the id written before every document), encode, decode."""

    def __init__(self, path):
        path = os.fspath(path)
        self.path = os.path.join(path, TOKENIZER_JSON) if os.path.isdir(path) else path
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise LlmpyError(f"{self.path}: reading it needs Hugging Face's tokenizers: "
                             "pip install 'llmpy[hf]'") from None
        if not os.path.isfile(self.path):
            raise LlmpyError(f"{self.path}: no such file")
        try:
            self._tok = Tokenizer.from_file(self.path)
        except Exception as e:   # the library raises a bare Exception for every parse error
            raise LlmpyError(f"{self.path}: not a tokenizer.json the tokenizers library reads: "
                             f"{first_line(e)}") from None
        self._tok.encode_special_tokens = True     # "<|end_of_text|>" in a document is text
        # ids need not be contiguous in the file: the vocabulary spans up to the largest
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values()) + 1
        self.eot = self._document_token(os.path.dirname(self.path))

    def _document_token(self, directory):
        added = self._tok.encode("", add_special_tokens=True).ids
        if added:
            return added[0]
        config = os.path.join(directory, TOKENIZER_CONFIG)
        eos = None
        if os.path.exists(config):
            try:
                with open(config, encoding="utf-8") as f:
                    eos = _special_token_text(json.load(f).get("eos_token"))
            except (ValueError, AttributeError, UnicodeDecodeError) as e:
                raise LlmpyError(f"{config}: not a JSON object: {first_line(e)}") from None
        eos_id = self._tok.token_to_id(eos) if isinstance(eos, str) else None
        if eos_id is None:
            raise LlmpyError(f"{self.path}: the tokenizer adds no token to a text and "
                             f"{TOKENIZER_CONFIG} names no eos_token in its vocabulary: no token "
                             "to put before each document")
        return eos_id

    def check_vocab(self, vocab_size, model):
        """One line when the model's embedding has fewer rows than this tokenizer has ids.
        Fewer tokens than rows is a model's reserved rows (Qwen2: 151,936 rows, 151,665 ids)."""
        if self.vocab_size > vocab_size:
            raise LlmpyError(f"{self.path}: the tokenizer has {self.vocab_size:,} tokens, more "
                             f"than the vocab size {vocab_size:,} of {model}: it is another "
                             "model's tokenizer")

    def encode(self, text):
        """Text to ids, nothing added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_documents(self, documents):
        """(n,) tokens of the documents, eot before each, in the dtype of the token file that
        holds this vocabulary (uint16, or uint32 past 65,536 ids). The library encodes the
        documents in its own threads."""
        dtype = TOKEN_FORMATS[token_version(self.vocab_size)][1]
        encodings = self._tok.encode_batch(documents, add_special_tokens=False)
        out = np.empty(sum(len(e.ids) + 1 for e in encodings), dtype=dtype)
        pos = 0
        for e in encodings:
            out[pos] = self.eot
            out[pos + 1:pos + 1 + len(e.ids)] = e.ids
            pos += 1 + len(e.ids)
        return out

    def decode(self, ids):
        """Ids to text, special tokens included; an incomplete UTF-8 sequence ends in U+FFFD."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise LlmpyError(f"token id {bad[0]} out of range for vocab size {self.vocab_size}")
        return self._tok.decode(ids, skip_special_tokens=False)
