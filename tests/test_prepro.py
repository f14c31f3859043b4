"""`llmpy prepro`: the files equal an independent tokenization written the way llm.c's
dev/data scripts write them (tiktoken + struct, not our writer); bad input fails in one line."""
import json
import os
import random
import re
import struct
import sys
import tarfile
from pathlib import Path

import pytest

from llmpy.cli import main
from llmpy.data.loader import bundled_data
from llmpy.errors import LlmpyError
from llmpy.data import loader as data
from llmpy.data.prepro import common, fineweb, hellaswag, tinyshakespeare, tinystories
from llmpy.data.prepro.common import cut_text, encode_documents, encode_pieces

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



@pytest.mark.parametrize("module", [tinyshakespeare, tinystories, hellaswag])
def test_offline_download_says_how_and_leaves_nothing(tmp_path, capsys, monkeypatch, module):
    """Offline: one line that names --input, and no directory left behind; an existing --out
    stays."""
    name = module.__name__.rsplit(".", 1)[1]
    monkeypatch.setattr(module, "URL", (tmp_path / "missing_{split}").as_uri())
    code, _, err = run(capsys, "prepro", name, "--out", tmp_path / "e")
    assert code == 1 and len(err) == 1 and err[0].startswith("llmpy: error: file:")
    assert "download failed" in err[0] and "--input" in err[0]
    assert not (tmp_path / "e").exists()
    (tmp_path / "kept").mkdir()
    assert run(capsys, "prepro", name, "--out", tmp_path / "kept")[0] == 1
    assert os.listdir(tmp_path / "kept") == []


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
        (text + [tmp_path / "small.txt", "--out", out, "--workers", -1],
         "--workers must be at least 0 (got -1)"),
    ]


def test_bad_input_one_line_no_output(tmp_path, capsys, gpt2_reference):
    for argv, message in bad_inputs(tmp_path, gpt2_reference):
        code, _, err = run(capsys, *argv)
        assert code == 1, argv
        assert len(err) == 1 and err[0].startswith("llmpy: error: ") and message in err[0], err
        out = tmp_path / "out"
        assert not out.exists() or os.listdir(out) == []


def test_unwritable_output_dir(tmp_path, capsys, monkeypatch):
    """The directory's mode says read-only; root (as CI runs) may write anyway, so the test
    also has os.access say what it says for any other user."""
    out = tmp_path / "ro"
    out.mkdir(mode=0o500)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if os.fspath(path) == str(
        out) and mode & os.W_OK else access(path, mode, **kw))
    code, _, err = run(capsys, "prepro", "tinyshakespeare", "--input", SHAKESPEARE, "--out", out)
    assert code == 1 and err == [f"llmpy: error: {out}: output directory is not writable"]
    assert os.listdir(out) == []


# ----------------------------------------------------------------------------- fineweb

def fineweb_documents(n=70, seed=0):
    """FineWeb-like rows: whitespace soup of many lengths, non-ASCII, empty text, CRLF, and a
    literal "<|endoftext|>", which llm.c's encode_ordinary keeps as text."""
    rng = random.Random(seed)
    docs = [whitespace_soup(rng.randrange(0, 150), 1000 + i) for i in range(n)]
    docs[3:3] = ["", "Straße, naïve café; 日本語のテキスト 🙂", "a literal <|endoftext|> is text",
                 "windows\r\nline endings\r\n", ""]
    return docs


