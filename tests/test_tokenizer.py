"""GPT-2 BPE: encoding equals tiktoken's GPT-2, decoding needs no tiktoken, and llm.c's
tokenizer file is written byte for byte as llm.c's train_gpt2.py writes it."""
import struct
import sys

import pytest

from llmpy.data.loader import bundled_data
from llmpy.errors import LlmpyError
from llmpy.io.tokenizer import EOT, Tokenizer, read_tokenizer_file, write_tokenizer_file

UNICODE = [
    "héllo wörld, ça va? naïve café",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧 (zero-width joiners)",
    "RTL: שלום עולם / مرحبا بالعالم",
    "combining: e\u0301 a\u0308, and \ufeffBOM, \u00a0nbsp, \u3000ideographic space",
    "  leading, trailing  \n\n\tand\r\nmixed\x0b\x0c whitespace \x1c\x1f  ",
    "contractions: it's we're they've I'm we'll he'd 'S 'T",
    "numbers 1234567890 3.14159 ½ ² Ⅻ ٣",
    "a literal <|endoftext|> stays text",
    "\x00\x01 control bytes \x7f and lone surrogate-free astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def shakespeare():
    with open(bundled_data("shakespeare.txt"), encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_encodes_like_tiktoken_gpt2(tok, gpt2_reference):
    for text in [shakespeare()] + UNICODE:
        assert tok.encode(text) == gpt2_reference.encode_ordinary(text)
    assert tok.eot == gpt2_reference.eot_token == EOT
    assert tok.vocab_size == gpt2_reference.n_vocab


def test_round_trip(tok):
    for text in [shakespeare()] + UNICODE:
        assert tok.decode(tok.encode(text)) == text


def test_decodes_without_tiktoken(monkeypatch, gpt2_reference):
    ids = {text: gpt2_reference.encode_ordinary(text) for text in [shakespeare()] + UNICODE}
    monkeypatch.setitem(sys.modules, "tiktoken", None)   # `import tiktoken` now fails
    tok = Tokenizer()
    for text, text_ids in ids.items():
        assert tok.decode(text_ids) == text
    assert tok.decode([EOT]) == "<|endoftext|>"
    with pytest.raises(LlmpyError, match="encoding text needs tiktoken"):
        tok.encode("hi")


def test_decode_out_of_range(tok):
    with pytest.raises(LlmpyError, match="out of range for vocab size 50257"):
        tok.decode([50257])


def llmc_write_tokenizer(path, enc, version=2):
    """llm.c's train_gpt2.py write_tokenizer, with struct instead of torch."""
    n = enc.max_token_value + 1
    fields = [20240328, version, n] + ([enc.eot_token] if version == 2 else [])
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", *fields, *[0] * (256 - len(fields))))
        for i in range(n):
            b = enc.decode_bytes([i])
            f.write(struct.pack("<B", len(b)))
            f.write(b)


def test_tokenizer_file_like_llmc(tmp_path, tok, gpt2_reference):
    ours, theirs = tmp_path / "ours.bin", tmp_path / "llmc.bin"
    tok.save(ours)
    llmc_write_tokenizer(theirs, gpt2_reference)
    assert ours.read_bytes() == theirs.read_bytes()
    back = Tokenizer(theirs)
    assert (back.token_bytes, back.eot) == (tok.token_bytes, tok.eot)
    text = shakespeare()[:20000] + "".join(UNICODE)
    assert back.encode(text) == tok.encode(text)   # the table alone gives the merge ranks


def test_reads_tokenizer_file_version_1(tmp_path, tok, gpt2_reference):
    path = tmp_path / "v1.bin"
    llmc_write_tokenizer(path, gpt2_reference, version=1)
    token_bytes, eot = read_tokenizer_file(path)
    assert token_bytes == tok.token_bytes and eot == EOT


def test_bad_tokenizer_files(tmp_path, tok):
    good = tmp_path / "good.bin"
    tok.save(good)
    data = good.read_bytes()
    cases = {"truncated.bin": (data[:-1], "truncated tokenizer file"),
             "trailing.bin": (data + b"x", "1 bytes after the last of 50257 tokens"),
             "version.bin": (data[:4] + struct.pack("<i", 3) + data[8:],
                             "unsupported tokenizer version 3")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(LlmpyError, match=message):
            read_tokenizer_file(tmp_path / name)
    with pytest.raises(LlmpyError, match="token 0 has 0 bytes"):
        write_tokenizer_file(tmp_path / "x.bin", [b"", b"a"], 1)
    assert not (tmp_path / "x.bin").exists()
