"""`llmpy convert` to a Hugging Face directory writes GPT-2's tokenizer (vocab.json, merges.txt,
tokenizer_config.json, derived from the bundled BPE ranks): transformers' AutoTokenizer on the
export encodes as tiktoken does, and decodes back. `convert` also takes a run directory."""
import numpy as np
import pytest
import tiktoken
import torch
import transformers
from tiktoken.load import load_tiktoken_bpe

from llmpy import cli
from llmpy.data.loader import bundled_data
from llmpy.model.layout import GPT2Config
from test_gpt2 import random_weights, write_llmc_model, write_llmc_tokens

# a GPT-2 vocabulary on a model small enough to write in a moment
CFG = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=1, num_heads=2, channels=8)
TEXTS = ["hello world", "ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
         "  leading spaces,\ttabs and trailing  ", "naïve café, 東京 and 🤖's 1234567 don't",
         "a<|endoftext|>b"]


def gpt2_tiktoken():
    """tiktoken's gpt2 encoding from the ranks file (shared/README.md: byte-identical to
    tiktoken's r50k_base, which cannot be downloaded here), with GPT-2's split pattern."""
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                r"""|\s+(?!\S)|\s+""",
        mergeable_ranks=load_tiktoken_bpe(bundled_data("gpt2.tiktoken")),
        special_tokens={"<|endoftext|>": 50256})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    write_llmc_model(d / "m.bin", CFG, random_weights(CFG, seed=3))
    assert cli.main(["convert", str(d / "m.bin"), str(d / "hf")]) == 0
    return d


def test_autotokenizer_encodes_as_tiktoken(exported):
    tok = transformers.AutoTokenizer.from_pretrained(exported / "hf")
    enc = gpt2_tiktoken()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == enc.encode(text, allowed_special="all"), text
        assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_run_directory_converts(exported, tmp_path):
    """The newest checkpoint of a run directory becomes an HF directory, which transformers
    loads with the checkpoint's weights (its loss on a batch equals the .bin's)."""
    d = tmp_path
    write_llmc_tokens(d / "train.bin", np.random.default_rng(0).integers(0, 50257, 200))
    assert cli.main(["train", "--model", str(exported / "m.bin"), "--train-data",
                     str(d / "train.bin"), "--backend", "numpy", "-b", "1", "-t", "8",
                     "--steps", "2", "--val-every", "0", "--sample-every", "0", "--run-dir",
                     str(d / "run"), "--checkpoint-every", "1"]) == 0
    assert cli.main(["convert", str(d / "run"), str(d / "hf")]) == 0
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (d / "hf").iterdir()}
    theirs = transformers.GPT2LMHeadModel.from_pretrained(d / "hf").eval()
    assert cli.main(["convert", str(d / "run" / "ckpt_00000002" / "model.bin"),
                     str(d / "hf2")]) == 0
    again = transformers.GPT2LMHeadModel.from_pretrained(d / "hf2").eval()
    x = torch.tensor([[1, 2, 3, 50256]])
    with torch.no_grad():
        np.testing.assert_array_equal(theirs(x).logits.numpy(), again(x).logits.numpy())
    original = transformers.GPT2LMHeadModel.from_pretrained(exported / "hf").eval()
    with torch.no_grad():       # two AdamW steps moved the weights
        assert not np.allclose(original(x).logits.numpy(), theirs(x).logits.numpy())
