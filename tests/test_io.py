"""llm.c's model and token files, read and written byte for byte, and the DataLoader's order."""
import struct

import numpy as np
import pytest

from llmpy.io.modelfile import bf16_to_fp32, fp32_to_bf16, num_params, read_model, write_model
from llmpy.model.layout import GPT2Config
from llmpy.data.loader import DataLoader, read_tokens, write_tokens
from llmpy.errors import LlmpyError
from test_gpt2 import write_llmc_model, write_llmc_tokens

CFG = GPT2Config(max_seq_len=8, vocab_size=70, num_layers=2, num_heads=2, channels=8)


def flat_params(cfg, seed=0):
    return np.random.default_rng(seed).standard_normal(num_params(cfg)).astype(np.float32)


def test_model_file_is_llmc_bytes(tmp_path):
    flat = flat_params(CFG)
    write_llmc_model(tmp_path / "theirs.bin", CFG, flat)
    write_model(tmp_path / "ours.bin", CFG, flat)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    cfg, params = read_model(tmp_path / "theirs.bin")
    assert cfg == CFG and cfg.padded_vocab_size == 128
    np.testing.assert_array_equal(params, flat)


def test_model_file_bf16(tmp_path):
    flat = flat_params(CFG)
    # independent bf16 rounding: torch's float32 -> bfloat16 cast (round to nearest even)
    torch = pytest.importorskip("torch")
    bits = torch.from_numpy(flat).to(torch.bfloat16).view(torch.int16).numpy().view("<u2")
    header = [20240326, 5, CFG.max_seq_len, CFG.vocab_size, CFG.num_layers, CFG.num_heads,
              CFG.channels, CFG.padded_vocab_size] + [0] * 248
    (tmp_path / "theirs.bin").write_bytes(struct.pack("<256i", *header) + bits.tobytes())
    write_model(tmp_path / "ours.bin", CFG, flat, version=5)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    _, params = read_model(tmp_path / "ours.bin")
    np.testing.assert_array_equal(params, torch.from_numpy(bits.view(np.int16)).view(
        torch.bfloat16).float().numpy())
    np.testing.assert_array_equal(bf16_to_fp32(fp32_to_bf16(params)), params)


def test_bf16_rounding_is_torch_s():
    # ties both ways, the largest finite values, infinities, and NaNs whose rounding carry
    # would reach the exponent (0x7FFFFFFF, 0x7F800001 and their negatives)
    torch = pytest.importorskip("torch")
    special = np.array([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x7F800000, 0xFF800000, 0x7FFFFFFF,
                        0xFFFFFFFF, 0x7F800001, 0x7FC00000, 0x00000001], dtype=np.uint32)
    x = np.r_[special.view(np.float32),
              np.random.default_rng(0).standard_normal(10000).astype(np.float32) * 1e3]
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    got, nan = fp32_to_bf16(x), np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(bf16_to_fp32(got[nan])).all()   # torch's NaN bits vary by code path


def test_token_files(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 1000)
    write_llmc_tokens(tmp_path / "theirs.bin", tokens)
    write_tokens(tmp_path / "ours.bin", tokens)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    np.testing.assert_array_equal(read_tokens(tmp_path / "theirs.bin"), tokens)
    # the original llm.c README's format: a headerless stream of int32 token ids
    tokens.astype("<i4").tofile(tmp_path / "legacy.bin")
    np.testing.assert_array_equal(read_tokens(tmp_path / "legacy.bin"), tokens)


def test_dataloader_order_like_llmc(tmp_path):
    tokens = np.arange(100) % 70
    write_tokens(tmp_path / "d.bin", tokens)
    B, T = 2, 5
    loader = DataLoader(str(tmp_path / "d.bin"), B, T)
    windows = (len(tokens) - 1) // (B * T)
    for i in range(windows + 1):              # one past the end wraps to the start
        x, y = loader.next_batch()
        start = (i % windows) * B * T
        np.testing.assert_array_equal(x.ravel(), tokens[start:start + B * T])
        np.testing.assert_array_equal(y.ravel(), tokens[start + 1:start + B * T + 1])


