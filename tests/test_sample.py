"""KV-cache generation: each decode step's logits against the full forward pass over the same
tokens, the tokens it samples against llm.c's full recompute and against transformers' generate
(greedy), and `llmpy sample` end to end."""

import numpy as np
import pytest

from conftest import BACKENDS
from llmpy.io.modelfile import read_model
from llmpy.model.layout import GPT2Config
from llmpy.model.build import preset
from llmpy.errors import LlmpyError
from llmpy.model.gpt2 import GPT2, load_params
from llmpy.generate import generate, generate_recompute, generate_rows, sample_next
from llmpy.model.gpt2 import Decoder
from llmpy.io.tokenizer import EOT
from test_cli import assert_one_line_error, cli, llmpy
from test_gpt2 import CFG, random_weights, rel_err, write_llmc_model

TOL = 1e-5
# the CPU backends: their forward runs in float32, like the decoder
CPU_BACKENDS = [pytest.param(be, id=be.name) for be in BACKENDS if be.name in ("numpy", "cpu")]


def model_on(backend, cfg=CFG, seed=0):
    model = GPT2(cfg, backend)
    load_params(model, random_weights(cfg, seed))
    return model


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_decode_steps_match_the_full_forward(backend, rows):
    """Each row of the decoder (its own tokens, its own cache) as a row of the full forward."""
    model = model_on(backend)
    tokens = np.random.default_rng(1).integers(0, CFG.vocab_size, (rows, CFG.max_seq_len))
    model.forward(tokens)
    full = model.acts.logits[:, :, :CFG.vocab_size]            # (rows,T,V)
    decoder = Decoder(model, CFG.max_seq_len, rows)
    for pos in range(CFG.max_seq_len):
        assert rel_err(decoder.step(tokens[:, pos], pos), full[:, pos]) <= TOL, pos


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("temperature, top_k", [(0.0, 0), (1.0, 0), (0.8, 5)])
def test_generate_samples_what_recompute_samples(backend, temperature, top_k):
    model = model_on(backend, seed=3)
    prompt, n = [7, 1, 42], CFG.max_seq_len - 3
    kw = dict(temperature=temperature, top_k=top_k)
    cached = list(generate(model, prompt, n, np.random.default_rng(5), **kw))
    again = list(generate_recompute(model, prompt, n, np.random.default_rng(5), **kw,
                                    T=CFG.max_seq_len))
    assert cached == again


@pytest.mark.skipif("gpu" not in [be.name for be in BACKENDS], reason="needs torch and triton")
def test_generate_from_a_gpu_model_decodes_on_the_host():
    """A gpu-backend model (in Triton's interpreter here) samples through a host copy of its
    weights with a CPU backend's ops: the same tokens as the NumPy model from the same random
    numbers."""
    gpu = next(be for be in BACKENDS if be.name == "gpu")
    ids = [list(generate(model_on(be), [1, 2, 3], 8, np.random.default_rng(7)))
           for be in (gpu, BACKENDS[0])]
    assert ids[0] == ids[1] and len(set(ids[0])) > 1


def test_generate_must_fit_the_context():
    model = model_on(BACKENDS[0])
    list(generate(model, [1, 2], CFG.max_seq_len - 1, np.random.default_rng(0)))   # just fits
    with pytest.raises(LlmpyError, match="max_seq_len"):
        list(generate(model, [1, 2], CFG.max_seq_len, np.random.default_rng(0)))


def test_generate_checks_the_token_ids():
    """The decoder embeds ids without a bounds check: an id past V would read a padded row."""
    model = model_on(BACKENDS[0])
    with pytest.raises(LlmpyError, match=f"prompt token id {CFG.vocab_size} is out of range"):
        list(generate(model, [1, CFG.vocab_size], 2, np.random.default_rng(0)))
    with pytest.raises(LlmpyError, match=r"start \(<\|endoftext\|>\) token id 50256"):
        list(generate(model, [], 2, np.random.default_rng(0)))
    with pytest.raises(LlmpyError, match="out of range"):   # at the call: before any output
        generate(model, [CFG.vocab_size], 2, np.random.default_rng(0))


def test_sample_next_nonfinite_logits_and_tiny_temperatures():
    rng = np.random.default_rng(0)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(LlmpyError, match="logits are not finite"):
            sample_next(np.array([0.0, bad, 1.0]), rng)
    # logits / 1e-310 overflowed to inf, and inf - inf is NaN; the limit is greedy
    logits = np.array([1.0, 3.0, 2.0])
    assert [sample_next(logits, rng, t) for t in (1e-310, 5e-324)] == [1, 1]


@pytest.mark.parametrize("top_k", [1, 3])
def test_sample_next_draws_softmax_over_the_top_k(top_k):
    """Only the top_k largest logits are ever drawn, each with its softmax(logits / T)
    probability renormalized over those k: every count within 4 standard errors of n * p
    (a binomial's sqrt(n p (1 - p))); ties avoided so that the top k is one set."""
    logits = np.array([0.3, 2.0, -1.0, 1.6, 0.9, 2.4, 1.1])   # top 3: ids 5, 1, 3
    T, n = 0.7, 4000
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_next(logits, rng, T, top_k) for _ in range(n)],
                         minlength=logits.size)
    top = np.argsort(logits)[-top_k:]
    p = np.zeros(logits.size)
    p[top] = np.exp(logits[top] / T) / np.exp(logits[top] / T).sum()
    assert (counts[p == 0] == 0).all(), counts
    assert np.all(np.abs(counts - n * p) <= 4 * np.sqrt(n * p * (1 - p)) + 1e-9), (counts, n * p)
    assert sample_next(logits, rng, 0.0, top_k) == 5                  # temperature 0: argmax


