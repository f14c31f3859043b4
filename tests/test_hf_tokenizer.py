"""Hugging Face tokenizers (tokenizer.json) and `llmpy prepro text --tokenizer DIR`.

The tokenizers are byte-level BPEs trained here with the `tokenizers` library on the bundled
Shakespeare. The oracle for the token files is llm.c's llama3 dev/data recipe run through
transformers (tokenizer.encode('')[0] before each document, each document encoded with
add_special_tokens=False, split_special_tokens=True), written by struct as llm.c's
data_common.write_datafile writes them, not by our writer.
"""
import json
import struct

import numpy as np
import pytest

from llmpy.data.loader import DataLoader, bundled_data, read_tokens
from llmpy.errors import LlmpyError
from llmpy.io.hf_tokenizer import HFTokenizer
from test_cli import assert_one_line_error, cli

tokenizers = pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SHIFT = 70_000      # moves the trained tokens past uint16's ids


def train_bpe(vocab_size=300):
    """A byte-level BPE trained on Shakespeare, with Llama 3's special tokens at ids 0 and 1,
    which adds <|begin_of_text|> to every text, as Llama 3's tokenizer.json does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([bundled_data("shakespeare.txt")], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A",
                                                      special_tokens=[(BOS, 0)])
    return tok


def save(tok, path, bos=BOS, eos=EOS):
    """A model directory's tokenizer files, as transformers saves them."""
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos,
                                         eos_token=eos).save_pretrained(path)
    return path


def shifted(tok):
    """The same BPE with every trained token's id moved up by SHIFT (placeholders between), so
    that every id it encodes text to but the specials needs uint32."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    spec["model"]["vocab"] = {t: i + SHIFT if i >= 2 else i for t, i in vocab.items()}
    spec["model"]["vocab"].update({f"<placeholder_{i}>": i for i in range(2, SHIFT + 2)})
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return save(train_bpe(), tmp_path_factory.mktemp("small"))


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    return save(shifted(train_bpe()), tmp_path_factory.mktemp("large"))


def llmc_tokens(model_dir, documents):
    """llm.c's dev/data/fineweb.py tokenize_llama, through transformers."""
    t = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    eot = t.encode("")[0]
    out = []
    for doc in documents:
        out.append(eot)
        out.extend(t.encode(doc, add_special_tokens=False, verbose=False,
                            split_special_tokens=True))
    return out


def llmc_write_datafile(path, toks, model_desc):
    """llm.c's data_common.write_datafile: 256 int32s, then uint16 (gpt-2) / uint32 (llama-3)."""
    magic, version, fmt = {"gpt-2": (20240520, 1, "H"), "llama-3": (20240801, 7, "I")}[model_desc]
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", magic, version, len(toks), *[0] * 253))
        f.write(struct.pack(f"<{len(toks)}{fmt}", *toks))


DOCS = ["First Citizen:\nBefore we proceed any further, hear me speak.",
        f"a literal {EOS} and {BOS} stay text; héllo ☃ \u00e9\n\n",
        "x"]


def test_encode_decode_like_transformers(small):
    tok = HFTokenizer(small)
    assert tok.vocab_size == 300 and tok.eot == 0
    want = llmc_tokens(small, DOCS)
    assert tok.encode_documents(DOCS).tolist() == want
    assert tok.encode_documents(DOCS).dtype == np.uint16
    ref = transformers.AutoTokenizer.from_pretrained(str(small))
    for doc in DOCS:
        ids = tok.encode(doc)
        assert ids == ref.encode(doc, add_special_tokens=False, split_special_tokens=True)
        assert tok.decode(ids) == doc                       # byte-level BPE is lossless
    assert tok.decode([0, *tok.encode("hi")]) == BOS + "hi"  # special tokens are printed
    # half of a multi-byte character: U+FFFD, which `llmpy sample` waits past
    snowman = tok.encode("☃")
    assert len(snowman) > 1 and tok.decode(snowman[:1]).endswith("\ufffd")
    with pytest.raises(LlmpyError, match="token id 300 out of range for vocab size 300"):
        tok.decode([1, 300])
    # the tokenizer.json file itself names the tokenizer as well as its directory
    assert HFTokenizer(small / "tokenizer.json").encode(DOCS[0]) == tok.encode(DOCS[0])


