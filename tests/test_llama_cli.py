"""The Llama / Gemma decoder through every subcommand: --model from a preset, an llm.c llama3
.bin, a Hugging Face directory (written by transformers' save_pretrained) or hub name, a run
directory; train (every run feature, checkpoints as HF directories, bit-exact resume), eval,
sample, convert, debug-state / test-model, and the 2-process data-parallel runs.

The oracle is transformers: its models write the directories, its generate() samples, its
forward/backward writes the debug state, and its from_pretrained loads our checkpoints."""
import json
import shutil

import numpy as np
import pytest

import llmpy.train.loop
from llmpy.backends import get_backend
from llmpy.data.loader import bundled_data, read_tokens, token_version, write_tokens
from llmpy.evals import write_evalfile
from llmpy.io import hf
from llmpy.io.hf_tokenizer import HFTokenizer
from llmpy.io.llama3 import read_llama_hf, read_llama_model, write_llama_model
from llmpy.io.weights import read_weights
from llmpy.model.build import build_model
from llmpy.model.llama import Llama, preset
from llmpy.train.config import TrainConfig
from test_cli import assert_one_line_error, cli
from test_llama_files import FAMILIES, SMALL, hf_logits, hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
from test_hf_tokenizer import save, shifted, train_bpe  # noqa: E402  (needs tokenizers)

NUMPY = get_backend("numpy")
TEXT = open(bundled_data("shakespeare.txt")).read()
DOCS = TEXT.split("\n\n")[:400]
# a model with its own tokenizer: 300 BPE tokens in a 301-row embedding (llama: GQA, untied,
# Llama 3.1's rope scaling, as test_llama_files' HF_LLAMA)
V = 301


def records(path):
    out = [json.loads(line) for line in path.read_text().splitlines()]
    for r in out:
        del r["ms"], r["tokens_per_s"]
    return out


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """A transformers LlamaForCausalLM directory with its tokenizer, and token files written
    with that tokenizer (uint16: 300 ids)."""
    d = tmp_path_factory.mktemp("llama_tok")
    hf_model("llama", vocab_size=V, hidden_size=32, intermediate_size=64,
             max_position_embeddings=64).save_pretrained(d / "model")
    save(train_bpe(), d / "model")
    tok = HFTokenizer(d / "model")
    tokens = tok.encode_documents(DOCS)
    write_tokens(d / "train.bin", tokens[:-600], version=token_version(tok.vocab_size))
    write_tokens(d / "val.bin", tokens[-600:], version=token_version(tok.vocab_size))
    return d


# ----------------------------------------------------------------------------- --model

def test_every_kind_of_model(llama_tok, tmp_path, monkeypatch):
    """A preset, an HF directory of each family, an llm.c llama3 .bin, a hub name (here the
    download returns a local directory): each builds the decoder with the weights transformers
    computes with."""
    m = build_model("llama-tiny", NUMPY)
    assert isinstance(m, Llama) and m.config == preset("llama-tiny")
    for kind, (config, _) in FAMILIES.items():
        src = hf_model(kind, **SMALL, **config)
        src.save_pretrained(tmp_path / kind)
        m = build_model(str(tmp_path / kind), NUMPY)
        assert m.config.model_type == kind
        x = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (1, 12))
        m.forward(x)
        ref = hf_logits(src, x)
        assert np.abs(m.acts.logits[..., :SMALL["vocab_size"]] - ref).max() < 1e-5 * \
            np.abs(ref).max(), kind
    cfg, params = read_llama_hf(llama_tok / "model")
    write_llama_model(tmp_path / "l.bin", cfg, params)
    m = build_model(str(tmp_path / "l.bin"), NUMPY)
    assert isinstance(m, Llama) and not m.config.tied_embeddings
    asked = []
    monkeypatch.setattr(hf, "download", lambda name: asked.append(name) or
                        str(llama_tok / "model"))
    m = build_model("meta-llama/Llama-3.2-1B", NUMPY)
    assert asked == ["meta-llama/Llama-3.2-1B"] and np.array_equal(m.params.buf, params)
    assert m.source.tokenizer_path() == str(llama_tok / "model" / "tokenizer.json")


