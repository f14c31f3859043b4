"""`llmpy prepro`: the files equal an independent tokenization written the way llm.c's
dev/data scripts write them (tiktoken + struct, not our writer); bad input fails in one line."""
import json
import os
import random
import re
import struct
import tarfile
from pathlib import Path

import pytest

from llmpy.cli import main
from llmpy.data import bundled_data
from llmpy.errors import LlmpyError
from llmpy.prepro import common, tinyshakespeare
from llmpy.prepro.common import cut_text, encode_documents, encode_pieces

SHAKESPEARE = bundled_data("shakespeare.txt")
EOT = 50256


def llmc_write_datafile(path, toks):
    """llm.c's data_common.write_datafile for gpt-2: 256 int32 header, then uint16 tokens."""
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, len(toks), *[0] * 253))
        f.write(struct.pack(f"<{len(toks)}H", *toks))


def llmc_documents(enc, documents):
    """EOT before each document, each encoded as ordinary text."""
    toks = []
    for doc in documents:
        toks.append(EOT)
        toks.extend(enc.encode_ordinary(doc))
    return toks


def llmc_tinyshakespeare(enc, text):
    """llm.c's dev/data/tinyshakespeare.py tokenize(), both of its versions: the first put
    <|endoftext|> after every "\\n\\n" and encoded once; the current one splits into sections."""
    first = enc.encode("<|endoftext|>" + text.replace("\n\n", "\n\n<|endoftext|>"),
                       allowed_special={"<|endoftext|>"})
    sections = text.split("\n\n")
    current = llmc_documents(enc, [s + "\n\n" for s in sections[:-1]] + sections[-1:])
    assert first == current
    return current[:32768], current[32768:]


def run(capsys, *argv):
    """(exit code, stdout, stderr lines) of `llmpy ARGV`."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()


def test_tinyshakespeare_like_llmc(tmp_path, capsys, monkeypatch, gpt2_reference):
    monkeypatch.setattr(common, "MIN_WORK_CHARS", 1 << 16)   # 2 workers: a pool of 2
    val, train = llmc_tinyshakespeare(gpt2_reference, Path(SHAKESPEARE).read_text(encoding="utf-8"))
    llmc_write_datafile(tmp_path / "val.bin", val)
    llmc_write_datafile(tmp_path / "train.bin", train)
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        code, _, err = run(capsys, "prepro", "tinyshakespeare", "--input", SHAKESPEARE,
                           "--out", out, "--workers", workers)
        assert code == 0 and err == []
        assert sorted(os.listdir(out)) == ["tiny_shakespeare_train.bin", "tiny_shakespeare_val.bin"]
        assert (out / "tiny_shakespeare_val.bin").read_bytes() == (tmp_path / "val.bin").read_bytes()
        assert (out / "tiny_shakespeare_train.bin").read_bytes() == (tmp_path / "train.bin").read_bytes()


def test_shipped_default_is_a_fresh_tokenization(tmp_path):
    """Provenance of llmpy/data/shakespeare_{val,train}.bin: write_split of the shipped text."""
    text = Path(SHAKESPEARE).read_text(encoding="utf-8")
    tinyshakespeare.write_split(text, tmp_path, "shakespeare", workers=2)
    for split in ("val", "train"):
        name = f"shakespeare_{split}.bin"
        assert (tmp_path / name).read_bytes() == Path(bundled_data(name)).read_bytes()


def test_tinyshakespeare_download(tmp_path, capsys, monkeypatch):
    """The download code, run on a file:// URL (no network here)."""
    monkeypatch.setattr(tinyshakespeare, "URL", Path(SHAKESPEARE).as_uri())
    out = tmp_path / "d"
    code, stdout, _ = run(capsys, "prepro", "tinyshakespeare", "--out", out)
    assert code == 0 and "downloading" in stdout
    assert (out / "tiny_shakespeare.txt").read_bytes() == Path(SHAKESPEARE).read_bytes()
    assert sorted(os.listdir(out)) == ["tiny_shakespeare.txt", "tiny_shakespeare_train.bin",
                                       "tiny_shakespeare_val.bin"]
    code, stdout, _ = run(capsys, "prepro", "tinyshakespeare", "--out", out)
    assert code == 0 and "skipping the download" in stdout

    monkeypatch.setattr(tinyshakespeare, "URL", (tmp_path / "missing.txt").as_uri())
    code, _, err = run(capsys, "prepro", "tinyshakespeare", "--out", tmp_path / "e")
    assert code == 1 and len(err) == 1 and err[0].startswith("llmpy: error: file:")
    assert "download failed" in err[0] and os.listdir(tmp_path / "e") == []


