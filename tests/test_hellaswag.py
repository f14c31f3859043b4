"""HellaSwag: llm.c's eval file (checked against an independent writer, as llm.c's
dev/data/data_common.py write_evalfile lays it out), the accuracy (checked against the PyTorch
reference scoring each completion by its mean loss), `llmpy prepro hellaswag`, the in-training
eval, and bad eval files."""
import json
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from llmpy import cli
from llmpy.backends import get_backend
from llmpy.model.layout import GPT2Config
from llmpy.train.config import TrainConfig
from llmpy.errors import LlmpyError
from llmpy.evals import hellaswag, read_evalfile, write_evalfile
from llmpy.model.gpt2 import GPT2, load_params
from llmpy.io.tokenizer import Tokenizer
from llmpy.train.loop import train
from test_gpt2 import random_weights, write_llmc_model, write_llmc_tokens
from torchref.gpt2 import from_flat

CFG = GPT2Config(max_seq_len=32, vocab_size=100, num_layers=2, num_heads=2, channels=16)


def independent_evalfile(path, examples):
    """llm.c's eval format, written with struct: header (20240522, 1, n, longest bytes), then per
    example 65535, its bytes, index, label, 4, then (length, tokens) for the context and each
    completion."""
    body, longest = b"", 0
    for i, (label, ctx, endings) in enumerate(examples):
        fields = [i, label, len(endings), len(ctx), *ctx]
        for e in endings:
            fields += [len(e), *e]
        nbytes = 2 * (2 + len(fields))
        longest = max(longest, nbytes)
        body += struct.pack(f"<{2 + len(fields)}H", 65535, nbytes, *fields)
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240522, 1, len(examples), longest, *[0] * 252))
        f.write(body)


def random_examples(n, seed, ctx_len=(3, 10), end_len=(1, 6)):
    r = np.random.default_rng(seed)
    tok = lambda lo_hi: r.integers(0, CFG.vocab_size, r.integers(*lo_hi)).tolist()  # noqa: E731
    return [(int(r.integers(4)), tok(ctx_len), [tok(end_len) for _ in range(4)])
            for _ in range(n)]


def torch_predictions(flat, examples, T):
    """argmin over the 4 completions of the mean loss of their tokens, each completion token
    predicted from everything before it (at most T tokens in a row, the oldest dropped)."""
    ref = from_flat(CFG, flat)
    preds = []
    with torch.no_grad():
        for _, ctx, endings in examples:
            means = []
            for end in endings:
                full = ctx + end
                row = full[-T:]
                cut = len(full) - len(row)
                logits, _ = ref(torch.tensor([row]))
                pos = [j - 1 - cut for j in range(len(ctx), len(full)) if j - 1 - cut >= 0]
                tgt = [full[p + 1 + cut] for p in pos]
                means.append(F.cross_entropy(logits[0, pos], torch.tensor(tgt)).item())
            preds.append(int(np.argmin(means)))
    return preds


def test_evalfile_matches_independent_writer(tmp_path):
    examples = random_examples(7, seed=0)
    independent_evalfile(tmp_path / "theirs.bin", examples)
    write_evalfile(tmp_path / "ours.bin", examples)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    assert read_evalfile(tmp_path / "theirs.bin") == examples


@pytest.mark.parametrize("B,T,ctx_len,end_len", [(4, 32, (3, 10), (1, 6)),
                                                 (8, 32, (3, 10), (1, 6)),
                                                 (6, 32, (3, 10), (1, 6)),
                                                 (8, 8, (5, 12), (1, 6)),
                                                 (4, 8, (3, 6), (5, 12))])
def test_accuracy_matches_torch(B, T, ctx_len, end_len):
    """Half the labels are the reference's prediction, half are not: accuracy exactly 1/2.
    (8, 8, ...) has rows longer than T, the last case completions longer than T too (the row
    keeps only the completion's tail, its first token scored from within the completion),
    (6, ...) a batch of 4 rows that differs from B."""
    flat = random_weights(CFG, seed=3)
    examples = random_examples(9, seed=B + T, ctx_len=ctx_len, end_len=end_len)
    preds = torch_predictions(flat, examples, T)
    examples = [((p if i % 2 else p + 1) % 4, ctx, ends)
                for i, (p, (_, ctx, ends)) in enumerate(zip(preds, examples))]
    model = GPT2(CFG, get_backend("numpy"))
    load_params(model, flat)
    assert hellaswag(model, examples, B, T) == (4, 9)


def test_prepro_hellaswag(tmp_path):
    records = [{"ctx": "A man is sitting on a roof. he", "label": 3,
                "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                            "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
               {"ctx": "Then, the man writes over the snow.", "label": 0,
                "endings": ["writes", "stands", "shovels snow", "sits"]}]
    (tmp_path / "hs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert cli.main(["prepro", "hellaswag", "--input", str(tmp_path / "hs.jsonl"),
                     "--out", str(tmp_path / "out")]) == 0
    tok = Tokenizer()
    independent_evalfile(tmp_path / "theirs.bin",
                         [(r["label"], tok.encode(r["ctx"]), [tok.encode(" " + e)
                                                              for e in r["endings"]])
                          for r in records])
    assert (tmp_path / "out" / "hellaswag_val.bin").read_bytes() == \
        (tmp_path / "theirs.bin").read_bytes()


