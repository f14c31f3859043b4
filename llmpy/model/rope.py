"""RoPE's cos/sin tables, shared by the model and the tests (they are inputs of rope_forward, not
an op: one table per sequence length and theta, built once)."""
import math

import numpy as np

from ..errors import LlmpyError


def rope_tables(hd, positions, theta, scaling=None, dtype=np.float32):
    """cos, sin: (T, hd/2) for the positions (T,), as transformers computes them.

    scaling: None, or Llama 3.1's dict (rope_type "llama3": factor, low_freq_factor,
    high_freq_factor, original_max_position_embeddings). In float32 every step is transformers'
    float32 arithmetic (it builds the tables in float32 whatever the model's dtype), so the tables
    match its to an ulp or so; in float64 (the tests) every step is float64.
    """
    # Python scalars with `dtype` arrays: each step rounds to dtype, as torch's float32 does
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2).astype(dtype) / hd)     # (hd/2,)
    if scaling is not None:
        inv_freq = _llama3_scaling(inv_freq, scaling)
    angles = np.asarray(positions).astype(dtype)[:, None] * inv_freq        # (T, hd/2)
    return np.cos(angles), np.sin(angles)


def _llama3_scaling(inv_freq, scaling):
    # transformers' _compute_llama3_parameters: long wavelengths (beyond the original context /
    # low_freq_factor) slow down by `factor`, short ones (under original / high_freq_factor) keep
    # theirs, and the ones between blend the two linearly in original_context / wavelength
    kind = scaling.get("rope_type", scaling.get("type", "llama3"))
    if kind != "llama3":
        raise LlmpyError(f"rope scaling {kind!r} is not supported (only llama3)")
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    # x * (1 / y) where transformers writes x / y: torch evaluates scalar / tensor as
    # tensor.reciprocal() * scalar, which rounds differently in float32
    wavelen = 2 * math.pi * (1 / inv_freq)
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context * (1 / wavelen) - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return np.where(medium, blended, scaled)