def write_parquet(path, texts, **columns):
    """A parquet file as HF stores FineWeb: a "text" column among others, several row groups."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    os.makedirs(os.path.dirname(path), exist_ok=True)
    columns = columns or {"id": [f"<urn:uuid:{i}>" for i in range(len(texts))]}
    pq.write_table(pa.table({**columns, "text": texts}), path, row_group_size=6)
    return path


def llmc_fineweb(enc, documents, shard_size, out, name="fineweb"):
    """llm.c's dev/data/fineweb.py main loop: each document, [EOT] + encode_ordinary(text), is
    appended to the current shard while it fits below shard_size; the one that reaches it fills
    the shard up, the shard is written, and its remainder starts the next shard; the last partial
    shard is written too. Shard 0 is val. Returns the file names."""
    names, current = [], []

    def write(toks):
        names.append(f"{name}_{'val' if not names else 'train'}_{len(names):06d}.bin")
        llmc_write_datafile(Path(out) / names[-1], toks)

    for doc in documents:
        toks = [EOT] + enc.encode_ordinary(doc)
        assert len(toks) < shard_size   # llm.c's buffer holds a document's remainder
        if len(current) + len(toks) < shard_size:
            current += toks
        else:
            remainder = shard_size - len(current)
            write(current + toks[:remainder])
            current = toks[remainder:]
    if current:
        write(current)
    return names


def assert_same_files(out, expected_dir, names):
    assert sorted(os.listdir(out)) == sorted(names)
    for name in names:
        assert (Path(out) / name).read_bytes() == (Path(expected_dir) / name).read_bytes(), name


def test_fineweb_like_llmc(tmp_path, capsys, monkeypatch, gpt2_reference):
    pytest.importorskip("pyarrow")
    from llmpy.data.loader import DataLoader, read_tokens
    monkeypatch.setattr(common, "STREAM_ITEM_CHARS", 300)  # many items, documents cut across them
    docs = fineweb_documents()
    sample = tmp_path / "sample" / "10BT"
    files = [write_parquet(sample / f"{k:03d}_00000.parquet", part)
             for k, part in enumerate([docs[:20], docs[20:48], docs[48:]])]
    # 500 splits documents across shards; `boundary` ends the first shard exactly at a document's
    # end (llm.c's "else" branch with no remainder)
    lengths = [1 + len(gpt2_reference.encode_ordinary(d)) for d in docs]
    ends = [sum(lengths[:i + 1]) for i in range(len(lengths))]
    boundary = next(e for e in ends if e > max(lengths))
    for shard_tokens in (500, boundary):
        ref = tmp_path / f"ref{shard_tokens}"
        ref.mkdir()
        names = llmc_fineweb(gpt2_reference, docs, shard_tokens, ref)
        assert len(names) > 3
        for workers, inputs in ((1, [sample]), (2, files)):   # a directory is read in name order
            out = tmp_path / f"out{shard_tokens}-{workers}"
            code, _, err = run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out,
                               "--shard-tokens", shard_tokens, "--workers", workers)
            assert code == 0 and err == []
            assert_same_files(out, ref, names)

    # a document longer than a shard (which llm.c's buffer cannot take) runs on across shards
    stream = llmc_documents(gpt2_reference, docs)
    out = tmp_path / "out-long"
    assert max(map(len, (gpt2_reference.encode_ordinary(d) for d in docs))) > 150
    code, _, _ = run(capsys, "prepro", "fineweb", "--input", sample, "--out", out,
                     "--shard-tokens", 150)
    assert code == 0 and len(os.listdir(out)) == -(-len(stream) // 150)
    assert [t for i in range(len(os.listdir(out)))
            for t in read_tokens(out / f"fineweb_{'val' if i == 0 else 'train'}_{i:06d}.bin")] == stream

    loader = DataLoader(str(tmp_path / "out500-1" / "fineweb_train_*.bin"), B=2, T=16,
                        vocab_size=50257)
    x, y = loader.next_batch()
    first = read_tokens(tmp_path / "out500-1" / "fineweb_train_000001.bin")
    assert x.ravel().tolist() == first[:32].tolist() and y.ravel().tolist() == first[1:33].tolist()


def test_fineweb_download(tmp_path, capsys, monkeypatch, gpt2_reference):
    """The download path, with the hub's snapshot_download replaced (no network here)."""
    pytest.importorskip("pyarrow")
    hub = pytest.importorskip("huggingface_hub")
    docs = fineweb_documents(20)
    calls = []

    def snapshot_download(repo_id, repo_type, allow_patterns):
        calls.append((repo_id, repo_type, allow_patterns))
        write_parquet(tmp_path / "hub" / "sample" / "100BT" / "000_00000.parquet", docs)
        return str(tmp_path / "hub")
    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, "prepro", "fineweb", "--type", "edu", "--version", "100B",
                       "--shard-tokens", 400)
    assert code == 0 and err == []
    assert calls == [("HuggingFaceFW/fineweb-edu", "dataset", "sample/100BT/*")]
    names = llmc_fineweb(gpt2_reference, docs, 400, tmp_path, "edu_fineweb")
    assert_same_files(tmp_path / "edu_fineweb100B", tmp_path, names)

    def offline(repo_id, repo_type, allow_patterns):
        raise OSError("Got: ConnectError: [Errno -2] Name or service not known\nmore text")
    monkeypatch.setattr(hub, "snapshot_download", offline)
    code, _, err = run(capsys, "prepro", "fineweb")
    assert code == 1 and err == ["llmpy: error: HuggingFaceFW/fineweb: download of sample/10BT/* "
                                 "failed: OSError: Got: ConnectError: [Errno -2] Name or service "
                                 "not known"]
    assert not (tmp_path / "fineweb10B").exists()


