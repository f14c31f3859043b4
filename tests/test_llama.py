"""The decoder (llmpy/llama.py) against transformers' own Llama, Mistral, Qwen2, Gemma, Gemma 2
and Gemma 3 models in float32, eager attention, eval mode: logits, loss and every parameter's
gradient, 10 AdamW steps against torch.optim.AdamW, and the KV-cache decode step.

Tolerance as tests/test_gpt2.py: max |ours - theirs| / max |theirs| <= 1e-5 per tensor (HF's
tensors, so each layer's q, k, v, up, gate separately); losses to 1e-5 relative. Both sides sum
in float32 in different orders, so bit equality is not expected.

The HF models get random weights larger than their init (N(0, 0.15)), norms and biases away from
their 0 / 1, so that every norm weight, bias and softcap changes the result: a test asserts for
each case that the caps bite and the window hides keys.
"""
import copy
import json

import numpy as np
import pytest
import torch
import transformers as tf

from conftest import BACKENDS
from llmpy.backends import get_backend
from llmpy.errors import LlmpyError
from llmpy.model.llama import (Decoder, Llama, LlamaConfig, config_from_hf, config_to_hf, decayed,
                         flops_per_token, hf_names, init_weights, param_shapes,
                         params_from_hf, params_to_hf, preset)
from llmpy.model.gpt2 import load_params
from llmpy.train.optim import AdamW, AdamWConfig

TOL = 1e-5
V = 131                 # padded to 256
# pad_token_id None: with one, transformers' nn.Embedding(padding_idx=...) gives the pad row no
# gradient from the lookup (only from a tied classifier); llm.py trains on unpadded windows and
# updates every row
SIZES = dict(vocab_size=V, hidden_size=32, intermediate_size=48, max_position_embeddings=64,
             num_attention_heads=4, pad_token_id=None)
LLAMA31 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8}
# name: (config class, its arguments, T)
CASES = {
    "llama-gqa-untied": (tf.LlamaConfig, dict(num_hidden_layers=2, num_key_value_heads=2,
                                              tie_word_embeddings=False), 16),
    "llama-tied": (tf.LlamaConfig, dict(num_hidden_layers=2, tie_word_embeddings=True,
                                        rms_norm_eps=1e-5), 16),
    "llama31-rope": (tf.LlamaConfig, dict(num_hidden_layers=2, num_key_value_heads=1,
                                          rope_parameters=LLAMA31), 20),
    "mistral-window": (tf.MistralConfig, dict(num_hidden_layers=2, num_key_value_heads=2,
                                              sliding_window=5), 20),
    "qwen2-bias-window": (tf.Qwen2Config, dict(num_hidden_layers=2, num_key_value_heads=2,
                                               use_sliding_window=True, sliding_window=6,
                                               max_window_layers=1), 20),
    "gemma-mqa": (tf.GemmaConfig, dict(num_hidden_layers=2, num_key_value_heads=1,
                                       head_dim=24), 16),
    "gemma2": (tf.Gemma2Config, dict(num_hidden_layers=3, num_key_value_heads=2, head_dim=16,
                                     sliding_window=6, query_pre_attn_scalar=24,
                                     attn_logit_softcapping=2.0,
                                     final_logit_softcapping=3.0), 20),
    "gemma3": (tf.Gemma3TextConfig, dict(num_hidden_layers=6, num_key_value_heads=2,
                                         head_dim=16, sliding_window=5,
                                         query_pre_attn_scalar=20,
                                         rope_parameters={
                                             "full_attention": {"rope_type": "default",
                                                                "rope_theta": 1e6},
                                             "sliding_attention": {"rope_type": "default",
                                                                   "rope_theta": 50.0}}), 24),
}


def rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


@pytest.fixture(params=BACKENDS, ids=lambda be: be.name)
def backend(request):
    return request.param


def hf_model(case, seed=0):
    """A transformers model of the case with random weights, float32, eager attention, eval."""
    cls, kw, T = CASES[case]
    hc = cls(**SIZES, **kw)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(hc, attn_implementation="eager",
                                                dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # norms and biases off their 0 or 1, weights larger than the 0.02 init
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim == 1 else 0.15)
                    + (1.0 if p.ndim == 1 and "norm" in name and "gemma" not in case else 0))
    return model, T