def whitespace_soup(n, seed):
    """Text that exercises every pre-tokenizer rule: runs of all kinds of whitespace (Unicode
    and \\x1c, which Python calls space and GPT-2's regex does not), letters, digits, marks."""
    alphabet = ["a", "bc", " ", "  ", "\n", "\n\n", "\t", "\r", "7", ".", "'s", "'ll", "é", "日",
                "🙂", "\u3000", "\xa0", "\x1c", "\x85", "!?", "'"]
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


def test_cut_text_encodes_like_uncut(gpt2_reference):
    enc = gpt2_reference
    for text in (Path(SHAKESPEARE).read_text(encoding="utf-8")[:200000], whitespace_soup(30000, 0),
                 whitespace_soup(30000, 1)):
        whole = enc.encode_ordinary(text)
        for size in (1, 5, 100, 3000):
            pieces = cut_text(text, size)
            assert "".join(pieces) == text and len(pieces) > 1
            assert [t for p in pieces for t in enc.encode_ordinary(p)] == whole


def test_encode_pieces_both_paths(gpt2_reference):
    docs = [whitespace_soup(3000, seed) for seed in range(5)]
    pieces = [(i == 0, p) for d in docs for i, p in enumerate(cut_text(d, 200))]
    expected = llmc_documents(gpt2_reference, docs)
    assert encode_pieces(pieces).tolist() == expected                     # one tiktoken call
    docs.append("a literal <|endoftext|> is text")
    pieces.append((True, docs[-1]))
    assert encode_pieces(pieces).tolist() == llmc_documents(gpt2_reference, docs)  # per piece


def test_encode_documents_in_processes(gpt2_reference, monkeypatch):
    monkeypatch.setattr(common, "MIN_WORK_CHARS", 1)   # use processes, cut even small documents
    docs = [whitespace_soup(20000, seed) for seed in range(3)] + ["", "short"]
    expected = llmc_documents(gpt2_reference, docs)
    for workers in (1, 2, 3):
        assert encode_documents(docs, workers).tolist() == expected


def make_stories(d, n_shards, per_shard=7):
    """Shards in the public TinyStories_all_data layout, with whitespace strip() removes."""
    rng = random.Random(0)
    os.makedirs(d, exist_ok=True)
    shards = []
    for k in range(n_shards):
        stories = [{"story": f"  \n{whitespace_soup(rng.randrange(5, 300), 100 * k + i)}  \n",
                    "instruction": {"words": ["x"]}, "source": "GPT-4"} for i in range(per_shard)]
        (Path(d) / f"data{k:02d}.json").write_text(json.dumps(stories), encoding="utf-8")
        shards.append(stories)
    return shards


def llmc_tinystories(enc, shards, out):
    """llm.c's dev/data/tinystories.py tokenize(), with shards joined in file order."""
    for split, split_shards in (("val", shards[:1]), ("train", shards[1:])):
        toks = []
        for index, stories in enumerate(split_shards):
            stories = list(stories)
            random.Random(1337 + index).shuffle(stories)
            toks.extend(llmc_documents(enc, [s["story"].strip() for s in stories]))
        llmc_write_datafile(Path(out) / f"TinyStories_{split}.bin", toks)


def test_tinystories_like_llmc(tmp_path, capsys, gpt2_reference):
    shards = make_stories(tmp_path / "json", 4)
    llmc_tinystories(gpt2_reference, shards, tmp_path)
    with tarfile.open(tmp_path / "TinyStories_all_data.tar.gz", "w:gz") as tar:
        for f in sorted(os.listdir(tmp_path / "json")):
            tar.add(tmp_path / "json" / f, arcname=f)
    for source in ("json", "TinyStories_all_data.tar.gz"):
        out = tmp_path / f"out-{source}"
        code, _, err = run(capsys, "prepro", "tinystories", "--input", tmp_path / source,
                           "--out", out)
        assert code == 0 and err == []
        for split in ("val", "train"):
            name = f"TinyStories_{split}.bin"
            assert (out / name).read_bytes() == (tmp_path / name).read_bytes()


def test_text_shards(tmp_path, capsys, gpt2_reference):
    soup = [whitespace_soup(4000, seed) for seed in range(4)]
    (tmp_path / "a.txt").write_text(soup[0], encoding="utf-8")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n\n"
                                              for i, t in enumerate(soup[1:])), encoding="utf-8")
    out = tmp_path / "out"
    code, _, err = run(capsys, "prepro", "text", tmp_path / "a.txt", tmp_path / "b.jsonl",
                       "--out", out, "--val-fraction", 0.25, "--shard-tokens", 1000)
    assert code == 0 and err == []
    with open(tmp_path / "a.txt", encoding="utf-8") as f:   # as Python reads text: \r -> \n
        docs = [f.read()] + soup[1:]
    stream = llmc_documents(gpt2_reference, docs)
    n_val = len(stream) // 4
    expected = [("val", stream[:n_val])] + [("train", stream[n_val:])]
    names = []
    for split, toks in expected:
        for start in range(0, len(toks), 1000):
            names.append(f"a_{split}_{len(names):06d}.bin")
            llmc_write_datafile(tmp_path / names[-1], toks[start:start + 1000])
    assert sorted(os.listdir(out)) == sorted(names)
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()