def test_fineweb_bad_input(tmp_path, capsys, monkeypatch):
    pytest.importorskip("pyarrow")
    good = write_parquet(tmp_path / "good.parquet", fineweb_documents(30))
    (tmp_path / "notes.txt").write_text("not parquet")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"id": [1], "content": ["x"]}), tmp_path / "nocol.parquet")
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    (tmp_path / "empty_dir").mkdir()
    write_parquet(tmp_path / "null.parquet", ["ok"] * 20 + [None, "ok"])
    out = tmp_path / "out"
    cases = [
        ([tmp_path / "missing.parquet"], [], "missing.parquet: no such file"),
        ([tmp_path / "notes.txt"], [], "notes.txt: not a parquet file: "),
        ([good, tmp_path / "nocol.parquet"], [], 'nocol.parquet: no "text" column (columns: id, content)'),
        ([tmp_path / "ints.parquet"], [], 'ints.parquet: the "text" column holds int64, not strings'),
        ([tmp_path / "empty_dir"], [], "empty_dir: no .parquet files in the directory"),
        ([good, tmp_path / "null.parquet"], ["--shard-tokens", 20], 'null.parquet: row 20: "text" is null'),
        ([good], ["--shard-tokens", 0], "--shard-tokens 0: must be from 1 to 2**31 - 1"),
    ]
    for inputs, flags, message in cases:
        code, _, err = run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out, *flags)
        assert code == 1 and len(err) == 1 and err[0].startswith("llmpy: error: "), err
        assert message in err[0], err
        assert not out.exists() or os.listdir(out) == []

    monkeypatch.setitem(sys.modules, "pyarrow", None)   # pyarrow not installed
    code, _, err = run(capsys, "prepro", "fineweb", "--input", good, "--out", out)
    assert code == 1 and err == ["llmpy: error: prepro fineweb reads parquet with pyarrow: "
                                 "pip install 'llmpy[fineweb]'"]


def test_fineweb_failed_rerun_keeps_the_previous_output(tmp_path, capsys, monkeypatch):
    """A run that fails after writing shards (a null text late in the stream) removes what it
    wrote and leaves the earlier run's shards as they were: none half-replaced, none missing."""
    monkeypatch.setattr(common, "STREAM_ITEM_CHARS", 64)   # work items, and shards, before the null
    monkeypatch.setattr(fineweb, "BATCH_ROWS", 8)        # rows read before the null's batch
    good = write_parquet(tmp_path / "good.parquet", fineweb_documents(30))
    bad = write_parquet(tmp_path / "null.parquet", ["ok " * 50] * 20 + [None, "ok"])
    out = tmp_path / "out"
    assert run(capsys, "prepro", "fineweb", "--input", good, "--out", out, "--shard-tokens",
               200, "--workers", 1)[0] == 0
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert len(before) >= 3
    writes = []
    monkeypatch.setattr(common, "write_tokens", lambda path, t: writes.append(path) or
                        data.write_tokens(path, t))
    code, _, err = run(capsys, "prepro", "fineweb", "--input", bad, good, "--out", out,
                       "--shard-tokens", 200, "--workers", 1)
    assert code == 1 and 'null.parquet: row 20: "text" is null' in err[0]
    assert writes, "the failing run wrote shards before the null"
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before