def hf_state(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def batch(T, B=2, seed=1):
    r = np.random.default_rng(seed)
    return r.integers(0, V, (B, T)), r.integers(0, V, (B, T))


def hf_loss(model, x, y):
    """transformers' logits, and the cross-entropy of them against our (already shifted)
    targets."""
    logits = model(torch.from_numpy(x)).logits
    return logits, torch.nn.functional.cross_entropy(logits.reshape(-1, V),
                                                     torch.from_numpy(y).reshape(-1))


def ours(case, backend, model):
    cfg = config_from_hf(model.config.to_dict(), case)
    ours = Llama(cfg, backend)
    load_params(ours, params_from_hf(cfg, hf_state(model), case))
    return ours


@pytest.mark.parametrize("case", CASES)
def test_matches_transformers(backend, case):
    model, T = hf_model(case)
    x, y = batch(T)
    m = ours(case, backend, model)
    loss = m.forward(x, y)
    logits = np.array(backend.to_host(m.acts.logits))[..., :V]
    m.zero_grad()
    m.backward()
    ref_logits, ref_loss = hf_loss(model, x, y)
    ref_loss.backward()
    assert rel_err(logits, ref_logits.detach().numpy()) <= TOL
    assert abs(loss - ref_loss.item()) <= TOL * ref_loss.item()
    grads = params_to_hf(m.config, backend.to_host(m.grads.buf))
    ref = {k: p.grad.numpy() for k, p in model.named_parameters()}
    assert set(grads) == set(ref)
    for name in ref:
        assert rel_err(grads[name], ref[name]) <= TOL, name
    for name in ("wte", "lm_head"):
        if hasattr(m.grads, name):
            assert not np.asarray(backend.to_host(getattr(m.grads, name)))[V:].any()


# per case, the switches it tests and a setting that turns each off
SWITCHES = {
    "gemma2": {"final_logit_softcapping": None, "attn_logit_softcapping": None,
               "sliding_window": 1000, "query_pre_attn_scalar": 16},
    "gemma3": {"sliding_window": 1000, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e6}}},
    "mistral-window": {"sliding_window": None},
    "qwen2-bias-window": {"use_sliding_window": False},
    "llama31-rope": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
}


@pytest.mark.parametrize("case", SWITCHES)
def test_the_switches_change_the_result(case):
    """Guards the comparison above: the same weights with one of a case's softcaps, windows,
    scales or rope settings turned off give transformers other logits, so matching it tests
    each of them."""
    model, T = hf_model(case)
    x, _ = batch(T)
    cls, kw, _ = CASES[case]
    with torch.no_grad():
        base = model(torch.from_numpy(x)).logits.numpy()
        for key, off in SWITCHES[case].items():
            other = tf.AutoModelForCausalLM.from_config(
                cls(**SIZES, **{**kw, key: off}), attn_implementation="eager").eval()
            other.load_state_dict(model.state_dict())
            assert rel_err(other(torch.from_numpy(x)).logits.numpy(), base) > 1e-2, key