def test_hellaswag_during_training(tmp_path):
    flat = random_weights(CFG, seed=5)
    write_llmc_model(tmp_path / "model.bin", CFG, flat)
    write_llmc_tokens(tmp_path / "train.bin", np.random.default_rng(6).integers(0, 100, 2000))
    examples = random_examples(6, seed=7)
    independent_evalfile(tmp_path / "hs.bin", examples)
    cfg = TrainConfig(model=str(tmp_path / "model.bin"), train_data=str(tmp_path / "train.bin"),
                      backend="numpy", batch_size=4, seq_len=16, steps=5, val_every=0,
                      sample_every=0, hellaswag_every=2, hellaswag_data=str(tmp_path / "hs.bin"),
                      log_jsonl=str(tmp_path / "log.jsonl"))
    model = train(cfg)
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "hellaswag_acc" in r] == [2, 4, 5]
    final = model.backend.to_host(model.params.buf).copy()
    preds = torch_predictions(final, examples, 16)
    assert log[-1]["hellaswag_acc"] == pytest.approx(
        np.mean([p == label for p, (label, _, _) in zip(preds, examples)]))


def test_bad_eval_files(tmp_path, capsys):
    examples = random_examples(3, seed=1)
    independent_evalfile(tmp_path / "ok.bin", examples)
    raw = (tmp_path / "ok.bin").read_bytes()
    cases = {"short.bin": (raw[:-6], "truncated"),
             "magic.bin": (struct.pack("<i", 7) + raw[4:],
                           r"bad magic number 7 \(an eval file starts with 20240522\)"),
             "label.bin": (raw[:1030] + struct.pack("<H", 7) + raw[1032:],
                           "label.bin: example 0 of 3: label 7 not in 0..3$"),
             "marker.bin": (raw[:1024] + b"\0\0" + raw[1026:], "<START_EXAMPLE>"),
             "trailing.bin": (raw + b"\0\0", "trailing bytes")}
    for name, (data, words) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(LlmpyError, match=words):
            read_evalfile(tmp_path / name)
    # and through the CLI: one line, exit 1, before any training
    write_llmc_model(tmp_path / "model.bin", CFG, random_weights(CFG))
    write_llmc_tokens(tmp_path / "train.bin", np.arange(200) % 100)
    rc = cli.main(["train", "--model", str(tmp_path / "model.bin"), "--train-data",
                   str(tmp_path / "train.bin"), "--backend", "numpy", "-b", "4", "-t", "8",
                   "--hellaswag-every", "1", "--sample-every", "0",
                   "--hellaswag-data", str(tmp_path / "short.bin")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "short.bin" in err[0] and "truncated" in err[0]


def test_token_ids_beyond_the_model_s_vocab(tmp_path, capsys):
    """Checked as the file is read, naming the example, not at a forward pass that names
    neither (in training, after the first step)."""
    examples = random_examples(3, seed=1)
    examples[1][2][3][-1] = CFG.vocab_size
    independent_evalfile(tmp_path / "hs.bin", examples)
    assert len(read_evalfile(tmp_path / "hs.bin")) == 3        # no model, no vocab to check
    with pytest.raises(LlmpyError, match=f"hs.bin: example 1: token id {CFG.vocab_size} is out "
                                         f"of range for the model's vocab size {CFG.vocab_size}"):
        read_evalfile(tmp_path / "hs.bin", CFG.vocab_size)
    write_llmc_model(tmp_path / "model.bin", CFG, random_weights(CFG))
    rc = cli.main(["eval", "--model", str(tmp_path / "model.bin"), "--hellaswag-data",
                   str(tmp_path / "hs.bin"), "--backend", "numpy", "-b", "4", "-t", "8"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "hs.bin: example 1: token id 100" in err[0]
    write_llmc_tokens(tmp_path / "train.bin", np.arange(200) % 100)
    rc = cli.main(["train", "--model", str(tmp_path / "model.bin"), "--train-data",
                   str(tmp_path / "train.bin"), "--hellaswag-every", "1", "--hellaswag-data",
                   str(tmp_path / "hs.bin"), "--sample-every", "0", "--backend", "numpy",
                   "-b", "2", "-t", "8"])
    out, err = capsys.readouterr()
    assert rc == 1 and "hs.bin: example 1: token id 100" in err and "step" not in out


def test_prepro_hellaswag_bad_records(tmp_path):
    """Each record is checked as it is read, naming the file and line: a record llm.c's eval
    file cannot hold is never written for eval to reject."""
    from test_cli import assert_one_line_error
    from test_cli import cli as run_cli
    ok = {"ctx": "A man", "label": 1, "endings": ["a", "b", "c", "d"]}
    cases = [({"label": 7}, "label 7 not in 0..3"), ({"label": "1"}, "label '1' not in 0..3"),
             ({"endings": ["a", "b", "c"]}, '"endings" is not a list of 4 non-empty strings'),
             ({"endings": ["a", "", "c", "d"]}, '"endings" is not a list of 4'),
             ({"ctx": ""}, '"ctx" is not a non-empty string')]
    for change, words in cases:
        # line 3: the blank line counts
        (tmp_path / "hs.jsonl").write_text(f"{json.dumps(ok)}\n\n{json.dumps({**ok, **change})}\n")
        assert_one_line_error(run_cli("prepro", "hellaswag", "--input", tmp_path / "hs.jsonl",
                                      "--out", tmp_path / "out"), f"hs.jsonl: line 3: {words}")
    for text, words in [("[1, 2]\n", "line 1: not a JSON object"), ("{\n", "line 1 is not JSON"),
                        ("\n\n", "no HellaSwag records")]:
        (tmp_path / "hs.jsonl").write_text(text)
        assert_one_line_error(run_cli("prepro", "hellaswag", "--input", tmp_path / "hs.jsonl",
                                      "--out", tmp_path / "out"), f"hs.jsonl: {words}")
    assert not (tmp_path / "out" / "hellaswag_val.bin").exists()