def test_document_token_without_bos(small, tmp_path):
    """A tokenizer that adds nothing to a text (Qwen2's) puts tokenizer_config.json's eos_token
    before each document; one with neither fails in one line."""
    tok = train_bpe()
    tok.post_processor = None
    save(tok, tmp_path / "qwen", bos=None, eos=EOS)
    assert HFTokenizer(tmp_path / "qwen").eot == 1
    (tmp_path / "qwen" / "tokenizer_config.json").write_text('{"eos_token": {"content": "%s"}}'
                                                              % EOS)
    assert HFTokenizer(tmp_path / "qwen").eot == 1
    (tmp_path / "qwen" / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>"}')
    with pytest.raises(LlmpyError, match="tokenizer.json: the tokenizer adds no token"):
        HFTokenizer(tmp_path / "qwen")


def test_vocab_check(small):
    tok = HFTokenizer(small)
    tok.check_vocab(300, "m.bin")
    tok.check_vocab(384, "m.bin")          # reserved rows past the tokenizer's ids (Qwen2)
    with pytest.raises(LlmpyError) as e:
        tok.check_vocab(299, "m.bin")
    assert str(e.value) == (f"{small / 'tokenizer.json'}: the tokenizer has 300 tokens, more "
                            "than the vocab size 299 of m.bin: it is another model's tokenizer")


@pytest.mark.parametrize("which,version", [("small", 1), ("large", 7)])
def test_prepro_text_like_llmc(request, tmp_path, which, version):
    """uint16 files (version 1) for a 300-token vocabulary, uint32 (version 7) past 65,536:
    the bytes of llm.c's recipe, and the DataLoader serves them."""
    model_dir = request.getfixturevalue(which)
    (tmp_path / "a.txt").write_text(DOCS[0] * 30)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in DOCS))
    r = cli("prepro", "text", tmp_path / "a.txt", tmp_path / "b.jsonl", "--out", tmp_path / "o",
            "--val-fraction", 0.25, "--shard-tokens", 300, "--tokenizer", model_dir)
    assert r.returncode == 0, r.stderr
    toks = llmc_tokens(model_dir, [DOCS[0] * 30] + DOCS)
    if version == 7:
        assert max(toks) >= SHIFT
    n_val = int(0.25 * len(toks))
    parts = [(split, t[i:i + 300]) for split, t in (("val", toks[:n_val]), ("train", toks[n_val:]))
             for i in range(0, len(t), 300)]                 # one shard index across both splits
    assert [s for s, _ in parts].count("val") == 2
    for i, (split, part) in enumerate(parts):
        llmc_write_datafile(tmp_path / "want.bin", part, {1: "gpt-2", 7: "llama-3"}[version])
        got = tmp_path / "o" / f"a_{split}_{i:06d}.bin"
        assert got.read_bytes() == (tmp_path / "want.bin").read_bytes(), got
    assert not (tmp_path / "o" / f"a_train_{len(parts):06d}.bin").exists()
    vocab = HFTokenizer(model_dir).vocab_size
    x, y = DataLoader(str(tmp_path / "o" / "a_val_000000.bin"), 2, 8, vocab).next_batch()
    assert x.ravel().tolist() == toks[:16] and y.ravel().tolist() == toks[1:17]
    assert read_tokens(tmp_path / "o" / "a_val_000000.bin").dtype == \
        {1: np.uint16, 7: np.uint32}[version]


def test_prepro_text_bad_tokenizer(small, tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    (tmp_path / "empty").mkdir()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "tokenizer.json").write_text('{"model": 3}')

    def prepro(tokenizer):
        return cli("prepro", "text", tmp_path / "a.txt", "--out", tmp_path / "o",
                   "--tokenizer", tokenizer)
    assert_one_line_error(prepro(tmp_path / "empty"), "empty/tokenizer.json: no such file")
    assert_one_line_error(prepro(tmp_path / "nope"), "nope: no such file")
    assert_one_line_error(prepro(tmp_path / "junk"), "junk/tokenizer.json",
                          "not a tokenizer.json the tokenizers library reads")
    assert not (tmp_path / "o").exists()          # nothing written before the tokenizer loads