def test_greedy_generate_matches_transformers():
    """`llmpy bench sample`'s baseline, transformers' GPT2LMHeadModel.generate built by
    bench.hf_model from the same weights, picks the same tokens as generate() where no random
    numbers are drawn."""
    pytest.importorskip("transformers")
    from llmpy.bench import hf_generate, hf_model
    # seed 2: greedy from these weights changes token twice in 8; others repeat one token
    model = model_on(BACKENDS[0], preset("tiny"), seed=2)
    ours = list(generate(model, [EOT], 8, None, temperature=0.0))
    assert len(set(ours)) > 1
    assert hf_generate(hf_model(model), [EOT], 8, do_sample=False) == ours


@pytest.fixture(scope="module")
def gpt2_vocab_model(tmp_path_factory):
    """A small model over GPT-2's vocabulary, so that its tokens decode to text."""
    cfg = GPT2Config(max_seq_len=32, vocab_size=50257, num_layers=2, num_heads=2, channels=16)
    path = tmp_path_factory.mktemp("sample") / "model.bin"
    write_llmc_model(path, cfg, random_weights(cfg, seed=6))
    return path


def test_cli_streams_the_kv_cache_sample(gpt2_vocab_model):
    from llmpy.io.tokenizer import Tokenizer
    r = llmpy("sample", "--model", gpt2_vocab_model, "--prompt", "The king", "--tokens", 12,
              "--temperature", 0.9, "--top-k", 50, "--seed", 11)
    assert r.returncode == 0, r.stderr
    cfg, params = read_model(gpt2_vocab_model)
    model = GPT2(cfg, BACKENDS[0])
    load_params(model, params)
    tok = Tokenizer()
    ids = generate(model, tok.encode("The king"), 12, np.random.default_rng(11), 0.9, 50)
    assert r.stdout == "The king" + tok.decode(list(ids)) + "\n"


def test_cli_samples_several_rows_at_once(gpt2_vocab_model):
    """--num-samples 3: the rows of one generate_rows() run, each printed with the prompt."""
    from llmpy.io.tokenizer import Tokenizer
    r = llmpy("sample", "--model", gpt2_vocab_model, "--prompt", "The king", "--tokens", 10,
              "--num-samples", 3, "--seed", 4)
    assert r.returncode == 0, r.stderr
    cfg, params = read_model(gpt2_vocab_model)
    model = GPT2(cfg, BACKENDS[0])
    load_params(model, params)
    tok = Tokenizer()
    rows = np.array(list(generate_rows(model, tok.encode("The king"), 10,
                                       np.random.default_rng(4), 3)))       # (10,3)
    assert len({tuple(col) for col in rows.T}) == 3       # independent samples, not one copy
    assert r.stdout == "".join(f"--- sample {i + 1} ---\nThe king{tok.decode(col.tolist())}\n"
                               for i, col in enumerate(rows.T))
    assert_one_line_error(llmpy("sample", "--model", gpt2_vocab_model, "--num-samples", 0),
                          "--num-samples")
    assert_one_line_error(llmpy("sample", "--model", gpt2_vocab_model, "--tokens", 4,
                                "--num-samples", 10 ** 12),
                          "the KV cache does not fit in memory")
    r = llmpy("sample", "--model", gpt2_vocab_model, "--prompt", "Hi", "--tokens", 0,
              "--num-samples", 2)
    assert r.stdout == "--- sample 1 ---\nHi\n--- sample 2 ---\nHi\n"


def test_cli_sample_too_long(gpt2_vocab_model):
    r = llmpy("sample", "--model", gpt2_vocab_model, "--prompt", "The king", "--tokens", 40)
    assert_one_line_error(r, "max_seq_len 32")
    assert r.stdout == ""                     # the prompt is echoed only once it is checked


def test_cli_sample_bad_flags_and_weights(gpt2_vocab_model, tmp_path):
    """Out-of-range flags, a prompt out of the model's vocabulary, and NaN or inf weights:
    one line each, nothing on stdout."""
    m = gpt2_vocab_model
    for flags, words in [(["--temperature", "nan"], ["--temperature", "finite"]),
                         (["--temperature", -1], ["--temperature", "at least 0"]),
                         (["--tokens", -5], ["--tokens"]), (["--top-k", -1], ["--top-k"]),
                         (["--seed", -1], ["--seed"])]:
        r = cli("sample", "--model", m, *flags)
        assert_one_line_error(r, *words)
        assert r.stdout == ""
    write_llmc_model(tmp_path / "small.bin", CFG, random_weights(CFG))     # V=100
    r = cli("sample", "--model", tmp_path / "small.bin", "--prompt", "hi")
    assert_one_line_error(r, "small.bin", "prompt token id", "vocab size 100")
    assert r.stdout == ""
    cfg, params = read_model(m)
    for bad in (np.nan, np.inf):
        broken = params.copy()
        broken[cfg.padded_vocab_size * cfg.channels + 5] = bad       # one weight of wpe
        write_llmc_model(tmp_path / "bad.bin", cfg, broken)
        for rows in (1, 2):
            r = cli("sample", "--model", tmp_path / "bad.bin", "--prompt", "Hi", "--tokens", 4,
                    "--num-samples", rows)
            assert_one_line_error(r, "bad.bin", "logits are not finite")
            assert r.stdout == ""
