"""`llmpy eval`: the val loss against the PyTorch reference over every window of a file, a run
directory's val loss as its log has it, HellaSwag through the command, and bad input."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import BACKENDS
from llmpy import cli
from llmpy.evals import write_evalfile
from test_gpt2 import CFG, random_weights, write_llmc_model, write_llmc_tokens
from test_hellaswag import CFG as HS_CFG
from test_hellaswag import independent_evalfile, random_examples, torch_predictions
from torchref.gpt2 import from_flat


def run(capsys, *args):
    """`llmpy eval ARGS --json` in this process -> (exit code, results or the error line)."""
    rc = cli.main(["eval", *map(str, args), "--json"])
    out, err = capsys.readouterr()
    return rc, json.loads(out) if rc == 0 else err.strip()


@pytest.fixture
def files(tmp_path):
    flat = random_weights(CFG, seed=2)
    write_llmc_model(tmp_path / "m.bin", CFG, flat)
    # 2*8*5 + 7 tokens: 5 windows of B*T+1 at B=2, T=8, and a tail too short for a sixth
    tokens = np.random.default_rng(3).integers(0, CFG.vocab_size, 2 * 8 * 5 + 7)
    write_llmc_tokens(tmp_path / "val.bin", tokens)
    return tmp_path, flat, tokens


@pytest.mark.parametrize("backend", [b.name for b in BACKENDS])
def test_val_loss_over_the_whole_file_matches_torch(files, capsys, backend):
    path, flat, tokens = files
    rc, r = run(capsys, "--model", path / "m.bin", "--val-data", path / "val.bin", "-b", 2,
                "-t", 8, "--backend", backend)
    assert rc == 0, r
    assert r["val_tokens"] == 80
    assert r["val_loss"] == pytest.approx(torch_loss(flat, tokens, 5), rel=1e-5)
    rc, first2 = run(capsys, "--model", path / "m.bin", "--val-data", path / "val.bin", "-b", 2,
                     "-t", 8, "--val-batches", 2, "--backend", backend)
    assert first2["val_tokens"] == 32
    assert first2["val_loss"] == pytest.approx(torch_loss(flat, tokens, 2), rel=1e-5)


def torch_loss(flat, tokens, batches, B=2, T=8):
    """The reference's mean loss over the first `batches` windows of B*T+1 tokens."""
    windows = np.array([tokens[i * B * T:(i + 1) * B * T + 1] for i in range(batches)])
    x = torch.tensor(windows[:, :-1].reshape(-1, T))
    y = torch.tensor(windows[:, 1:].reshape(-1, T))
    with torch.no_grad():
        logits, _ = from_flat(CFG, flat)(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()


def test_run_directory_val_loss_as_logged(files, capsys):
    """Eval of a run directory takes the run's val data, B, T and number of val batches, and
    gives its last logged val loss: the same weights, batches and code. With another T, every
    window of the data."""
    path, _, _ = files
    write_llmc_tokens(path / "train.bin", np.arange(400) % CFG.vocab_size)
    assert cli.main(["train", "--model", str(path / "m.bin"), "--train-data",
                     str(path / "train.bin"), "--val-data", str(path / "val.bin"), "-b", "2",
                     "-t", "8", "--steps", "3", "--val-every", "3", "--val-batches", "4",
                     "--sample-every", "0", "--backend", "numpy", "--run-dir",
                     str(path / "run"), "--checkpoint-every", "3"]) == 0
    logged = json.loads((path / "run" / "log.jsonl").read_text().splitlines()[-1])["val_loss"]
    capsys.readouterr()
    rc, r = run(capsys, "--model", path / "run", "--backend", "numpy")
    assert rc == 0, r
    assert (r["batch_size"], r["seq_len"], r["val_tokens"]) == (2, 8, 64)
    assert r["val_loss"] == logged
    rc, r = run(capsys, "--model", path / "run", "-t", 4, "--backend", "numpy")
    assert r["seq_len"] == 4 and r["val_tokens"] == (2 * 8 * 5 + 7 - 1) // 8 * 8


def test_hellaswag_through_the_command(tmp_path, capsys):
    flat = random_weights(HS_CFG, seed=4)
    write_llmc_model(tmp_path / "m.bin", HS_CFG, flat)
    examples = random_examples(6, seed=8)
    independent_evalfile(tmp_path / "hs.bin", examples)
    rc, r = run(capsys, "--model", tmp_path / "m.bin", "--hellaswag-data", tmp_path / "hs.bin",
                "-b", 4, "-t", 16, "--backend", "numpy")
    assert rc == 0, r
    preds = torch_predictions(flat, examples, 16)
    correct = sum(p == label for p, (label, _, _) in zip(preds, examples))
    assert (r["hellaswag_correct"], r["hellaswag_total"]) == (correct, 6)
    assert "val_loss" not in r         # only HellaSwag was asked for


def test_bad_input(files, capsys):
    path, _, _ = files
    model, val = ["--model", path / "m.bin"], ["--val-data", path / "val.bin"]
    cases = [([*model, "--val-data", path / "nope.bin"], "nope.bin"),
             ([*model, *val, "--val-batches", -1], "--val-batches must be at least 0"),
             ([*model, *val, "-t", 17], "exceeds the model's max_seq_len 16"),
             ([*model, *val, "--val-batches", 6], "holds 5 batches"),
             ([*model, *val, "-b", 0], "--batch-size must be at least 1"),
             ([*model, "--hellaswag-data", path / "val.bin"], "val.bin")]
    for args, words in cases:
        rc, err = run(capsys, "-b", 2, "-t", 8, *args, "--backend", "numpy")
        assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("llmpy: error: ")
        assert words in err, (args, err)
    with pytest.raises(SystemExit) as e:      # argparse: the usage, and what is missing
        cli.main(["eval", *map(str, val)])
    assert e.value.code == 2 and "required: --model" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning",        # the 1e30 weights
                            "ignore:invalid:RuntimeWarning")
def test_non_finite_results_exit_1(files, capsys):
    """A model with a NaN weight gives a NaN loss: one line and exit 1, never `val loss nan`
    with exit 0, nor NaN in --json (not JSON); HellaSwag alone too, whose argmin over NaNs would
    still count "correct" answers. Finite weights whose loss overflows: the same."""
    path, flat, _ = files
    bad = flat.copy()
    bad[7] = np.nan
    write_llmc_model(path / "nan.bin", CFG, bad)
    rc, err = run(capsys, "--model", path / "nan.bin", "--val-data", path / "val.bin", "-b", 2,
                  "-t", 8, "--backend", "numpy")
    assert rc == 1 and err == (f"llmpy: error: {path / 'nan.bin'}: the weights: 1 of "
                               f"{flat.size:,} values are not finite (NaN or inf)")
    write_evalfile(path / "hs.bin", [(1, [1, 2, 3], [[4], [5, 6], [7], [8, 9]])])
    assert cli.main(["eval", "--model", str(path / "nan.bin"), "--hellaswag-data",
                     str(path / "hs.bin"), "--backend", "numpy"]) == 1
    assert "not finite" in capsys.readouterr().err
    write_llmc_model(path / "huge.bin", CFG, flat * np.float32(1e30))   # finite, overflowing
    rc, err = run(capsys, "--model", path / "huge.bin", "--val-data", path / "val.bin", "-b", 2,
                  "-t", 8, "--backend", "numpy")
    assert rc == 1 and err.startswith(f"llmpy: error: {path / 'huge.bin'}: the val loss on "
                                      f"{path / 'val.bin'} is "), err
