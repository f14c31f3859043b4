"""llm.c's llama3 files: the uint32 token file (version 7), the model file (magic 20240803) and
the debug state, read and written byte for byte, and Hugging Face Llama-family directories.

Oracles: writers written out below with struct and numpy the way llm.c's llama3 branch
(train_llama3.py's write_model / write_tensors / write_state / write_training_history,
dev/data/data_common.py's write_datafile) writes its files, not calling llmpy's writers; and
transformers' own models for the HF directories.
"""
import dataclasses
import json
import struct

import numpy as np
import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from llmpy.backends import get_backend
from llmpy.model.layout import GPT2Config
from llmpy.data.loader import DataLoader, read_tokens, write_tokens
from llmpy.errors import LlmpyError
from llmpy.model.llama import Llama, params_from_hf
from llmpy.io.llama3 import (LlamaDebugState, LlmcFields, ffn_fields, llmc_ffn_dim,
                               read_llama_debug_state, read_llama_hf, read_llama_model,
                               write_llama_debug_state, write_llama_hf, write_llama_model)
from llmpy.model.gpt2 import load_params
from test_cli import assert_one_line_error, cli
from test_gpt2 import random_weights, rel_err, write_llmc_model, write_llmc_tokens


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
        one_line_error(lambda: read_tokens(tmp_path / name), tmp_path / name, words)
    # a legacy int32 stream whose second id is a version and third a count is still a stream
    # unless that count sizes the file exactly
    legacy = np.r_[5, 7, 3, np.arange(300)].astype("<i4")
    legacy.tofile(tmp_path / "legacy.bin")
    np.testing.assert_array_equal(read_tokens(tmp_path / "legacy.bin"), legacy)


# ----------------------------------------------------------------------------- model file

