"""Interop with real checkpoints: Hugging Face GPT-2 <-> llm.c .bin (`llmpy convert`), llm.c's
debug state and `llmpy test-model` (llm.c's test_gpt2), and GPT-2's from-scratch init.

Oracles: transformers' own GPT2LMHeadModel (random weights, saved locally: the hub cannot be
reached here), an llm.c-layout writer written out below the way llm.c's train_gpt2.py writes
its files, and the PyTorch reference (torchref/gpt2.py).
"""
import json
import struct

import numpy as np
import pytest
import torch

from llmpy.backends import get_backend
from llmpy.io.modelfile import num_params, write_model
from llmpy.model.layout import GPT2Config
from llmpy.model.build import preset
from llmpy.data.loader import bundled_data, write_tokens
from llmpy.debugstate import read_debug_state, write_debug_state
from llmpy.model.gpt2 import GPT2, init_weights, load_params, param_shapes
from llmpy.generate import generate
from llmpy.model.build import build_model
from test_cli import assert_one_line_error, cli, llmpy
from test_gpt2 import random_weights, rel_err, write_llmc_model
from torchref.gpt2 import from_flat

try:
    import safetensors.torch as safetensors_torch
    import transformers
except ImportError:
    transformers = None
needs_hf = pytest.mark.skipif(transformers is None, reason="needs pip install 'llmpy[hf]'")

TOL = 1e-5           # fp32 forward vs forward, as tests/test_gpt2.py
# odd sizes; the vocab (101) is padded to 128
HF_CFG = dict(vocab_size=101, n_positions=24, n_embd=40, n_layer=3, n_head=5)
CFG = GPT2Config(max_seq_len=24, vocab_size=101, num_layers=3, num_heads=5, channels=40)


# ----------------------------------------------------------------------------- helpers

def hf_model(seed=0, config=HF_CFG):
    """A random GPT2LMHeadModel; noise on every tensor so biases and LayerNorms are not 0/1."""
    torch.manual_seed(seed)
    m = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def hf_logits(model_or_dir, x):
    m = model_or_dir
    if not isinstance(m, torch.nn.Module):
        m, info = transformers.GPT2LMHeadModel.from_pretrained(str(m), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        return m.eval()(torch.from_numpy(x)).logits.numpy()


def llmc_layout(sd, L, Vp):
    """HF state dict -> llm.c's flat fp32 params, in the order llm.c's train_gpt2.py
    write_tensors uses, transposing the Conv1D weights to (out, in) and padding wte to Vp."""
    sd = {k.removeprefix("transformer."): v.float() for k, v in sd.items()}
    wte = sd["wte.weight"]
    out = [torch.cat([wte, torch.zeros(Vp - wte.shape[0], wte.shape[1])]), sd["wpe.weight"]]
    for key, transpose in (("ln_1.weight", 0), ("ln_1.bias", 0), ("attn.c_attn.weight", 1),
                           ("attn.c_attn.bias", 0), ("attn.c_proj.weight", 1),
                           ("attn.c_proj.bias", 0), ("ln_2.weight", 0), ("ln_2.bias", 0),
                           ("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 0),
                           ("mlp.c_proj.weight", 1), ("mlp.c_proj.bias", 0)):
        out += [sd[f"h.{i}.{key}"].t() if transpose else sd[f"h.{i}.{key}"] for i in range(L)]
    out += [sd["ln_f.weight"], sd["ln_f.bias"]]
    return torch.cat([t.contiguous().reshape(-1) for t in out]).numpy()


def llmc_model_bytes(cfg, version, body):
    return struct.pack("<256i", 20240326, version, cfg.max_seq_len, cfg.vocab_size,
                       cfg.num_layers, cfg.num_heads, cfg.channels, cfg.padded_vocab_size,
                       *[0] * 248) + body


def write_llmc_debug_state(path, cfg, flat, x, y):
    """An independent writer of llm.c's debug state, as llm.c's train_gpt2.py write_state:
    the reference's fp32 logits (unpadded V), loss and grads (wte grad padded with zeros)."""
    ref = from_flat(cfg, flat)
    logits, loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    B, T = x.shape
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240327, 2, B, T, *[0] * 252))
        x.astype("<i4").tofile(f)
        y.astype("<i4").tofile(f)
        logits.detach().numpy().astype("<f4").tofile(f)
        f.write(struct.pack("<f", loss.item()))
        ref.flat(grads=True).astype("<f4").tofile(f)