def test_dataloader_shuffle_and_shards(tmp_path):
    """Shuffled: each epoch visits every window once, one shard at a time; the shard order is
    drawn anew every epoch, and the window order anew for every (epoch, shard). Three epochs
    of 3 shards of 5 windows: the same order drawn every time has odds 1/36 for the shards
    and 1/120**2 for a shard's windows, so "not all the same" is what a correct loader shows
    (seed 7 does) and a loader that ignores the epoch or the shard never does."""
    for i in range(3):
        write_tokens(tmp_path / f"s_train_{i:06d}.bin", np.arange(41) + 100 * i)
    B, T, epochs = 2, 4, 3                     # 5 windows per shard, 15 per epoch
    loader = DataLoader(str(tmp_path / "s_train_*.bin"), B, T, shuffle=True, seed=7)
    seen = [int(loader.next_batch()[0][0, 0]) for _ in range(15 * epochs)]
    # (epoch, position in the epoch's shard order, position in the shard) -> (shard, window)
    order = np.array([(x // 100, x % 100 // 8) for x in seen]).reshape(epochs, 3, 5, 2)
    for e in order:
        assert sorted(map(tuple, e.reshape(15, 2))) == [(s, w) for s in range(3) for w in range(5)]
        assert (e[:, :, 0] == e[:, :1, 0]).all()                  # one shard at a time
    shards = order[:, :, 0, 0]                                    # (epochs,3) shard orders
    # (epochs,shard,5) each shard's window order, by shard id
    windows = np.take_along_axis(order[..., 1], np.argsort(shards)[..., None], 1)
    assert len({tuple(s) for s in shards}) > 1                    # drawn per epoch
    assert all(len({tuple(w) for w in windows[:, s]}) > 1 for s in range(3))   # per epoch
    assert all(len({tuple(w) for w in windows[e]}) > 1 for e in range(epochs))  # per shard
    again = DataLoader(str(tmp_path / "s_train_*.bin"), B, T, shuffle=True, seed=7)
    assert [int(again.next_batch()[0][0, 0]) for _ in range(15 * epochs)] == seen
    # resuming from a saved position, in the first epoch or in the middle of the second,
    # continues identically
    for done in (6, 22):
        again.reset()
        for _ in range(done):
            again.next_batch()
        resumed = DataLoader(str(tmp_path / "s_train_*.bin"), B, T, shuffle=True, seed=7)
        resumed.load_state(again.state())
        assert [int(resumed.next_batch()[0][0, 0]) for _ in range(15 * epochs - done)] == \
            seen[done:]


def test_dataloader_ranks_are_disjoint(tmp_path):
    write_tokens(tmp_path / "d.bin", np.arange(201))
    B, T = 2, 5                                # 20 windows of B*T tokens, 10 per rank
    starts = [[int(loader.next_batch()[0][0, 0]) for _ in range(10)]
              for loader in (DataLoader(str(tmp_path / "d.bin"), B, T, rank=r, world=2)
                             for r in range(2))]
    assert starts[0] == list(range(0, 200, 2 * B * T))
    assert starts[1] == list(range(B * T, 200, 2 * B * T))


def test_dataloader_checks_each_shard_s_ids_as_it_opens_it(tmp_path):
    """Only headers at the start (FineWeb's shards are 20 GB, read by every rank); a shard's
    token ids when it is opened: the first one's before any batch."""
    write_tokens(tmp_path / "s_000000.bin", np.arange(21) % 50)
    write_tokens(tmp_path / "s_000001.bin", np.r_[np.arange(20) % 50, 50])   # one id too large
    loader = DataLoader(str(tmp_path / "s_*.bin"), 2, 5, vocab_size=50)
    assert [int(loader.next_batch()[0][0, 0]) for _ in range(2)] == [0, 10]
    with pytest.raises(LlmpyError, match="s_000001.bin: token id 50 at position 20 is out of"):
        loader.next_batch()
    with pytest.raises(LlmpyError, match="s_000001.bin: token id 50"):
        DataLoader(str(tmp_path / "s_000001.bin"), 2, 5, vocab_size=50)


def test_a_directory_for_a_file_and_a_file_for_a_directory(tmp_path):
    """Every command that reads a file says so in one line when given a directory (an HF model
    directory too: debug-state reads only llm.c's .bin), and every output directory when it
    names a file."""
    from test_cli import assert_one_line_error, cli
    m, d, adir, afile = tmp_path / "m.bin", tmp_path / "d.bin", tmp_path / "adir", tmp_path / "f"
    write_llmc_model(m, CFG, flat_params(CFG))
    write_llmc_tokens(d, np.arange(200) % CFG.vocab_size)
    adir.mkdir()
    (adir / "model.safetensors").write_bytes(b"")          # an HF model directory, to debug-state
    afile.write_text("a file")
    small = ["-b", 2, "-t", 4, "--backend", "numpy", "--sample-every", 0, "--steps", 1]
    for args, kind in [(["train", "--model", m, "--train-data", adir, *small], "a file"),
                       (["train", "--model", m, "--train-data", d, "--val-data", adir, *small],
                        "a file"),
                       (["train", "--model", m, "--train-data", tmp_path / "ad*", *small],
                        "a file"),
                       (["eval", "--model", m, "--val-data", adir, "-b", 2, "-t", 4], "a file"),
                       (["eval", "--model", m, "--hellaswag-data", adir, "-b", 2, "-t", 4],
                        "an llm.c eval file"),
                       (["test-model", m, adir, "--steps", 0], "an llm.c debug state file"),
                       (["debug-state", adir], "an llm.c model file")]:
        assert_one_line_error(cli(*args), f"{adir}: is a directory, not {kind}")
    for args in (["train", "--model", m, "--train-data", d, "--run-dir", afile, *small],
                 ["prepro", "hellaswag", "--input", tmp_path / "hs.jsonl", "--out", afile],
                 ["convert", m, afile]):
        assert_one_line_error(cli(*args), f"{afile}: is a file, not a directory")