# GQA (4 query heads, 2 kv heads), an odd vocabulary (padded to 384 in our layout, not in
# llm.c's), F = 192 = llm.c's F for C=64 with multiple_of 32 and ffn_dim_multiplier 1.0
# (2*4*64//3 = 170, rounded up to 192), Llama 3.1's rope scaling
HF_LLAMA = dict(vocab_size=301, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                rms_norm_eps=1e-5, tie_word_embeddings=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
FIELDS = dict(multiple_of=32, ffn_dim_multiplier=1.0, major=3, minor=1)


def hf_model(kind="llama", seed=0, **config):
    """A random transformers *ForCausalLM; noise on every tensor so norms are not all 1 or 0."""
    classes = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
               "mistral": ("MistralConfig", "MistralForCausalLM"),
               "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
               "gemma": ("GemmaConfig", "GemmaForCausalLM"),
               "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"),
               "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM")}
    config_class, model_class = (getattr(transformers, n) for n in classes[kind])
    torch.manual_seed(seed)
    m = model_class(config_class(**{**(HF_LLAMA if kind == "llama" else {}), **config}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def unpermute(w, heads):
    """HF's q or k rows (each head: the first halves of its rope pairs, then the second
    halves) -> Meta's (each pair adjacent), the layout llm.c's file holds: row s*hd/2 + j of a
    head goes to row 2j + s, as from_pretrained_llama3_hf undoes HF's conversion script."""
    rows, C = w.shape
    hd = rows // heads
    out = np.empty_like(w)
    for h in range(heads):
        for s in range(2):
            for j in range(hd // 2):
                out[h * hd + 2 * j + s] = w[h * hd + s * hd // 2 + j]
    return out


def llmc_tensors(sd, NH, NKV, L):
    """train_llama3.py's write_tensors from an HF state dict: 16 slots, zero biases, the
    classifier in the wpe slot (wte when tied), c_attn = [q; k; v] with q, k unpermuted,
    c_fc = [up; gate]. Returns the list of (numpy float32) arrays in file order."""
    sd = {k: v.detach().float().numpy() for k, v in sd.items()}
    layer = lambda name: [sd[f"model.layers.{i}.{name}"] for i in range(L)]   # noqa: E731
    zeros = lambda ts: [np.zeros(t.shape[0], np.float32) for t in ts]        # noqa: E731
    qkv = [np.concatenate([unpermute(q, NH), unpermute(k, NKV), v]) for q, k, v in zip(
        layer("self_attn.q_proj.weight"), layer("self_attn.k_proj.weight"),
        layer("self_attn.v_proj.weight"))]
    fc = [np.concatenate([u, g]) for u, g in zip(layer("mlp.up_proj.weight"),
                                                 layer("mlp.gate_proj.weight"))]
    ln1, o = layer("input_layernorm.weight"), layer("self_attn.o_proj.weight")
    ln2, down = layer("post_attention_layernorm.weight"), layer("mlp.down_proj.weight")
    wte = sd["model.embed_tokens.weight"]
    return [wte, sd.get("lm_head.weight", wte), *ln1, *zeros(ln1), *qkv, *zeros(qkv), *o,
            *zeros(o), *ln2, *zeros(ln2), *fc, *zeros(fc), *down, *zeros(down),
            sd["model.norm.weight"], np.zeros_like(sd["model.norm.weight"])]


def llmc_llama_header(c, version, multiple_of, ffn_dim_multiplier, major, minor):
    """train_llama3.py's write_model header: 256 int32s, then 256 float32s."""
    scaled = int(bool(c.get("rope_parameters", {}).get("rope_type") == "llama3"))
    ints = struct.pack("<256i", 20240803, version, c["max_position_embeddings"],
                       c["vocab_size"], c["num_hidden_layers"], c["num_attention_heads"],
                       c["num_key_value_heads"], c["hidden_size"], multiple_of, scaled,
                       major, minor, *[0] * 244)
    floats = struct.pack("<256f", ffn_dim_multiplier, c["rms_norm_eps"],
                         c["rope_parameters"]["rope_theta"], *[0] * 253)
    return ints + floats


def llmc_llama_model(path, m, version=3, **fields):
    """An independent writer of llm.c's llama3 model file, as train_llama3.py writes it."""
    c = {**HF_LLAMA, **m.config.to_dict()}
    tensors = llmc_tensors(m.state_dict(), c["num_attention_heads"],
                           c["num_key_value_heads"], c["num_hidden_layers"])
    body = np.concatenate([t.ravel() for t in tensors])
    if version == 5:   # torch's float32 -> bfloat16 cast, as write_bf16
        body = torch.from_numpy(body).to(torch.bfloat16).view(torch.int16).numpy()
    with open(path, "wb") as f:
        f.write(llmc_llama_header(c, version, **{**FIELDS, **fields}))
        f.write(body.astype("<i2" if version == 5 else "<f4").tobytes())


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    m = hf_model()
    m.save_pretrained(d)
    return d, m


def hf_logits(model_or_dir, x):
    m = model_or_dir
    if not isinstance(m, torch.nn.Module):
        m, info = transformers.AutoModelForCausalLM.from_pretrained(
            str(m), output_loading_info=True)
        assert not any(info[k] for k in ("missing_keys", "unexpected_keys",
                                         "mismatched_keys")), info
    with torch.no_grad():
        return m.eval()(torch.from_numpy(x)).logits.numpy()


def tokens(V, B, T, seed=1):
    return np.random.default_rng(seed).integers(0, V, (B, T))


def test_model_file_is_llmc_bytes(llama_dir, tmp_path):
    d, m = llama_dir
    llmc_llama_model(tmp_path / "theirs.bin", m)
    cfg, params = read_llama_hf(d)
    write_llama_model(tmp_path / "ours.bin", cfg, params, fields=LlmcFields(**FIELDS))
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    back, again, fields = read_llama_model(tmp_path / "theirs.bin")
    assert back == cfg and fields == LlmcFields(**FIELDS)
    assert back.padded_vocab_size == 384 and not again[:0].size
    np.testing.assert_array_equal(again, params)
    # fields derived from F: another header, the same F by llm.c's formula, the same tensors
    write_llama_model(tmp_path / "derived.bin", cfg, params)
    _, _, derived = read_llama_model(tmp_path / "derived.bin")
    assert llmc_ffn_dim(64, derived.multiple_of, derived.ffn_dim_multiplier) == 192
    llmc_llama_model(tmp_path / "theirs2.bin", m, multiple_of=derived.multiple_of,
                     ffn_dim_multiplier=derived.ffn_dim_multiplier)
    assert (tmp_path / "derived.bin").read_bytes() == (tmp_path / "theirs2.bin").read_bytes()


def test_model_file_keeps_a_read_header(llama_dir, tmp_path):
    """A file with Meta's own header fields (Llama 3.2 1B's multiple_of 256 and multiplier 1.5
    give the same F as 32 and 1.0 here; version 3.2) is written back byte for byte."""
    _, m = llama_dir
    fields = dict(multiple_of=64, ffn_dim_multiplier=1.1, major=3, minor=2)
    assert llmc_ffn_dim(64, 64, 1.1) == 192
    llmc_llama_model(tmp_path / "theirs.bin", m, **fields)
    cfg, params, read_fields = read_llama_model(tmp_path / "theirs.bin")
    assert read_fields == LlmcFields(**fields)          # 1.1, not 1.10000002384
    write_llama_model(tmp_path / "ours.bin", cfg, params, fields=read_fields)
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()


def test_model_file_bf16(llama_dir, tmp_path):
    d, m = llama_dir
    llmc_llama_model(tmp_path / "theirs.bin", m, version=5)
    cfg, params = read_llama_hf(d)
    write_llama_model(tmp_path / "ours.bin", cfg, params, version=5, fields=LlmcFields(**FIELDS))
    assert (tmp_path / "ours.bin").read_bytes() == (tmp_path / "theirs.bin").read_bytes()
    _, back, _ = read_llama_model(tmp_path / "ours.bin")
    want = torch.from_numpy(params).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back, want)


def test_file_layout_is_meta_s_rope(llama_dir, tmp_path):
    """The permutation's direction, checked by what it means: llm.c's rope (Meta's: channel
    pairs (2j, 2j+1) turned as complex numbers) on the file's q and k gives the attention scores
    transformers' rope gives on HF's q and k."""
    d, m = llama_dir
    cfg, params = read_llama_hf(d)
    write_llama_model(tmp_path / "m.bin", cfg, params)
    NH, NKV, hd, C, T = 4, 2, 16, 64, 12
    qkv = np.fromfile(tmp_path / "m.bin", "<f4", offset=2048 + 4 * (2 * 301 * C + 2 * 2 * C),
                      count=(NH + 2 * NKV) * hd * C).reshape(-1, C)          # layer 0's c_attn
    x = torch.randn(1, T, C, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)[None]
    cos, sin = m.model.rotary_emb(x, pos)
    attn = m.model.layers[0].self_attn
    q = attn.q_proj(x).view(1, T, NH, hd).transpose(1, 2)
    k = attn.k_proj(x).view(1, T, NKV, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    hf_scores = q @ k.repeat_interleave(NH // NKV, 1).transpose(-1, -2)     # (1,NH,T,T)
    # Meta: the same frequencies (transformers' inv_freq, Llama 3.1's scaling included)
    angles = pos[0, :, None].float() * m.model.rotary_emb.inv_freq[None]    # (T, hd/2)
    turn = torch.polar(torch.ones_like(angles), angles)
    w = torch.from_numpy(qkv)

    def rope(rows, heads):
        t = (x @ w[rows].T).view(1, T, heads, hd // 2, 2)
        t = torch.view_as_real(torch.view_as_complex(t.contiguous()) * turn[None, :, None])
        return t.reshape(1, T, heads, hd).transpose(1, 2)
    qm, km = rope(slice(0, NH * hd), NH), rope(slice(NH * hd, (NH + NKV) * hd), NKV)
    meta_scores = qm @ km.repeat_interleave(NH // NKV, 1).transpose(-1, -2)
    torch.testing.assert_close(meta_scores, hf_scores, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(x @ w[:NH * hd].T, attn.q_proj(x))   # the rows did move


@pytest.mark.parametrize("tied", [False, True])
def test_hf_llmc_roundtrip_identical_logits(tmp_path, tied):
    """transformers' LlamaForCausalLM dir -> our params -> llm.c file -> back -> HF dir: the
    same tensors, and transformers' logits identical."""
    m = hf_model(tie_word_embeddings=tied)
    m.save_pretrained(tmp_path / "hf")
    cfg, params = read_llama_hf(tmp_path / "hf")
    assert cfg.tied_embeddings == tied
    write_llama_model(tmp_path / "m.bin", cfg, params)
    cfg2, params2, _ = read_llama_model(tmp_path / "m.bin")
    assert not cfg2.tied_embeddings           # llm.c trains the classifier as its own tensor
    write_llama_hf(tmp_path / "back", cfg2, params2)
    x = tokens(301, 2, 32)
    assert np.array_equal(hf_logits(tmp_path / "back", x), hf_logits(m, x))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    sd = back.state_dict()
    for k, v in m.state_dict().items():
        assert torch.equal(sd[k], v), k


# the other families: HF dir -> our params -> HF dir, and why llm.c's file refuses each
FAMILIES = {
    "mistral": (dict(sliding_window=6), "a sliding window"),
    "qwen2": (dict(), "q, k, v biases"),
    "gemma": (dict(head_dim=24), "head_dim 24"),
    "gemma2": (dict(head_dim=16, sliding_window=6, query_pre_attn_scalar=24), "the gelu_tanh MLP"),
    "gemma3_text": (dict(head_dim=16, sliding_window=6, sliding_window_pattern=2),
                    "the gelu_tanh MLP"),
}
SMALL = dict(vocab_size=301, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_hf_families_roundtrip(tmp_path, kind):
    config, refusal = FAMILIES[kind]
    m = hf_model(kind, **SMALL, **config)
    m.save_pretrained(tmp_path / "hf")
    cfg, params = read_llama_hf(tmp_path / "hf")
    assert cfg.model_type == kind
    write_llama_hf(tmp_path / "back", cfg, params)
    x = tokens(301, 2, 16)
    assert np.array_equal(hf_logits(tmp_path / "back", x), hf_logits(m, x))
    with pytest.raises(LlmpyError) as e:
        write_llama_model(tmp_path / "m.bin", cfg, params)
    assert str(e.value).startswith(f"{tmp_path / 'm.bin'}: llm.c's llama3 model file cannot "
                                   f"express {refusal}")
    assert "\n" not in str(e.value) and not (tmp_path / "m.bin").exists()


def test_hf_sharded_bf16(tmp_path):
    """Real checkpoints come in bfloat16 and in shards (model.safetensors.index.json)."""
    m = hf_model().to(torch.bfloat16)
    m.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    cfg, params = read_llama_hf(tmp_path / "hf")
    want = params_from_hf(cfg, {k: v.float().numpy() for k, v in m.state_dict().items()}, "-")
    np.testing.assert_array_equal(params, want)


def test_hf_unsupported(llama_dir, tmp_path):
    d, m = llama_dir
    good = json.loads((d / "config.json").read_text())

    def variant(name, **changes):
        v = tmp_path / name
        v.mkdir()
        (v / "config.json").write_text(json.dumps({**good, **changes}))
        (v / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes())
        with pytest.raises(LlmpyError) as e:
            read_llama_hf(v)
        assert "\n" not in str(e.value)
        return str(e.value)
    assert variant("gpt2", model_type="gpt2").startswith(f"{tmp_path / 'gpt2' / 'config.json'}: "
                                                         "model_type 'gpt2' is not supported")
    assert "architectures ['LlamaForSequenceClassification'] is not supported" in variant(
        "cls", architectures=["LlamaForSequenceClassification"])
    assert "missing tensor model.layers.2.input_layernorm.weight" in variant(
        "deeper", num_hidden_layers=3)
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "config.json").write_text(json.dumps(good))
    with pytest.raises(LlmpyError, match="none: no model.safetensors or model.safetensors"):
        read_llama_hf(tmp_path / "none")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(good))
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{not json}......")
    with pytest.raises(LlmpyError, match="model.safetensors: not a safetensors file: its header"):
        read_llama_hf(tmp_path / "bad")


def one_line_error(fn, path, *words):
    """fn() raises LlmpyError in one line that starts with path and holds every word."""
    with pytest.raises(LlmpyError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: "), msg
    for w in words:
        assert w in msg, (w, msg)


def test_model_file_bad_input(llama_dir, tmp_path):
    _, m = llama_dir
    llmc_llama_model(tmp_path / "good.bin", m)
    raw = (tmp_path / "good.bin").read_bytes()

    def int_at(i, v):
        return raw[:4 * i] + struct.pack("<i", v) + raw[4 * i + 4:]

    def float_at(i, v):
        o = 1024 + 4 * i
        return raw[:o] + struct.pack("<f", v) + raw[o + 4:]
    qkvb = 2048 + 4 * (2 * 301 * 64 + 2 * 2 * 64 + 2 * 128 * 64)     # the qkvb slot
    cases = {
        "gpt2.bin": (int_at(0, 20240326), "bad magic number 20240326", "starts with 20240803"),
        "version.bin": (int_at(1, 4), "unsupported llama3 model version 4 (supported: 3, 5)"),
        "tiny.bin": (raw[:1000], "truncated llama3 model file (smaller than its 1024-byte"),
        "header.bin": (raw[:2000], "truncated llama3 model file (smaller than its 2048-byte"),
        "short.bin": (raw[:-4], "llama3 model file truncated", "expected"),
        "long.bin": (raw + b"\0\0", "llama3 model file has trailing bytes"),
        "eps.bin": (float_at(1, 0.0), "norm_eps 0 must be positive"),
        "negeps.bin": (float_at(1, -1e-5), "norm_eps -1e-05 must be positive"),
        "naneps.bin": (float_at(1, float("nan")), "norm_eps nan must be positive"),
        "theta.bin": (float_at(2, 0.0), "rope_theta 0 must be positive"),
        "kv.bin": (int_at(6, 3), "n_kv_head 3 does not divide n_head 4"),
        "kv0.bin": (int_at(6, 0), "n_kv_head 0 does not divide n_head 4"),
        "heads.bin": (int_at(5, 6), "channels 64 are not divisible by n_head 6"),
        "multiple.bin": (int_at(8, 0), "multiple_of 0 and ffn_dim_multiplier 1 give no MLP"),
        "mult.bin": (float_at(0, -1.0), "ffn_dim_multiplier -1 give no MLP width F"),
        "nanmult.bin": (float_at(0, float("nan")), "ffn_dim_multiplier nan give no MLP"),
        "scaled.bin": (int_at(9, 2), "use_scaled_rope 2 is not 0 or 1"),
        # F from another multiplier: the file's length no longer fits its header
        "ffn.bin": (float_at(0, 2.0), "truncated", "F=352"),
        "odd.bin": (int_at(7, 60), "inconsistent llama3 model header", "head_dim 15 is odd"),
        "bias.bin": (raw[:qkvb] + struct.pack("<f", 0.5) + raw[qkvb + 4:],
                     "qkvb is not zero, but llm.c's llama3 never reads its bias slots"),
    }
    for name, (data, *words) in cases.items():
        (tmp_path / name).write_bytes(data)
        one_line_error(lambda: read_llama_model(tmp_path / name), tmp_path / name, *words)


def test_model_file_refusals(llama_dir, tmp_path):
    """What llm.c's file cannot hold is refused in one line, before anything is written."""
    d, _ = llama_dir
    cfg, params = read_llama_hf(d)
    out = tmp_path / "m.bin"
    factor32 = dict(cfg.rope_scaling, factor=32.0)       # Llama 3.2's; llm.c's is fixed at 8
    one_line_error(lambda: write_llama_model(out, dataclasses.replace(
        cfg, rope_scaling=factor32), params), out, "cannot express rope scaling",
        "'factor': 32.0")
    one_line_error(lambda: write_llama_model(out, cfg, params, fields=LlmcFields(32, 1.5)),
                   out, "multiple_of 32 and ffn_dim_multiplier 1.5 do not give the model's F 192")
    assert not out.exists()
    # every F has a header: a power of two and a float32 multiplier, else multiple_of = F
    for C, F in [(64, 192), (4096, 14336), (4, 7), (1, 1), (2 ** 25, 2 ** 26 + 1)]:
        f = ffn_fields(C, F, out)
        assert llmc_ffn_dim(C, f.multiple_of, f.ffn_dim_multiplier) == F
    one_line_error(lambda: ffn_fields(64, 0, out), out, "ffn_dim 0")


# ----------------------------------------------------------------------------- debug state

def hf_grads(m, x, y):
    """transformers' logits, loss (llm.c's: mean cross-entropy of logits vs y, no shift) and
    the gradients, as a state dict."""
    m.zero_grad()
    logits = m(torch.from_numpy(x)).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).flatten())
    loss.backward()
    return logits.detach().numpy(), loss.item(), {k: p.grad for k, p in m.named_parameters()}


def llmc_llama_debug_state(path, m, x, y, losses, norms):
    """train_llama3.py's write_state, then write_training_history's update: header[4] is the
    number of steps, their losses and grad norms appended."""
    logits, loss, grads = hf_grads(m, x, y)
    c = m.config
    B, T = x.shape
    with open(path, "wb") as f:
        f.write(struct.pack("<256i", 20240803, 3, B, T, len(losses), *[0] * 251))
        f.write(x.astype("<i4").tobytes() + y.astype("<i4").tobytes())
        f.write(logits.astype("<f4").tobytes() + struct.pack("<f", loss))
        for t in llmc_tensors(grads, c.num_attention_heads, c.num_key_value_heads,
                              c.num_hidden_layers):
            f.write(t.astype("<f4").tobytes())
        f.write(np.asarray(losses, "<f4").tobytes() + np.asarray(norms, "<f4").tobytes())
    return logits, loss, grads


@pytest.fixture
def state(llama_dir, tmp_path):
    d, m = llama_dir
    cfg, _ = read_llama_hf(d)
    t = tokens(301, 3, 21, seed=6)
    x, y = t[:, :-1], t[:, 1:]
    ref = llmc_llama_debug_state(tmp_path / "s.bin", m, x, y, [5.7, 5.2, 4.9], [1.5, 1.25, 1.0])
    return cfg, x, y, ref


def test_debug_state_roundtrip(state, tmp_path):
    """The reader gives transformers' own numbers, the gradients in our (HF's) layout: the
    q and k rows permuted back, the classifier's from the wpe slot; the writer gives the
    file's bytes back."""
    cfg, x, y, (logits, loss, grads) = state
    s = read_llama_debug_state(tmp_path / "s.bin", cfg)
    assert np.array_equal(s.x, x) and np.array_equal(s.y, y)
    assert np.array_equal(s.logits, logits) and s.loss == np.float32(loss)
    want = params_from_hf(cfg, {k: g.numpy() for k, g in grads.items()}, "-")
    assert np.array_equal(s.grads, want)
    np.testing.assert_array_equal(s.losses, np.float32([5.7, 5.2, 4.9]))
    np.testing.assert_array_equal(s.norms, np.float32([1.5, 1.25, 1.0]))
    write_llama_debug_state(tmp_path / "again.bin", cfg, s)
    assert (tmp_path / "again.bin").read_bytes() == (tmp_path / "s.bin").read_bytes()
    # no training history yet (write_state alone): steps 0
    s0 = LlamaDebugState(s.x, s.y, s.logits, s.loss, s.grads)
    write_llama_debug_state(tmp_path / "s0.bin", cfg, s0)
    assert read_llama_debug_state(tmp_path / "s0.bin", cfg).losses.size == 0
    assert (tmp_path / "s0.bin").stat().st_size == (tmp_path / "s.bin").stat().st_size - 24


def test_debug_state_tied(state, tmp_path):
    """A tied model's wte gradient is the sum of llm.c's two (embedding and classifier): the
    same as transformers' tied model's gradient on the same weights. A tied gradient cannot be
    split back into llm.c's two."""
    cfg, x, y, _ = state
    tied = dataclasses.replace(cfg, tied_embeddings=True)
    m = hf_model(tie_word_embeddings=False, seed=2)
    with torch.no_grad():
        m.lm_head.weight.copy_(m.model.embed_tokens.weight)
    llmc_llama_debug_state(tmp_path / "u.bin", m, x, y, [], [])
    mt = hf_model(tie_word_embeddings=True, seed=2)
    mt.load_state_dict({k: v for k, v in m.state_dict().items() if k != "lm_head.weight"},
                       strict=False)
    mt.tie_weights()
    _, _, tied_grads = hf_grads(mt, x, y)
    s = read_llama_debug_state(tmp_path / "u.bin", tied)
    want = params_from_hf(tied, {k: g.numpy() for k, g in tied_grads.items()}, "-")
    np.testing.assert_allclose(s.grads, want, rtol=1e-5, atol=1e-7)
    one_line_error(lambda: write_llama_debug_state(tmp_path / "t.bin", tied, s), tmp_path / "t.bin",
                   "a tied model's one gradient cannot be split")


def test_debug_state_bad_input(state, tmp_path):
    cfg = state[0]
    raw = (tmp_path / "s.bin").read_bytes()

    def check(name, data, *words):
        (tmp_path / name).write_bytes(data)
        one_line_error(lambda: read_llama_debug_state(tmp_path / name, cfg), tmp_path / name,
                       *words)
    at = lambda i, v: raw[:4 * i] + struct.pack("<i", v) + raw[4 * i + 4:]   # noqa: E731
    check("magic.bin", at(0, 20240327), "bad magic number 20240327", "20240803")
    check("version.bin", at(1, 2), "unsupported llama3 debug state version 2 (supported: 3)")
    check("short.bin", raw[:-4], "truncated", "steps=3")
    check("long.bin", raw + b"\0" * 4, "too long")
    check("header.bin", raw[:1000], "truncated")
    check("zeroB.bin", at(2, 0), "B=0")
    check("bigT.bin", at(3, 33), "T=33", "max_seq_len 32")
    check("steps.bin", at(4, -1), "steps=-1")
    check("history.bin", at(4, 4), "truncated", "steps=4")     # one step more than appended
    check("token.bin", at(256, 301), "input token id 301", "vocab size 301")
    one_line_error(lambda: write_llama_debug_state(tmp_path / "o.bin", cfg, LlamaDebugState(
        *[np.zeros((1, 1), int)] * 2, np.zeros((1, 1, 301)), 0.0, np.zeros(1), [1.0], [])),
        tmp_path / "o.bin", "1 losses and 0 gradient norms")


def test_llmc_file_runs_as_transformers(llama_dir, tmp_path):
    """A file written the way train_llama3.py writes it, read into our decoder (numpy backend):
    transformers' logits within 1e-5 of their largest, so the layout read is the one our rope
    computes (a wrong permutation is off by O(1))."""
    _, m = llama_dir
    llmc_llama_model(tmp_path / "m.bin", m)
    cfg, params, _ = read_llama_model(tmp_path / "m.bin")
    model = Llama(cfg, get_backend("numpy"))
    load_params(model, params)
    x = tokens(301, 2, 32)
    model.forward(x)
    assert rel_err(model.acts.logits[..., :301], hf_logits(m, x)) <= 1e-5