def test_text_removes_stale_shards(tmp_path, capsys):
    """A glob of a re-run's shards must not pick up the extra shards of an earlier run."""
    out = tmp_path / "out"
    runs = []
    for shard_tokens in (50000, 200000):
        code, stdout, _ = run(capsys, "prepro", "text", SHAKESPEARE, "--out", out,
                              "--shard-tokens", shard_tokens)
        assert code == 0
        runs.append(sorted(os.path.basename(p) for p in re.findall(r"tokens to (\S+)", stdout)))
        assert sorted(os.listdir(out)) == runs[-1]
    assert len(runs[1]) < len(runs[0])


def test_train_on_shard_glob(tmp_path, capsys):
    code, _, _ = run(capsys, "prepro", "text", SHAKESPEARE, "--out", tmp_path, "--name", "x",
                     "--shard-tokens", 100000)
    assert code == 0 and len(list(tmp_path.glob("x_train_*.bin"))) == 4
    code, out, err = run(capsys, "train", "--model", "tiny", "--train-data",
                         f"{tmp_path}/x_train_*.bin", "--val-data", f"{tmp_path}/x_val_*.bin",
                         "--steps", 2, "-b", 2, "-t", 32, "--val-every", 2, "--val-batches", 1,
                         "--sample-every", 0)
    assert code == 0, err
    assert re.search(r"step +2/2 \| loss \d", out) and "val loss" in out


def test_write_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def fail_second(path, tokens):
        calls.append(path)
        if len(calls) == 2:
            raise LlmpyError(f"{path}: cannot write: No space left on device")
        Path(path).write_bytes(b"x")
    monkeypatch.setattr(common, "write_tokens", fail_second)
    with pytest.raises(LlmpyError, match="No space left"):
        common.write_token_files([(tmp_path / "a.bin", [1]), (tmp_path / "b.bin", [2])])
    assert os.listdir(tmp_path) == []


def bad_inputs(tmp_path, enc):
    """(argv, expected message) for each kind of bad input."""
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 ok".encode("latin-1"))
    small = "To be, or not to be.\n\nThat is the question.\n"
    (tmp_path / "small.txt").write_text(small)
    n_shakespeare = sum(map(len, llmc_tinyshakespeare(enc, small)))
    n_text = len(llmc_documents(enc, [small]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    (tmp_path / "afile").write_text("not a directory")
    make_stories(tmp_path / "one_shard", 1)
    out = tmp_path / "out"
    text, shakespeare = ["prepro", "text"], ["prepro", "tinyshakespeare", "--input"]
    return [
        (shakespeare + [tmp_path / "missing.txt", "--out", out], "missing.txt: no such file"),
        (text + [tmp_path / "empty.txt", "--out", out], "empty.txt: empty file"),
        (text + [tmp_path / "latin1.txt", "--out", out],
         "latin1.txt: not UTF-8 text: byte 0xe9 at byte offset 3"),
        (text + [tmp_path / "bad.jsonl", "--out", out], 'bad.jsonl: line 2: no "text" string'),
        (shakespeare + [SHAKESPEARE, "--out", tmp_path / "afile" / "sub"],
         "cannot create the output directory"),
        (shakespeare + [tmp_path / "small.txt", "--out", out],
         f"small.txt: {n_shakespeare} tokens are too few for the 32,768-token val split"),
        (text + [tmp_path / "small.txt", "--out", out, "--val-fraction", 0.05],
         f"small.txt: {n_text} tokens are too few for --val-fraction 0.05 (val would get 0, "
         f"train {n_text})"),
        (["prepro", "tinystories", "--input", tmp_path / "one_shard", "--out", out],
         "1 .json shards; the first is the val split"),
        (["prepro", "tinystories", "--input", tmp_path / "empty.txt", "--out", out],
         "empty.txt: empty file"),
        (["prepro", "tinystories", "--input", tmp_path / "afile", "--out", out],
         "afile: not a tar or tar.gz archive"),
    ]


def test_bad_input_one_line_no_output(tmp_path, capsys, gpt2_reference):
    for argv, message in bad_inputs(tmp_path, gpt2_reference):
        code, _, err = run(capsys, *argv)
        assert code == 1, argv
        assert len(err) == 1 and err[0].startswith("llmpy: error: ") and message in err[0], err
        out = tmp_path / "out"
        assert not out.exists() or os.listdir(out) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to any directory")
def test_unwritable_output_dir(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    code, _, err = run(capsys, "prepro", "tinyshakespeare", "--input", SHAKESPEARE, "--out", out)
    assert code == 1 and err == [f"llmpy: error: {out}: output directory is not writable"]
    assert os.listdir(out) == []