def adamw_groups(model, cfg, wd):
    """torch param groups with our decay set: the 2-D weights decay, norms and biases not."""
    names, decays = hf_names(cfg), decayed(cfg)
    params = dict(model.named_parameters())
    decay = [p for k, p in params.items() if names[k] in decays]
    rest = [p for k, p in params.items() if names[k] not in decays]
    assert decay and rest
    return [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma2", "gemma3"])
def test_adamw_steps_match_torch(backend, case):
    steps, lr, wd = 10, 1e-3, 0.1
    model, T = hf_model(case, seed=2)
    x, y = batch(T, B=3, seed=3)
    m = ours(case, backend, model)
    opt = AdamW(m, AdamWConfig(lr=lr, weight_decay=wd), decayed=m.decayed)
    ref_opt = torch.optim.AdamW(adamw_groups(model, m.config, wd), lr=lr)
    losses = []
    for step in range(steps):
        loss = m.forward(x, y)
        m.zero_grad()
        m.backward()
        opt.update()
        ref_opt.zero_grad()
        _, ref_loss = hf_loss(model, x, y)
        ref_loss.backward()
        ref_opt.step()
        assert abs(loss - ref_loss.item()) <= TOL * ref_loss.item(), f"step {step}"
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.1                  # the steps do train


@pytest.mark.parametrize("case", ["llama-gqa-untied", "mistral-window", "gemma2", "gemma3"])
def test_decode_step_matches_the_forward_pass(backend, case):
    """The KV-cache decoder, one position at a time for 2 rows, gives the logits of a forward
    pass over the whole sequence at every position: past the window on sliding layers, where
    the cache keeps only the window, in a ring."""
    model, T = hf_model(case)
    x, _ = batch(T)
    m = ours(case, backend, model)
    ref = hf_loss(model, x, x)[0].detach().numpy()          # (B,T,V)
    d = Decoder(m, T, rows=2)
    if m.config.sliding_window:
        assert min(k.shape[2] for k in d.keys) == m.config.sliding_window < T
    for t in range(T):
        assert rel_err(d.step(x[:, t], t), ref[:, t]) <= TOL, t


def test_init_weights_and_presets():
    cfg = preset("llama-tiny")
    assert (cfg.vocab_size, cfg.num_kv_heads, cfg.tied_embeddings) == (50257, 2, True)
    be = BACKENDS[0]
    m = Llama(LlamaConfig(vocab_size=100, num_layers=3, channels=32, num_heads=4, ffn_dim=64),
              be)
    init_weights(m, seed=0)
    p = m.params
    assert (p.ln1w == 1).all() and (p.lnfw == 1).all() and not p.wte[100:].any()
    assert abs(p.qkvw.std() - 0.02) < 2e-3
    assert abs(p.fcprojw.std() - 0.02 / np.sqrt(6)) < 1e-3
    g = Llama(preset("gemma3-270m", vocab_size=100, num_layers=2, channels=64, head_dim=16,
                     ffn_dim=64, layer_types=("sliding", "full")), be)
    init_weights(g)
    assert not g.params.ln1w.any() and not g.params.qnormw.any()     # Gemma's 1 + w
    x, y = batch(8)
    loss = m.forward(x % 100, y % 100)
    assert abs(loss - np.log(100)) < 0.5
    # 270M parameters, as its name says (the 170M of its 262,144-token embedding included)
    big = preset("gemma3-270m")
    n = sum(int(np.prod(s)) for _, s in param_shapes(big))
    assert 265e6 < n < 275e6
    assert flops_per_token(big, 1024) > 6 * n


def test_config_round_trip_and_refusals():
    for case, (cls, kw, _) in CASES.items():
        hc = cls(**SIZES, **kw).to_dict()
        cfg = config_from_hf(hc, case)
        assert config_from_hf(json.loads(json.dumps(config_to_hf(cfg))), case) == cfg
        # transformers builds the same network from what we write
        again = type(cls(**SIZES))(**config_to_hf(cfg))
        assert config_from_hf(again.to_dict(), case) == cfg
    base = tf.LlamaConfig(**SIZES, num_hidden_layers=2).to_dict()
    bad = {
        "model_type 'gpt2' is not supported": {"model_type": "gpt2"},
        "rope type 'yarn' is not supported": {"rope_parameters": {"rope_type": "yarn",
                                                                  "rope_theta": 1e4,
                                                                  "factor": 2.0}},
        "num_key_value_heads 3 does not divide num_attention_heads 4":
            {"num_key_value_heads": 3},
        "attention_bias is set": {"attention_bias": True},
        "hidden_act 'gelu' is not silu": {"hidden_act": "gelu"},
    }
    for message, change in bad.items():
        with pytest.raises(LlmpyError, match=f"^cfg.json: {message}"):
            config_from_hf({**base, **change}, "cfg.json")
    mistral = tf.MistralConfig(**SIZES, num_hidden_layers=2, num_key_value_heads=2).to_dict()
    with pytest.raises(LlmpyError, match="^cfg.json: sliding_window 0 must be positive"):
        config_from_hf({**mistral, "sliding_window": 0}, "cfg.json")
    # head_dim that does not fit the weights: the loader says which tensor and why
    model, _ = hf_model("gemma-mqa")
    c = model.config.to_dict()
    cfg = config_from_hf({**c, "head_dim": 16}, "dir")
    with pytest.raises(LlmpyError, match=r"^dir: .*q_proj.weight.* check config.json's head_dim"):
        params_from_hf(cfg, hf_state(model), "dir")


def small_config(**kw):
    return LlamaConfig(**{**dict(vocab_size=V, num_layers=2, num_heads=4, num_kv_heads=2,
                                 channels=32, ffn_dim=48, max_seq_len=64), **kw})


def test_flops_per_token_counts_the_step_s_products():
    """flops_per_token (MFU's numerator) against the products one forward and backward of the
    NumPy reference computes, counted from the shapes the model passes (2 FLOPs a
    multiply-add, a backward twice its forward), without windows: a windowed layer counts
    only the keys its queries see, which the reference's (T,T) products do not skip."""
    from llmpy.backends import numpy as ref
    flops = []

    def counted(name, count, factor):
        def op(*args, **kw):
            flops.append(factor * count(*args))
            return getattr(ref, name)(*args, **kw)
        return op

    def mm(out, inp, weight, *_):
        return 2 * inp.size * weight.shape[0]

    def att(out, pre, *_):                      # q.k and att @ v: 2 * 2 * (B,NH,T,T) * hd
        return 4 * pre.size * out.shape[-1] // pre.shape[1]
    be = copy.copy(get_backend("numpy"))        # its ops replaced by counting ones below
    be.matmul_forward = counted("matmul_forward", mm, 1)
    be.matmul_backward = counted("matmul_backward", lambda di, dw, db, do, i, w: mm(do, i, w), 2)
    be.attention_forward = counted("attention_forward", att, 1)
    be.attention_backward = counted("attention_backward",
                                    lambda di, dp, da, do, *_: att(do, dp), 2)
    cfg = small_config(head_dim=12, qkv_bias=True, tied_embeddings=False)
    B, T = 2, 7
    model = Llama(cfg, be)
    model.forward(*batch(T, B))
    model.zero_grad()
    model.backward()
    assert sum(flops) == flops_per_token(cfg, T) * B * T
    windowed = small_config(sliding_window=3, layer_types=("sliding", "full"))
    assert (flops_per_token(small_config(), T) - flops_per_token(windowed, T)
            == 12 * 4 * 8 * (T - 3))


@pytest.mark.parametrize("case", ["llama-gqa-untied", "gemma2", "gemma3"])
def test_memory_plan_is_what_is_allocated(backend, case):
    """model.memory() and AdamW.state_bytes(), from shapes alone, against the buffers a step
    allocates."""
    cls, kw, _ = CASES[case]
    m = Llama(config_from_hf(cls(**SIZES, **kw).to_dict(), case), backend)
    B, T = 2, 7
    opt = AdamW(m, decayed=m.decayed)
    plan = {**m.memory(B, T), "AdamW state": opt.state_bytes()}
    m.forward(*batch(T, B))
    m.zero_grad()
    m.backward()
    opt.update()
    nbytes = lambda *bufs: sum(b.nbytes for b in bufs if b is not None)  # noqa: E731
    assert plan == {"parameters": nbytes(m.params.buf), "gradients": nbytes(m.grads.buf),
                    "activations": nbytes(m.acts.buf, m.acts.buf32),
                    "activation gradients": nbytes(m.grad_acts.buf, m.grad_acts.buf32,
                                                   m.grad_layer.buf),
                    "AdamW state": nbytes(opt.m, opt.v, opt.master)}


def test_bad_batches_are_one_line_errors(backend):
    m = Llama(small_config(), backend)
    x, y = batch(5)
    with pytest.raises(LlmpyError, match=r"targets of shape \(2, 4\) for inputs of shape"):
        m.forward(x, y[:, :4])
    with pytest.raises(LlmpyError, match=f"input token id {V} is out of range"):
        m.forward(np.full((2, 5), V))
    with pytest.raises(LlmpyError, match="exceeds the model's max_seq_len 64"):
        m.forward(batch(65)[0])
    with pytest.raises(LlmpyError, match="backward.. needs a forward.. with targets first"):
        m.forward(x)
        m.backward()


# config.json as older transformers wrote them (the form most hub checkpoints have): rope_theta,
# rope_scaling, Gemma 3's rope_local_base_freq and sliding_window_pattern, Gemma's legacy "gelu"
OLD_STYLE = {
    "llama": {"model_type": "llama", "rope_theta": 500000.0, "tie_word_embeddings": True,
              "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}},
    "gemma3_text": {"model_type": "gemma3_text", "rope_theta": 1000000.0,
                    "rope_local_base_freq": 10000.0, "rope_scaling": None, "head_dim": 16,
                    "sliding_window": 8, "sliding_window_pattern": 3, "query_pre_attn_scalar": 16,
                    "final_logit_softcapping": None, "attn_logit_softcapping": None},
    "gemma": {"model_type": "gemma", "hidden_act": "gelu", "head_dim": 16},
    "qwen2": {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096,
              "max_window_layers": 2, "rope_theta": 1000000.0},
}
CLASSES = {"llama": tf.LlamaConfig, "gemma3_text": tf.Gemma3TextConfig,
           "gemma": tf.GemmaConfig, "qwen2": tf.Qwen2Config}


@pytest.mark.parametrize("kind", OLD_STYLE)
def test_old_style_config_json_reads_as_transformers_reads_it(kind):
    """The older config.json keys give the config that transformers' own reading of the same
    dict (normalised by its config class to the 5.x form) gives."""
    c = {**SIZES, "num_hidden_layers": 6, "num_key_value_heads": 2, **OLD_STYLE[kind]}
    ours = config_from_hf(c, "config.json")
    theirs = config_from_hf(CLASSES[kind](**{k: v for k, v in c.items() if k != "model_type"})
                            .to_dict(), "config.json")
    assert ours == theirs
    if kind == "gemma3_text":
        assert (ours.rope_theta, ours.rope_local_theta) == (1e6, 1e4)
        assert ours.layer_types == ("sliding", "sliding", "full") * 2
    if kind == "llama":
        assert ours.rope_scaling["factor"] == 32.0 and ours.rope_theta == 500000.0