# ----------------------------------------------------------------------------- fineweb --resume

def resume_setup(tmp_path, monkeypatch, enc):
    """Parquet files of fineweb_documents() in three files of 6-row groups, read 4 rows at a
    time and tokenized in small items (documents cut across them); returns (inputs, docs, ends):
    ends[i], the tokens of documents 0..i."""
    monkeypatch.setattr(common, "STREAM_ITEM_CHARS", 300)
    monkeypatch.setattr(fineweb, "BATCH_ROWS", 4)
    docs = fineweb_documents()
    inputs = [write_parquet(tmp_path / "in" / f"{k:03d}.parquet", part)
              for k, part in enumerate([docs[:20], docs[20:48], docs[48:]])]
    ends, total = [], 0
    for d in docs:
        total += 1 + len(enc.encode_ordinary(d))
        ends.append(total)
    return inputs, docs, ends


def fineweb_run(capsys, inputs, out, shard_tokens, workers, *flags):
    return run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out, "--shard-tokens",
               shard_tokens, "--workers", workers, *flags)


def interrupt_at_shard(monkeypatch, index, error=KeyboardInterrupt):
    """Make the next run stop (Ctrl-C) as it starts writing shard `index`."""
    def write_tokens(path, tokens):
        if str(path).endswith(f"_{index:06d}.bin.partial"):
            raise error()
        data.write_tokens(path, tokens)
    monkeypatch.setattr(common, "write_tokens", write_tokens)