def ours_logits(cfg, flat, x):
    model = GPT2(cfg, get_backend("numpy"))
    load_params(model, flat)
    model.forward(x)
    return model.acts.logits[..., :cfg.vocab_size]


def tokens(cfg, B, T, seed=1):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T + 1))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    m = hf_model()
    m.save_pretrained(d)
    return d, m


# ----------------------------------------------------------------------------- convert

@needs_hf
def test_hf_to_llmc_is_llmc_bytes(hf_dir, tmp_path):
    d, m = hf_dir
    r = cli("convert", d, tmp_path / "m.bin")
    assert r.returncode == 0, r.stderr
    want = llmc_layout(m.state_dict(), CFG.num_layers, CFG.padded_vocab_size)
    assert (tmp_path / "m.bin").read_bytes() == llmc_model_bytes(CFG, 3, want.astype("<f4").tobytes())
    x = tokens(CFG, 2, 24)[:, :-1]
    assert rel_err(ours_logits(CFG, want, x), hf_logits(m, x)) <= TOL


@needs_hf
def test_hf_roundtrip_identical_logits(hf_dir, tmp_path):
    d, m = hf_dir
    assert cli("convert", d, tmp_path / "m.bin").returncode == 0
    r = llmpy("convert", tmp_path / "m.bin", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    x = tokens(CFG, 3, 24)[:, :-1]
    assert np.array_equal(hf_logits(tmp_path / "back", x), hf_logits(m, x))
    back = safetensors_torch.load_file(tmp_path / "back" / "model.safetensors")
    for k, v in m.state_dict().items():
        if k != "lm_head.weight":             # tied to wte, which is saved once
            assert torch.equal(back[k], v), k


@needs_hf
def test_hf_directory_as_a_model(hf_dir, tmp_path):
    """eval and sample take an HF model directory where they take an llm.c .bin: the same
    loss and the same tokens as from the converted file."""
    d, _ = hf_dir
    assert cli("convert", d, tmp_path / "m.bin").returncode == 0
    write_tokens(tmp_path / "val.bin", tokens(CFG, 1, 300).ravel())
    outs = [cli("eval", "--model", model, "--val-data", tmp_path / "val.bin", "-b", 2, "-t", 8,
                "--backend", "numpy", "--json") for model in (d, tmp_path / "m.bin")]
    assert all(r.returncode == 0 for r in outs), [r.stderr for r in outs]
    losses = [json.loads(r.stdout)["val_loss"] for r in outs]
    assert losses[0] == losses[1]
    ids = [list(generate(build_model(str(model), get_backend("numpy")), [1, 2], 6,
                         np.random.default_rng(3))) for model in (d, tmp_path / "m.bin")]
    assert ids[0] == ids[1]


@needs_hf
def test_pytorch_model_bin(hf_dir, tmp_path):
    """Older checkpoints: pytorch_model.bin, keys without 'transformer.', causal-mask buffers."""
    d, m = hf_dir
    (tmp_path / "pt").mkdir()
    (tmp_path / "pt" / "config.json").write_text((d / "config.json").read_text())
    sd = {k.removeprefix("transformer."): v for k, v in m.state_dict().items()}
    sd.update({f"h.{i}.attn.bias": torch.ones(1, 1, 24, 24) for i in range(CFG.num_layers)})
    torch.save(sd, tmp_path / "pt" / "pytorch_model.bin")
    assert cli("convert", tmp_path / "pt", tmp_path / "pt.bin").returncode == 0
    assert cli("convert", d, tmp_path / "st.bin").returncode == 0
    assert (tmp_path / "pt.bin").read_bytes() == (tmp_path / "st.bin").read_bytes()


def test_convert_refuses_non_finite_weights(tmp_path):
    """NaN weights are not converted, either way: one line, exit 1, nothing written."""
    pytest.importorskip("safetensors")
    from safetensors.numpy import load_file, save_file
    flat = random_weights(CFG, seed=3)
    bad = flat.copy()
    bad[100] = np.nan
    write_model(tmp_path / "nan.bin", CFG, bad)
    assert_one_line_error(cli("convert", tmp_path / "nan.bin", tmp_path / "hf"), "nan.bin",
                          "1 of", "not finite")
    assert not (tmp_path / "hf").exists()
    write_model(tmp_path / "m.bin", CFG, flat)
    assert cli("convert", tmp_path / "m.bin", tmp_path / "hf").returncode == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    name = sorted(tensors)[0]
    tensors[name] = np.full_like(tensors[name], np.inf)
    save_file(tensors, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(cli("convert", tmp_path / "hf", tmp_path / "back.bin"), "hf",
                          f"{tensors[name].size:,} of", "not finite")
    assert not (tmp_path / "back.bin").exists()


@needs_hf
def test_llmpy_bin_loads_in_transformers(tmp_path):
    flat = random_weights(CFG, seed=3)
    write_model(tmp_path / "m.bin", CFG, flat)
    r = cli("convert", tmp_path / "m.bin", tmp_path / "hf")
    assert r.returncode == 0, r.stderr
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["n_embd"], config["n_layer"], config["n_head"], config["vocab_size"],
            config["n_positions"]) == (40, 3, 5, 101, 24)
    # no <|endoftext|> in a 101-token vocabulary (transformers would default it to 50256)
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    x = tokens(CFG, 2, 24)[:, :-1]
    assert rel_err(hf_logits(tmp_path / "hf", x), ours_logits(CFG, flat, x)) <= TOL


@needs_hf
def test_bf16(hf_dir, tmp_path):
    d, m = hf_dir
    r = cli("convert", d, tmp_path / "bf16.bin", "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    fp32 = llmc_layout(m.state_dict(), CFG.num_layers, CFG.padded_vocab_size)
    bits = torch.from_numpy(fp32).to(torch.bfloat16).view(torch.int16).numpy().astype("<i2")
    assert (tmp_path / "bf16.bin").read_bytes() == llmc_model_bytes(CFG, 5, bits.tobytes())
    # v5 -> HF: the model HF gets is the original with every weight rounded to bf16
    assert cli("convert", tmp_path / "bf16.bin", tmp_path / "hf").returncode == 0
    rounded = hf_model()
    with torch.no_grad():
        for p in rounded.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = tokens(CFG, 2, 24)[:, :-1]
    assert np.array_equal(hf_logits(tmp_path / "hf", x), hf_logits(rounded, x))


@needs_hf
def test_convert_bad_input(hf_dir, tmp_path):
    d, m = hf_dir
    good = (d / "config.json").read_text()
    assert cli("convert", d, tmp_path / "m.bin").returncode == 0
    raw = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "magic.bin").write_bytes(struct.pack("<i", 7) + raw[4:])
    assert_one_line_error(cli("convert", tmp_path / "magic.bin", tmp_path / "o"), "magic.bin",
                          "bad magic")
    (tmp_path / "version.bin").write_bytes(raw[:4] + struct.pack("<i", 4) + raw[8:])
    assert_one_line_error(cli("convert", tmp_path / "version.bin", tmp_path / "o"), "version 4")
    (tmp_path / "short.bin").write_bytes(raw[:-4])
    assert_one_line_error(cli("convert", tmp_path / "short.bin", tmp_path / "o"), "truncated")

    def hf_variant(name, config=None, tensors=None, drop=()):
        v = tmp_path / name
        v.mkdir()
        c = json.loads(good)
        c.update(config or {})
        (v / "config.json").write_text(json.dumps(c))
        sd = {k: t.clone() for k, t in m.state_dict().items()
              if k != "lm_head.weight" and k not in drop}
        sd.update(tensors or {})
        safetensors_torch.save_file(sd, v / "model.safetensors", metadata={"format": "pt"})
        return cli("convert", v, tmp_path / "o.bin")

    assert_one_line_error(hf_variant("wide", {"n_embd": 45}), "model.safetensors",
                          "wte.weight has shape (101, 40), expected (101, 45)")
    assert_one_line_error(hf_variant("long", {"n_positions": 30}), "wpe.weight", "(24, 40)",
                          "(30, 40)")
    c_attn = m.state_dict()["transformer.h.1.attn.c_attn.weight"]
    assert_one_line_error(hf_variant("transposed", tensors={
        "transformer.h.1.attn.c_attn.weight": c_attn.t().contiguous()}),
        "h.1.attn.c_attn.weight", "(120, 40)", "expected (40, 120)")
    assert_one_line_error(hf_variant("relu", {"activation_function": "relu"}), "relu")
    assert_one_line_error(hf_variant("untied", tensors={"lm_head.weight": torch.zeros(101, 40)}),
                          "lm_head.weight", "ties")
    assert_one_line_error(hf_variant("extra", tensors={"score.weight": torch.zeros(2, 40)}),
                          "unexpected", "score.weight")
    assert_one_line_error(hf_variant("missing", drop=("transformer.ln_f.weight",)),
                          "missing tensor ln_f.weight")
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(good)
    assert_one_line_error(cli("convert", tmp_path / "noweights", tmp_path / "o.bin"),
                          "no model.safetensors or pytorch_model.bin")
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{")
    assert_one_line_error(cli("convert", tmp_path / "badjson", tmp_path / "o.bin"),
                          "config.json", "not valid JSON")
    assert_one_line_error(hf_variant("nullembd", {"n_embd": None, "n_inner": 160}),
                          "config.json", "bad config.json")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "config.json").write_text("[1, 2]")
    (tmp_path / "list" / "model.safetensors").write_bytes(b"")   # read after config.json
    for args in (["convert", tmp_path / "list", tmp_path / "o.bin"],
                 ["train", "--model", tmp_path / "list", "--train-data", tmp_path / "m.bin"]):
        assert_one_line_error(cli(*args), "config.json: expected a JSON object, got a list")
    for name, write in [("junkpt", lambda p: p.write_bytes(b"junk\n")),
                        ("listpt", lambda p: torch.save([1, 2], p))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(good)
        write(tmp_path / name / "pytorch_model.bin")
    assert_one_line_error(cli("convert", tmp_path / "junkpt", tmp_path / "o.bin"),
                          "pytorch_model.bin: not a file torch.load can read (KeyError: ")
    assert_one_line_error(cli("convert", tmp_path / "listpt", tmp_path / "o.bin"),
                          "pytorch_model.bin: not a PyTorch state dict", "a list")
    assert not (tmp_path / "o.bin").exists()
    # nothing written where the outputs cannot all be: not the tokenizer before the model,
    # not an fp32 HF directory for --dtype bf16
    assert_one_line_error(cli("convert", d, tmp_path / "none" / "o.bin", "--tokenizer",
                              tmp_path / "t.bin"), "o.bin: no such directory")
    assert not (tmp_path / "t.bin").exists()
    assert_one_line_error(cli("convert", tmp_path / "m.bin", tmp_path / "hfx", "--dtype", "bf16"),
                          "--dtype bf16", "llm.c .bin")
    assert not (tmp_path / "hfx").exists()


@needs_hf
def test_local_looking_names_never_go_to_the_hub(tmp_path, monkeypatch):
    """A mistyped path is no hub id: it fails at once, not after ~23 s of retries."""
    from llmpy.io import hf
    monkeypatch.setattr(hf, "download", lambda name: pytest.fail(f"{name} went to the hub"))
    monkeypatch.chdir(tmp_path)
    for name in ("missing.bin", "gpt2.safetensors", "config.json", "./gpt2", "/no/gpt2",
                 "runs/a/gpt2"):
        assert_one_line_error(cli("convert", name, "o.bin"), f"{name}: no such file")


@needs_hf
def test_hub_retry_warnings_are_quiet(tmp_path, monkeypatch):
    """huggingface_hub logs a warning per retry (12 lines offline): the download runs with
    its logging at ERROR, and restores it after."""
    import logging

    import huggingface_hub
    from huggingface_hub.utils import logging as hf_logging
    levels = []

    def offline(repo, allow_patterns):
        levels.append(hf_logging.get_verbosity())
        raise OSError("offline")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    before = hf_logging.get_verbosity()
    assert_one_line_error(cli("convert", "gpt2", tmp_path / "o.bin"), "gpt2",
                          "hub download failed: OSError: offline")
    assert levels == [logging.ERROR] and hf_logging.get_verbosity() == before


@needs_hf
def test_convert_writes_gpt2_tokenizer(hf_dir, tmp_path):
    m = hf_model(config=dict(vocab_size=50257, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    m.save_pretrained(tmp_path / "hf")
    r = cli("convert", tmp_path / "hf", tmp_path / "m.bin", "--tokenizer", tmp_path / "tok.bin")
    assert r.returncode == 0, r.stderr
    # llm.c's tokenizer file, read here independently and checked against tiktoken's ranks
    from tiktoken.load import load_tiktoken_bpe
    want = {rank: tok for tok, rank in load_tiktoken_bpe(bundled_data("gpt2.tiktoken")).items()}
    want[50256] = b"<|endoftext|>"
    data = (tmp_path / "tok.bin").read_bytes()
    assert struct.unpack("<4i", data[:16]) == (20240328, 2, 50257, 50256)
    pos = 1024
    for i in range(50257):
        assert data[pos + 1:pos + 1 + data[pos]] == want[i], i
        pos += 1 + data[pos]
    assert pos == len(data)
    d, _ = hf_dir
    assert_one_line_error(cli("convert", d, tmp_path / "o.bin", "--tokenizer", tmp_path / "t.bin"),
                          "t.bin", "vocab size 101")
    assert not (tmp_path / "o.bin").exists() and not (tmp_path / "t.bin").exists()


@needs_hf
def test_convert_hub_name_offline(tmp_path, monkeypatch):
    """A hub name goes to the real download code; here it can only fail, in one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    assert_one_line_error(llmpy("convert", "gpt2", tmp_path / "o.bin"), "gpt2",
                          "hub download failed")


@needs_hf
def test_model_gpt2_is_openai_s_weights(hf_dir, tmp_path, monkeypatch):
    """--model gpt2 (train, eval, sample) loads the hub's GPT-2, as nanoGPT's init_from does,
    not a from-scratch shape (that is d12); offline it fails in one line."""
    from llmpy.io import hf
    d, _ = hf_dir
    monkeypatch.setattr(hf, "download", lambda name: str(d) if name == "gpt2" else None)
    numpy = get_backend("numpy")
    assert np.array_equal(build_model("gpt2", numpy).params.buf, build_model(str(d), numpy).params.buf)
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "cache"))
    assert_one_line_error(llmpy("sample", "--model", "gpt2-medium"), "gpt2-medium",
                          "hub download failed")


# ----------------------------------------------------------------------------- debug state

@pytest.fixture
def state(tmp_path):
    """A model .bin and a debug state on its first batch, both from independent writers."""
    flat = random_weights(CFG, seed=5)
    write_llmc_model(tmp_path / "m.bin", CFG, flat)
    t = tokens(CFG, 3, 20, seed=6)
    write_llmc_debug_state(tmp_path / "s.bin", CFG, flat, t[:, :-1], t[:, 1:])
    return tmp_path


def test_debug_state_roundtrip(state):
    s = read_debug_state(state / "s.bin", CFG)
    assert s.x.shape == (3, 20) and s.logits.shape == (3, 20, 101)
    assert s.grads.shape == (num_params(CFG),)
    write_debug_state(state / "again.bin", s)
    assert (state / "again.bin").read_bytes() == (state / "s.bin").read_bytes()


def test_debug_state_command(state):
    """`llmpy debug-state` on a token file: the first B*T+1 tokens, the reference's numbers."""
    toks = np.random.default_rng(7).integers(0, CFG.vocab_size, 2 * 16 + 1 + 10)
    with open(state / "d.bin", "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, toks.size, *[0] * 253))
        toks.astype("<u2").tofile(f)
    r = cli("debug-state", state / "m.bin", "--data", state / "d.bin", "-b", 2, "-t", 16)
    assert r.returncode == 0, r.stderr
    flat = random_weights(CFG, seed=5)
    x, y = toks[:32].reshape(2, 16), toks[1:33].reshape(2, 16)
    write_llmc_debug_state(state / "want.bin", CFG, flat, x, y)
    got, want = (read_debug_state(state / n, CFG) for n in ("m_debug_state.bin", "want.bin"))
    assert np.array_equal(got.x, x) and np.array_equal(got.y, y)
    assert rel_err(got.logits, want.logits) <= TOL and abs(got.loss - want.loss) <= TOL
    assert rel_err(got.grads, want.grads) <= TOL


def test_test_model_passes(state):
    r = llmpy("test-model", state / "m.bin", state / "s.bin")
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.strip()}
    for name in ["logits", "loss"] + ["d" + n for n, _ in param_shapes(CFG)]:
        assert rows[name][3] == "OK", rows[name]
        assert float(rows[name][2]) <= 1e-5        # max rel err, measured ~3e-7
    assert r.stdout.count("  OK    loss") == 10   # the 10 AdamW steps
    assert "overall: OK (28/28 OK)" in r.stdout


@pytest.mark.parametrize("name,index", [("logits", 5), ("loss", 0), ("dqkvw", 123),
                                        ("dfcprojb", 0), ("dlnfb", 39)])
def test_test_model_fails_on_corrupt_tensor(state, name, index):
    B, T, V = 3, 20, CFG.vocab_size
    offsets = {"logits": 2 * B * T, "loss": 2 * B * T + B * T * V}
    o = 2 * B * T + B * T * V + 1
    for n, shape in param_shapes(CFG):
        offsets["d" + n] = o
        o += int(np.prod(shape))
    with open(state / "s.bin", "r+b") as f:
        f.seek(1024 + 4 * (offsets[name] + index))
        (value,) = struct.unpack("<f", f.read(4))
        f.seek(-4, 1)
        f.write(struct.pack("<f", value + 0.01 * (abs(value) + 1)))
    r = cli("test-model", state / "m.bin", state / "s.bin", "--steps", 0)
    assert_one_line_error(r, "s.bin", "FAIL: 1 of 18 checks")
    fails = [line.split()[0] for line in r.stdout.splitlines() if "  FAIL" in line]
    assert fails == [name], r.stdout


def test_test_model_bad_input(state):
    raw = (state / "s.bin").read_bytes()
    m = state / "m.bin"

    def check(name, data, *words):
        (state / name).write_bytes(data)
        assert_one_line_error(cli("test-model", m, state / name, "--steps", 0), name, *words)

    check("magic.bin", struct.pack("<i", 20240326) + raw[4:], "bad magic", "20240327")
    check("version.bin", raw[:4] + struct.pack("<i", 1) + raw[8:], "version 1")
    check("short.bin", raw[:-4], "truncated", "expected")
    check("long.bin", raw + b"\0" * 4, "too long")
    check("header.bin", raw[:1000], "truncated")
    check("bigT.bin", raw[:12] + struct.pack("<i", 25) + raw[16:], "T=25", "max_seq_len 24")
    check("zeroB.bin", raw[:8] + struct.pack("<i", 0) + raw[12:], "B=0")
    # B and T that do not match the file's length: the state of another batch shape
    check("shape.bin", raw[:8] + struct.pack("<i", 4) + raw[12:], "B=4 T=20", "truncated")
    check("token.bin", raw[:1024] + struct.pack("<i", 101) + raw[1028:], "token id 101")
    # a debug state for another model (V=100): its length cannot match this model
    other = GPT2Config(max_seq_len=24, vocab_size=100, num_layers=3, num_heads=5, channels=40)
    t = tokens(other, 3, 20)
    write_llmc_debug_state(state / "other.bin", other, random_weights(other), t[:, :-1], t[:, 1:])
    assert_one_line_error(cli("test-model", m, state / "other.bin", "--steps", 0),
                          "other.bin", "V=101")
    (state / "badmodel.bin").write_bytes(b"\0" * 2000)
    assert_one_line_error(cli("test-model", state / "badmodel.bin", state / "s.bin"),
                          "badmodel.bin", "bad magic")
    assert_one_line_error(cli("test-model", m, state / "nope.bin"), "nope.bin", "no such file")
    assert_one_line_error(cli("test-model", m, state / "s.bin", "--steps", -1), "--steps")
    assert_one_line_error(cli("test-model", m, state / "s.bin", "--tol", "nan"), "--tol",
                          "finite")


def test_debug_state_bad_input(state):
    with open(state / "few.bin", "wb") as f:
        f.write(struct.pack("<256i", 20240520, 1, 10, *[0] * 253) + b"\0" * 20)
    assert_one_line_error(cli("debug-state", state / "m.bin", "--data", state / "few.bin",
                                "-t", 8), "few.bin", "too few")
    assert_one_line_error(cli("debug-state", state / "m.bin", "-t", 25), "max_seq_len 24")
    assert_one_line_error(cli("debug-state", state / "s.bin"), "s.bin", "bad magic")
    # B and T are checked before the reference runs (B=0 divided by zero in the DataLoader)
    for flag, value, name in (("-b", 0, "--batch-size"), ("-t", 0, "--seq-len"),
                              ("-t", -4, "--seq-len")):
        assert_one_line_error(cli("debug-state", state / "m.bin", flag, value), name,
                              f"got {value}")
    assert not (state / "m_debug_state.bin").exists()


# ----------------------------------------------------------------------------- init

def test_init_matches_gpt2():
    """GPT-2's init on a d12-wide model (C=768) with 2 layers: per tensor, the sample std is
    within 1% of N(0, 0.02) (residual projections 0.02/sqrt(2L) = 0.01); with >= 200k samples
    per tensor the std of the sample std is below 0.2%, so 1% is a 5-sigma band. The share of
    values within one std is 68.3% (a uniform init with the same std would give 57.7%)."""
    cfg = GPT2Config(max_seq_len=256, vocab_size=1000, num_layers=2, num_heads=12, channels=768)
    model = GPT2(cfg, get_backend("numpy"))
    init_weights(model, seed=0)
    p = model.params
    std = {"wte": 0.02, "wpe": 0.02, "qkvw": 0.02, "fcw": 0.02, "attprojw": 0.01, "fcprojw": 0.01}
    for name, want in std.items():
        w = getattr(p, name)[:cfg.vocab_size] if name == "wte" else getattr(p, name)
        w = w.astype(np.float64).ravel()
        assert abs(w.std() / want - 1) < 0.01, (name, w.std())
        assert abs(w.mean()) < 5 * want / np.sqrt(w.size), (name, w.mean())
        assert abs(np.mean(np.abs(w) < want) - 0.6827) < 0.005, name
    assert not p.wte[cfg.vocab_size:].any(), "padded rows of wte are zero"
    for name in ("ln1w", "ln2w", "lnfw"):
        assert (getattr(p, name) == 1).all(), name
    for name in ("ln1b", "ln2b", "lnfb", "qkvb", "attprojb", "fcb", "fcprojb"):
        assert not getattr(p, name).any(), name
    again = GPT2(cfg, get_backend("numpy"))
    init_weights(again, seed=0)
    assert np.array_equal(again.params.buf, p.buf)
    init_weights(again, seed=1)
    assert not np.array_equal(again.params.wpe, p.wpe)


@pytest.mark.parametrize("name,params", [
    # GPT-2's published parameter counts (Hugging Face, unpadded vocab 50257)
    ("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200), ("d12", 124_439_808), ("d24", 354_823_168),
    ("d36", 774_030_080), ("d48", 1_557_611_200)])
def test_presets_are_gpt2_sizes(name, params):
    cfg = preset(name)
    assert cfg.padded_vocab_size == 50304
    assert num_params(cfg) - (50304 - 50257) * cfg.channels == params


def test_preset_d6():
    cfg = preset("d6")
    assert (cfg.num_layers, cfg.num_heads, cfg.channels) == (6, 6, 384)


# ----------------------------------------------------------------------------- 124M

@pytest.mark.slow
def test_gpt2_124m_test_model(tmp_path):
    """The done-when check: a GPT-2 124M .bin and a debug state on real data (the first batch
    of the bundled Shakespeare val split, B=4 T=64), both written by another program, pass."""
    cfg = preset("gpt2")
    model = GPT2(cfg, get_backend("numpy"))
    init_weights(model, seed=0)
    flat = model.params.buf.copy()
    del model
    write_llmc_model(tmp_path / "gpt2_124M.bin", cfg, flat)
    toks = np.fromfile(bundled_data("shakespeare_val.bin"), "<u2", offset=1024)[:4 * 64 + 1]
    toks = toks.astype(np.int64)
    write_llmc_debug_state(tmp_path / "state.bin", cfg, flat, toks[:-1].reshape(4, 64),
                           toks[1:].reshape(4, 64))
    r = llmpy("test-model", tmp_path / "gpt2_124M.bin", tmp_path / "state.bin")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "overall: OK (28/28 OK)" in r.stdout


@pytest.mark.slow
@needs_hf
def test_gpt2_124m_hf_roundtrip(tmp_path):
    m = hf_model(config={})      # transformers' default GPT2Config is GPT-2 124M
    m.save_pretrained(tmp_path / "hf")
    assert cli("convert", tmp_path / "hf", tmp_path / "m.bin").returncode == 0
    assert cli("convert", tmp_path / "m.bin", tmp_path / "back").returncode == 0
    x = np.random.default_rng(0).integers(0, 50257, (2, 64))
    want = hf_logits(m, x)
    assert np.array_equal(hf_logits(tmp_path / "back", x), want)
    cfg = preset("gpt2")
    flat = np.fromfile(tmp_path / "m.bin", "<f4", offset=1024)
    assert rel_err(ours_logits(cfg, flat, x), want) <= TOL
