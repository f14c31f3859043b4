"""llm.c's llama3 files: the uint32 token file (version 7), the model file (magic 20240803) and
the debug state, read and written byte for byte, and Hugging Face Llama-family directories.

Oracles: writers written out below with struct and numpy the way llm.c's llama3 branch
(train_llama3.py's write_model / write_tensors / write_state / write_training_history,
dev/data/data_common.py's write_datafile) writes its files, not calling llmpy's writers; and
transformers' own models for the HF directories.
"""
import struct

import numpy as np
import pytest

from llmpy.config import GPT2Config
from llmpy.data import DataLoader, read_tokens, write_tokens
from llmpy.errors import LlmpyError
from test_cli import assert_one_line_error, cli
from test_gpt2 import random_weights, write_llmc_model, write_llmc_tokens


# ----------------------------------------------------------------------------- token files

def llmc_llama_tokens(path, tokens):
    """data_common.write_datafile(model_desc="llama-3"): magic 20240801, version 7, uint32."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240801, 7, len(tokens), *[0] * 253))
        f.write(struct.pack(f"<{len(tokens)}I", *tokens))


def test_uint32_token_file_is_llmc_bytes(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 128256, 1000)
    tokens[:3] = [0, 65535, 128255]
    llmc_llama_tokens(tmp_path / "theirs.bin", tokens.tolist())
    write_tokens(tmp_path / "ours.bin", tokens, version=7)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    got = read_tokens(tmp_path / "theirs.bin", vocab_size=128256)
    assert got.dtype == np.uint32
    np.testing.assert_array_equal(got, tokens)
    B, T = 4, 8
    x, y = DataLoader(str(tmp_path / "theirs.bin"), B, T, vocab_size=128256).next_batch()
    np.testing.assert_array_equal(x.ravel(), tokens[:B * T])
    np.testing.assert_array_equal(y.ravel(), tokens[1:B * T + 1])
    with pytest.raises(LlmpyError, match="ours.bin: token id 128255 at position 2 is out of"):
        read_tokens(tmp_path / "ours.bin", vocab_size=128255)
    with pytest.raises(LlmpyError, match="token ids must fit in uint16"):
        write_tokens(tmp_path / "small.bin", tokens)


def test_uint16_file_for_a_large_vocabulary(tmp_path):
    """A uint16 file cannot hold a vocabulary past 65,536 ids: it was tokenized for another
    model (GPT-2's tokens for Llama 3), which the DataLoader says before any batch, for every
    shard. 65,536 ids (0..65535) still fit."""
    write_llmc_tokens(tmp_path / "s_000000.bin", np.arange(100))
    llmc_llama_tokens(tmp_path / "s_000001.bin", list(range(100)))
    DataLoader(str(tmp_path / "s_*.bin"), 2, 4, vocab_size=65536)
    for pattern in ("s_*.bin", "s_000000.bin"):
        with pytest.raises(LlmpyError) as e:
            DataLoader(str(tmp_path / pattern), 2, 4, vocab_size=65537)
        assert str(e.value).startswith(f"{tmp_path / 's_000000.bin'}: uint16 token file "
                                       "(version 1) for a vocabulary of 65,537 tokens")
    with pytest.raises(LlmpyError, match="s_000000.bin: uint16 token file"):
        read_tokens(tmp_path / "s_000000.bin", vocab_size=128256)


CFG = GPT2Config(max_seq_len=8, vocab_size=70, num_layers=1, num_heads=2, channels=8)


@pytest.mark.parametrize("magic", [0, 7, 20240, 2 ** 17 - 1])
@pytest.mark.parametrize("version", [1, 7])
def test_damaged_magic_is_no_legacy_stream(tmp_path, magic, version):
    """A token file whose magic is damaged into a small number reads as a headerless int32
    stream unless its header is recognised: the error names the magic, not a "negative token
    id" or an out-of-range one (uint16 pairs read as int32)."""
    write_llmc_model(tmp_path / "m.bin", CFG, random_weights(CFG))
    tokens = (np.arange(200) * 7) % CFG.vocab_size
    tokens[1::2] = 65000 % 70       # high halves of the int32 pairs: a big id either way
    (llmc_llama_tokens if version == 7 else write_llmc_tokens)(tmp_path / "d.bin", tokens.tolist())
    raw = bytearray((tmp_path / "d.bin").read_bytes())
    raw[:4] = struct.pack("<i", magic)
    (tmp_path / "d.bin").write_bytes(raw)
    r = cli("eval", "--model", tmp_path / "m.bin", "--val-data", tmp_path / "d.bin", "-b", 2,
            "-t", 4, "--backend", "numpy")
    assert_one_line_error(r, "d.bin", f"bad magic number {magic}", "20240520", "20240801")


def test_token_file_bad_headers(tmp_path):
    tokens = list(range(50))
    llmc_llama_tokens(tmp_path / "d.bin", tokens)
    raw = (tmp_path / "d.bin").read_bytes()
    cases = {"version.bin": (raw[:4] + struct.pack("<i", 1) + raw[8:], "unsupported token data "
                             "version 1 (supported: 7)"),
             "short.bin": (raw[:-4], "header says 50 tokens (1224 bytes), but the file has 1220"),
             "header.bin": (raw[:1000], "truncated token data file")}
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LlmpyError) as e:
            read_tokens(tmp_path / name)
        assert str(e.value) == f"{tmp_path / name}: {words}" or words in str(e.value), e.value
    # a legacy int32 stream whose second id is a version and third a count is still a stream
    # unless that count sizes the file exactly
    legacy = np.r_[5, 7, 3, np.arange(300)].astype("<i4")
    legacy.tofile(tmp_path / "legacy.bin")
    np.testing.assert_array_equal(read_tokens(tmp_path / "legacy.bin"), legacy)