def test_fineweb_resume_same_bytes(tmp_path, capsys, monkeypatch, gpt2_reference):
    """Ctrl-C as shard 2 is being written, then --resume: llm.c's bytes, and the resumed run
    tokenizes only the documents from the one shard 2 starts in: a boundary inside a document
    (2 * 500 tokens) and one on a document's end (2 * 355)."""
    from bisect import bisect_right
    inputs, docs, ends = resume_setup(tmp_path, monkeypatch, gpt2_reference)
    real_encode_stream = fineweb.encode_stream
    on_end = next(e // 2 for e in ends if e % 2 == 0 and e // 2 > 200)
    for shard_tokens in (500, on_end):
        ref = tmp_path / f"ref{shard_tokens}"
        ref.mkdir()
        names = llmc_fineweb(gpt2_reference, docs, shard_tokens, ref)
        first = bisect_right(ends, 2 * shard_tokens)    # the document shard 2's first token is in
        assert len(names) > 4 and (2 * shard_tokens in ends) == (shard_tokens == on_end)
        for workers in (1, 2):
            out = tmp_path / f"out{shard_tokens}-{workers}"
            interrupt_at_shard(monkeypatch, 2)
            code, stdout, _ = fineweb_run(capsys, inputs, out, shard_tokens, workers)
            assert code == 130 and "--resume" in stdout
            assert sorted(os.listdir(out)) == sorted(["fineweb_resume.json", names[0] + ".partial",
                                                      names[1] + ".partial"])
            monkeypatch.setattr(common, "write_tokens", data.write_tokens)
            handed = []                                    # the documents tokenized
            monkeypatch.setattr(fineweb, "encode_stream", lambda documents, workers: real_encode_stream(
                (handed.append(d) or d for d in documents), workers))
            code, stdout, err = fineweb_run(capsys, inputs, out, shard_tokens, workers, "--resume")
            monkeypatch.setattr(fineweb, "encode_stream", real_encode_stream)
            assert code == 0 and err == [] and f"next document {first}" in stdout
            assert handed == docs[first:]
            assert_same_files(out, ref, names)


def test_fineweb_resume_after_sigkill(tmp_path, capsys, monkeypatch, gpt2_reference):
    """A real SIGKILL (2 worker processes) inside a file write: the 5th fsync is the state's as
    shard 2 begins (so the state still counts 1 shard of the 2 written), the 6th is shard 2's
    .partial; their temporary files are left behind. --resume writes llm.c's bytes and nothing
    else stays."""
    import signal
    import subprocess
    inputs, docs, ends = resume_setup(tmp_path, monkeypatch, gpt2_reference)
    names = llmc_fineweb(gpt2_reference, docs, 500, tmp_path)
    script = ("import os, signal, sys\n"
              "from llmpy.cli import main\n"
              "from llmpy.data.prepro import common, fineweb\n"
              "common.STREAM_ITEM_CHARS, fineweb.BATCH_ROWS = 300, 4\n"
              "calls, fsync = [], os.fsync\n"
              "def kill(fd):\n"
              "    calls.append(fd)\n"
              "    if len(calls) == int(sys.argv[1]):\n"
              "        os.kill(os.getpid(), signal.SIGKILL)\n"
              "    fsync(fd)\n"
              "os.fsync = kill\n"
              "main(sys.argv[2:])\n")
    for kill_at, staged in ((5, 1), (6, 2)):
        out = tmp_path / f"out{kill_at}"
        argv = ["prepro", "fineweb", "--input", *inputs, "--out", out, "--shard-tokens", 500,
                "--workers", 2]
        with open(tmp_path / "stderr", "wb") as stderr:
            p = subprocess.Popen([sys.executable, "-c", script, str(kill_at), *map(str, argv)],
                                 stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
            try:
                p.wait(timeout=120)
            finally:
                try:
                    os.killpg(p.pid, signal.SIGKILL)   # its pool's workers, orphaned
                except ProcessLookupError:
                    pass
        assert p.returncode == -signal.SIGKILL, (tmp_path / "stderr").read_text()
        left = sorted(os.listdir(out))
        assert [f for f in left if f.endswith(".partial")] == sorted(n + ".partial"
                                                                     for n in names[:2])
        assert any(f.endswith(".tmp") for f in left)
        state = json.loads((out / "fineweb_resume.json").read_text())
        assert state["tokens"] == 500 * staged
        code, _, err = fineweb_run(capsys, inputs, out, 500, 2, "--resume")
        assert code == 0 and err == []
        assert_same_files(out, tmp_path, names)


def test_fineweb_resume_killed_while_renaming(tmp_path, capsys, monkeypatch, gpt2_reference):
    """Stopped after renaming shard 0 into place: --resume renames the rest, tokenizes nothing."""
    inputs, docs, _ = resume_setup(tmp_path, monkeypatch, gpt2_reference)
    names = llmc_fineweb(gpt2_reference, docs, 500, tmp_path)
    out = tmp_path / "out"
    replace = os.replace

    def stop_second_rename(src, dst):
        if str(src).endswith(".bin.partial") and os.path.exists(out / names[0]):
            raise KeyboardInterrupt
        replace(src, dst)
    monkeypatch.setattr(os, "replace", stop_second_rename)
    assert fineweb_run(capsys, inputs, out, 500, 1)[0] == 130
    monkeypatch.setattr(os, "replace", replace)
    assert json.loads((out / "fineweb_resume.json").read_text())["complete"]
    assert sorted(os.listdir(out)) == sorted([names[0], "fineweb_resume.json"] +
                                             [n + ".partial" for n in names[1:]])
    monkeypatch.setattr(fineweb, "encode_stream", None)    # calling it fails the test
    code, _, err = fineweb_run(capsys, inputs, out, 500, 1, "--resume")
    assert code == 0 and err == []
    assert_same_files(out, tmp_path, names)


def test_fineweb_resume_fresh_and_plain_rerun(tmp_path, capsys, monkeypatch, gpt2_reference):
    """--resume with no state starts; a run without --resume after an interrupted one starts
    over, and removes what the interrupted one left."""
    inputs, docs, _ = resume_setup(tmp_path, monkeypatch, gpt2_reference)
    names = llmc_fineweb(gpt2_reference, docs, 500, tmp_path)
    out = tmp_path / "out"
    code, stdout, err = fineweb_run(capsys, inputs, out, 500, 1, "--resume")
    assert code == 0 and err == [] and "resuming" not in stdout
    assert_same_files(out, tmp_path, names)

    out = tmp_path / "out2"
    interrupt_at_shard(monkeypatch, 3)
    assert fineweb_run(capsys, inputs, out, 400, 1)[0] == 130      # other shards than names'
    monkeypatch.setattr(common, "write_tokens", data.write_tokens)
    code, stdout, err = fineweb_run(capsys, inputs, out, 500, 1)
    assert code == 0 and err == [] and "starting over" in stdout
    assert_same_files(out, tmp_path, names)


def test_fineweb_resume_refuses_another_run(tmp_path, capsys, monkeypatch, gpt2_reference):
    """--resume refuses, in one line naming the state and the difference, a state saved with
    other arguments or inputs, or whose shards are not all there; the state stays."""
    inputs, docs, _ = resume_setup(tmp_path, monkeypatch, gpt2_reference)
    out = tmp_path / "out"
    state = out / "fineweb_resume.json"
    interrupt_at_shard(monkeypatch, 2)
    assert fineweb_run(capsys, inputs, out, 500, 1)[0] == 130
    monkeypatch.setattr(common, "write_tokens", data.write_tokens)
    before = sorted(os.listdir(out))
    write_parquet(tmp_path / "in" / "001.parquet", docs[20:47])   # one row less
    size = os.path.getsize(inputs[1])
    (out / "fineweb_val_000000.bin.partial").write_bytes(b"short")
    cases = [
        ([], ["--shard-tokens", 400], "the interrupted run had --shard-tokens 500, this one 400"),
        ([], ["--type", "edu"], None),    # another NAME: another state file, a fresh run
        ([], [], f"{inputs[1]} has {size:,} bytes, the interrupted run read "),
        ([inputs[0], inputs[2]], [], f"the interrupted run read {inputs[1]} where this one "
                                     f"reads {inputs[2]}"),
        ([inputs[0]], [], "the interrupted run read 3 parquet files, this one 1"),
    ]
    for files, flags, message in cases:
        argv = ["prepro", "fineweb", "--input", *(files or inputs), "--out", out,
                "--shard-tokens", 500, "--workers", 1, "--resume", *flags]
        code, _, err = run(capsys, *argv)
        if message is None:
            assert code == 0 and "edu_fineweb_val_000000.bin" in os.listdir(out)
            for f in os.listdir(out):
                if f.startswith("edu_"):
                    os.remove(out / f)
            continue
        assert code == 1 and len(err) == 1, err
        assert err[0].startswith(f"llmpy: error: {state}: {message}")
        assert err[0].endswith("; drop --resume to start over")
        assert sorted(os.listdir(out)) == before
    write_parquet(tmp_path / "in" / "001.parquet", docs[20:48])
    code, _, err = run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out,
                       "--shard-tokens", 500, "--resume")
    partial = out / "fineweb_val_000000.bin.partial"
    assert code == 1 and err == [f"llmpy: error: {partial}: 5 bytes, but {state} counts it as "
                                 f"a written shard of 2,024 bytes; drop --resume to start over"]
    os.remove(partial)
    code, _, err = run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out,
                       "--shard-tokens", 500, "--resume")
    assert code == 1 and err == [f"llmpy: error: {partial}: missing, but {state} counts it as "
                                 f"a written shard of 2,024 bytes; drop --resume to start over"]
    state.write_text("{")
    code, _, err = run(capsys, "prepro", "fineweb", "--input", *inputs, "--out", out,
                       "--shard-tokens", 500, "--resume")
    assert code == 1 and len(err) == 1 and f"{state}: unreadable resume state: " in err[0]