def test_local_paths_never_go_to_the_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(hf, "download", lambda name: pytest.fail(f"{name} went to the hub"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for name in ("runs/llama", "llama.bin", "./SmolLM2-135M", "~/gemma"):
        assert_one_line_error(cli("sample", "--model", name), name, "no such file")


def test_unsupported_hf_class(tmp_path):
    hf_model("llama", **SMALL).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert_one_line_error(cli("sample", "--model", tmp_path / "m"),
                          tmp_path / "m" / "config.json", "model_type 'bert' is not supported")
    (tmp_path / "m" / "config.json").write_text(json.dumps(
        {**config, "architectures": ["LlamaForSequenceClassification"]}))
    assert_one_line_error(cli("eval", "--model", tmp_path / "m"),
                          "LlamaForSequenceClassification", "not supported")


# ----------------------------------------------------------------------------- train

RUN = dict(model="llama-tiny", train_data=bundled_data("shakespeare_train.bin"),
           val_data=bundled_data("shakespeare_val.bin"), backend="numpy", batch_size=2,
           seq_len=8, total_batch_size=32, steps=6, lr=3e-3, lr_schedule="cosine",
           warmup_steps=2, final_lr_frac=0.1, weight_decay=0.1, grad_clip=1.0, shuffle=True,
           val_every=3, val_batches=2, sample_every=3, sample_tokens=6, checkpoint_every=2,
           keep_last=2, resume=True)


def crash_at(monkeypatch, n):
    """The next run's n-th step dies (an exception, as a killed process would stop there)."""
    calls, train_step = [], llmpy.train.loop.train_step

    def crashing(*a):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("crash")
        return train_step(*a)
    monkeypatch.setattr(llmpy.train.loop, "train_step", crashing)


def test_llama_tiny_trains_and_resumes_exactly(tmp_path, monkeypatch, capsys):
    """llama-tiny on the bundled Shakespeare (GPT-2's tokens) with a schedule, accumulation,
    clipping, weight decay, val, samples and checkpoints; a run that dies at step 5 and
    resumes from its step-4 checkpoint logs the same records, bit for bit. The checkpoint is
    an HF directory that transformers loads as the same model."""
    final = llmpy.train.loop.train(TrainConfig(**RUN, run_dir=str(tmp_path / "ref"),
                                               save=str(tmp_path / "ref.bin")))
    ref_out = capsys.readouterr().out
    assert "--- sample at step 6 ---" in ref_out
    crash_at(monkeypatch, 5)
    with pytest.raises(RuntimeError, match="crash"):
        llmpy.train.loop.train(TrainConfig(**RUN, run_dir=str(tmp_path / "run")))
    monkeypatch.undo()
    llmpy.train.loop.train(TrainConfig(**RUN, run_dir=str(tmp_path / "run")))
    out = capsys.readouterr().out
    assert "resuming from" in out and "(step 4)" in out
    assert records(tmp_path / "run" / "log.jsonl") == records(tmp_path / "ref" / "log.jsonl")
    sample = lambda o: o.split("--- sample at step 6 ---")[1].split("\n---")[0]  # noqa: E731
    assert sample(out) == sample(ref_out)                   # the sampling RNG resumed too

    ckpt = tmp_path / "ref" / "ckpt_00000006"
    assert sorted(p.name for p in (ckpt / "model").iterdir()) == ["config.json",
                                                                 "model.safetensors"]
    assert (ckpt / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "run" / "ckpt_00000006" / "model" / "model.safetensors").read_bytes()
    cfg, params = read_weights(ckpt)
    assert cfg == preset("llama-tiny") and np.array_equal(params, final.params.buf)
    # --save's llama3 .bin holds the same model, and transformers computes it from the checkpoint
    bin_cfg, bin_params, _ = read_llama_model(tmp_path / "ref.bin")
    ours = Llama(bin_cfg, NUMPY)
    ours.params.buf[:] = bin_params
    x = np.random.default_rng(1).integers(0, 50257, (1, 8))
    ours.forward(x)
    ref = hf_logits(ckpt / "model", x)
    assert np.abs(ours.acts.logits[..., :50257] - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("kind", ["qwen2", "gemma3_text"])
def test_every_family_resumes_exactly(kind, tmp_path, monkeypatch):
    """Qwen2's biases and Gemma 3's switches, which llm.c's llama3 file cannot hold, go
    through the checkpoint's HF directory and resume bit for bit."""
    config, _ = FAMILIES[kind]
    hf_model(kind, **SMALL, **config).save_pretrained(tmp_path / "m")
    write_tokens(tmp_path / "t.bin", np.random.default_rng(4).integers(0, SMALL["vocab_size"],
                                                                        400))
    args = dict(model=str(tmp_path / "m"), train_data=str(tmp_path / "t.bin"), backend="numpy",
                batch_size=2, seq_len=8, steps=4, lr=1e-2, weight_decay=0.1, shuffle=True,
                val_every=0, sample_every=0, checkpoint_every=2, resume=True)
    final = llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "ref")))
    crash_at(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="crash"):
        llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "run")))
    monkeypatch.undo()
    llmpy.train.loop.train(TrainConfig(**args, run_dir=str(tmp_path / "run")))
    assert records(tmp_path / "run" / "log.jsonl") == records(tmp_path / "ref" / "log.jsonl")
    cfg, params = read_weights(tmp_path / "run" / "ckpt_00000004")
    assert cfg.model_type == kind and np.array_equal(params, final.params.buf)


def test_hf_model_trains_with_its_own_tokenizer(llama_tok, tmp_path, capsys):
    """--model HF_DIR with token files of its tokenizer: samples decode with that tokenizer,
    the checkpoints carry it, and sample / eval / convert take the run directory."""
    run = tmp_path / "run"
    args = ["train", "--model", llama_tok / "model", "--train-data", llama_tok / "train.bin",
            "--val-data", llama_tok / "val.bin", "--backend", "numpy", "-b", 2, "-t", 16,
            "--steps", 4, "--lr", 1e-3, "--val-every", 2, "--val-batches", 2,
            "--sample-every", 4, "--sample-tokens", 12, "--run-dir", run,
            "--checkpoint-every", 2]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    assert "--- sample at step 4 ---" in r.stdout
    ckpt = run / "ckpt_00000004" / "model"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ckpt / name).read_bytes() == (llama_tok / "model" / name).read_bytes()
    # sample from the run: names the checkpoint on stderr, decodes with the tokenizer
    r = cli("sample", "--model", run, "--tokens", 5, "--backend", "numpy", "--prompt", "KING")
    assert r.returncode == 0 and r.stderr.strip() == f"sampling from {run / 'ckpt_00000004'}"
    assert r.stdout.startswith("KING")
    # eval from the run: the log's last val loss
    r = cli("eval", "--model", run, "--json")
    assert r.returncode == 0, r.stderr
    logged = [x["val_loss"] for x in records(run / "log.jsonl") if "val_loss" in x][-1]
    assert json.loads(r.stdout)["val_loss"] == pytest.approx(logged, rel=1e-6)
    # convert the run to an HF directory, tokenizer included
    r = cli("convert", run, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == \
        (ckpt / "tokenizer.json").read_bytes()


def test_token_file_of_another_tokenizer(llama_tok, tmp_path):
    """The bundled Shakespeare holds GPT-2's ids: out of range for a 301-token model; a uint16
    file for a vocabulary past 65,536 ids was written for another tokenizer."""
    r = cli("train", "--model", llama_tok / "model", "--train-data",
            bundled_data("shakespeare_train.bin"), "--steps", 1, "--sample-every", 0)
    assert_one_line_error(r, "shakespeare_train.bin", "out of range for vocab size 301")
    big = tmp_path / "big"
    hf_model("llama", vocab_size=70_400, hidden_size=32, intermediate_size=64,
             num_hidden_layers=1, max_position_embeddings=64).save_pretrained(big)
    save(shifted(train_bpe()), big)
    r = cli("train", "--model", big, "--train-data", llama_tok / "train.bin", "--steps", 1,
            "--sample-every", 0)
    assert_one_line_error(r, "train.bin", "uint16 token file", "tokenize with this model's")
    tok = HFTokenizer(big)
    write_tokens(tmp_path / "t7.bin", tok.encode_documents(DOCS[:40]))
    assert read_tokens(tmp_path / "t7.bin").dtype == np.uint32
    r = cli("train", "--model", big, "--train-data", tmp_path / "t7.bin", "--steps", 1, "-b", 1,
            "-t", 8, "--backend", "numpy", "--sample-every", 1, "--sample-tokens", 3)
    assert r.returncode == 0, r.stderr
    assert "--- sample at step 1 ---" in r.stdout


def test_hellaswag_needs_gpt2_ids(llama_tok, tmp_path):
    examples = [(1, [10, 11, 12], [[5, 6], [7], [8, 9], [3]]), (0, [4, 2], [[1], [2], [3], [4]])]
    write_evalfile(tmp_path / "hs.bin", examples)
    r = cli("eval", "--model", "llama-tiny", "--hellaswag-data", tmp_path / "hs.bin",
            "--backend", "numpy", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["hellaswag_total"] == 2
    r = cli("eval", "--model", llama_tok / "model", "--hellaswag-data", tmp_path / "hs.bin")
    assert_one_line_error(r, "hs.bin", "GPT-2 tokens", "tokenizer.json")


# ----------------------------------------------------------------------------- sample

def test_sample_greedy_is_transformers_generate(llama_tok):
    """Greedy decoding through the KV cache gives transformers' generate's tokens: the prompt
    after the tokenizer's <|begin_of_text|>, decoded with the same tokenizer."""
    prompt = "First Citizen:"
    r = cli("sample", "--model", llama_tok / "model", "--prompt", prompt, "--tokens", 10,
            "--temperature", 0, "--backend", "numpy")
    assert r.returncode == 0, r.stderr
    tok = transformers.AutoTokenizer.from_pretrained(str(llama_tok / "model"))
    m = transformers.AutoModelForCausalLM.from_pretrained(str(llama_tok / "model")).eval()
    ids = torch.tensor([tok(prompt).input_ids])
    assert ids[0, 0] == 0                                      # <|begin_of_text|>
    out = m.generate(ids, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                     attention_mask=torch.ones_like(ids), pad_token_id=0)
    assert r.stdout == prompt + tok.decode(out[0, ids.shape[1]:]) + "\n"


# ----------------------------------------------------------------------------- convert

def test_convert_both_ways(llama_tok, tmp_path):
    d = llama_tok / "model"
    for dtype, version in (("fp32", 3), ("bf16", 5)):
        r = cli("convert", d, tmp_path / f"{dtype}.bin", "--dtype", dtype)
        assert r.returncode == 0, r.stderr
        assert np.fromfile(tmp_path / f"{dtype}.bin", "<i4", 2).tolist() == [20240803, version]
    r = cli("convert", tmp_path / "fp32.bin", tmp_path / "back")
    assert r.returncode == 0, r.stderr
    x = np.random.default_rng(2).integers(0, V, (2, 16))
    assert np.array_equal(hf_logits(tmp_path / "back", x), hf_logits(d, x))
    for kind in ("gemma3_text", "qwen2"):
        config, refusal = FAMILIES[kind]
        hf_model(kind, **SMALL, **config).save_pretrained(tmp_path / kind)
        assert_one_line_error(cli("convert", tmp_path / kind, tmp_path / f"{kind}.bin"),
                              "llm.c's llama3 model file cannot express", refusal)
        assert not (tmp_path / f"{kind}.bin").exists()


# ----------------------------------------------------------------------------- debug state

def test_debug_state_and_test_model(llama_tok, tmp_path):
    """debug-state runs transformers on a llama3 .bin and writes llm.c's llama3 debug state
    with 10 AdamW steps' losses and norms; test-model checks ours against it, OK per tensor,
    and FAILs (exit 1) on a state that differs."""
    cfg, params = read_llama_hf(llama_tok / "model")
    write_llama_model(tmp_path / "l.bin", cfg, params)
    r = cli("debug-state", tmp_path / "l.bin", "--data", llama_tok / "val.bin", "-b", 2, "-t", 16)
    assert r.returncode == 0, r.stderr
    state = tmp_path / "l_debug_state.bin"
    assert np.fromfile(state, "<i4", 5).tolist() == [20240803, 3, 2, 16, 10]
    r = cli("test-model", tmp_path / "l.bin", state)
    assert r.returncode == 0, r.stdout + r.stderr
    # logits, loss, 9 gradients (wte and lm_head apart, as llm.c trains them), 10 steps'
    # gradient norms and losses
    assert "overall: OK (31/31 OK)" in r.stdout
    data = bytearray(state.read_bytes())
    data[-4:] = np.float32(123.0).tobytes()                   # the last gradient norm
    state.write_bytes(bytes(data))
    r = cli("test-model", tmp_path / "l.bin", state)
    assert_one_line_error(r, "FAIL: 1 of")
    assert "norm 9" in r.stdout and "FAIL" in r.stdout.split("norm 9")[1].splitlines()[0]


# ----------------------------------------------------------------------------- torchrun

def test_data_parallel_and_zero1(llama_tok, tmp_path):
    """2 CPU ranks (gloo) train the decoder as one process does with the same tokens per step
    (per-layer gradient buckets from PARAMS), and ZeRO-1 as plain data-parallel; ZeRO-1's
    checkpoint holds the whole AdamW state."""
    pytest.importorskip("torch.distributed")
    from test_distributed import free_port, torchrun
    d = tmp_path

    def args(name, **flags):
        a = ["--model", str(llama_tok / "model"), "--train-data", str(llama_tok / "train.bin"),
             "--backend", "numpy", "-b", "2", "-t", "8", "--steps", "4",
             "--total-batch-size", "64", "--lr", "1e-3", "--weight-decay", "0.1",
             "--grad-clip", "0.5", "--val-every", "0", "--sample-every", "0",
             "--log-jsonl", str(d / f"{name}.jsonl"), "--save", str(d / f"{name}.bin")]
        for k, v in flags.items():
            a += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        return a

    def log(name, key="train_loss"):
        return np.array([r[key] for r in records(d / f"{name}.jsonl")])

    def weights(name):
        return read_llama_model(d / f"{name}.bin")[1]

    r = cli("train", *args("one"))
    assert r.returncode == 0, r.stderr
    out, _ = torchrun([["--standalone", "--nproc-per-node", "2"]],
                      args("dp", dist_check_every=1, run_dir=d / "dp_run", checkpoint_every=4))
    assert "2 ranks" in out
    port = str(free_port())
    nodes = [["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(i),
              "--master-addr", "127.0.0.1", "--master-port", port] for i in range(2)]
    out, _ = torchrun(nodes, args("zero", zero=1, dist_check_every=1, run_dir=d / "zero_run",
                                  checkpoint_every=4))
    assert "2 ranks, ZeRO-1" in out
    for name in ("dp", "zero"):
        assert np.abs(log(name) - log("one")).max() < 1e-5, name
        assert np.abs(log(name, "grad_norm") - log("one", "grad_norm")).max() < 1e-5, name
        w, ref = weights(name), weights("one")
        assert np.abs(w - ref).max() < 1e-5 * np.abs(ref).max(), name
    for moment in ("adamw_m.bin", "adamw_v.bin"):
        z, p = (np.fromfile(d / run / "ckpt_00000004" / moment, "<f4")
                for run in ("zero_run", "dp_run"))
        assert z.shape == p.shape and np.abs(z - p).max() < 1e-5 * np.abs(p).max(), moment
    assert (d / "zero_run" / "ckpt_00000004" / "model" / "tokenizer.json").exists()


def test_data_parallel_buckets_come_from_the_table():
    """One all-reduce per layer for each tensor with a layer index in its HF names, then the
    whole-model ones: every tensor once."""
    m = Llama(preset("llama-tiny"), NUMPY)
    layout = m.layout
    assert layout.per_layer() == ("ln1w", "qkvw", "attprojw", "ln2w", "fcw", "fcprojw")
    assert layout.whole_model() == ("wte", "lnfw")
    g = preset("gemma3-270m")
    from llmpy.model.llama import DecoderLayout, param_shapes
    names = [n for n, _ in param_shapes(g)]
    gl = DecoderLayout(g)
    assert sorted(gl.per_layer() + gl.whole_model()) == sorted(names)
    assert {"qnormw", "knormw", "attpostw", "fcpostw"} <= set(gl.per_layer())


# ----------------------------------------------------------------------------- bench

@pytest.mark.parametrize("which", ["llama-tiny", "gemma3"])
def test_bench_cpu_and_sample_run(which, tmp_path):
    """bench cpu times llmpy and transformers' model (SDPA, torch.optim.AdamW) from the same
    weights and batch, and counts the step's matmul FLOPs from the decoder's shapes; bench
    sample runs the KV cache, the recompute and transformers' generate."""
    model = which
    if which == "gemma3":
        config, _ = FAMILIES["gemma3_text"]
        hf_model("gemma3_text", **SMALL, **config).save_pretrained(tmp_path / which)
        model = tmp_path / which
    B, T = 2, 8
    r = cli("bench", "cpu", "--model", model, "-b", B, "-t", T, "--steps", 1, "--warmup", 0,
            "--threads", 1, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cfg = build_model(str(model), NUMPY).config
    C, L, F, A = cfg.channels, cfg.num_layers, cfg.ffn_dim, cfg.num_heads * cfg.head_dim
    weights = L * (cfg.qkv_dim * C + C * A + 2 * F * C + C * F) + cfg.padded_vocab_size * C
    assert out["matmul_gflop"] == pytest.approx(6 * B * T * weights / 1e9)
    first = out["torch"]["losses"][0]
    for impl in ("cpu", "torch", "numpy"):
        assert out[impl]["losses"][0] == pytest.approx(first, rel=1e-5), impl   # same start
    assert out["torch_over_cpu"] > 0 and out["cpu_vs_sgemm_bound"] > 0
    r = cli("bench", "sample", "--model", model, "--tokens", 3, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["same_tokens"] and out["hf_skipped"] is None and out["hf_s"] > 0
    assert out["hf_class"] == ("LlamaForCausalLM" if which == "llama-tiny"
                               else "Gemma3ForCausalLM")
