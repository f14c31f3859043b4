"""llm.c's model file: a 256 x int32 header (magic 20240326), then the 16 tensors in the
layout's order (model/layout.py), as float32 (version 3) or bfloat16 (version 5)."""
import numpy as np

from ..errors import LlmpyError
from ..model.layout import GPT2_LAYOUT, GPT2Config
from .files import HEADER_BYTES, atomic_write, file_size, make_header, read_header

MODEL_MAGIC = 20240326
FP32, BF16 = 3, 5


def num_params(cfg):
    return GPT2_LAYOUT.num_params(cfg)


def bf16_to_fp32(u16):
    """bfloat16 bits (uint16) -> float32: bf16 is the top half of an fp32."""
    return (u16.astype(np.uint32) << 16).view(np.float32)


def fp32_to_bf16(f32):
    """float32 -> bfloat16 bits (uint16), rounding to nearest even as torch does. A NaN becomes
    torch's quiet NaN, 0x7FC0: the rounding's carry would turn some NaNs into inf or 0."""
    f32 = np.ascontiguousarray(f32, dtype=np.float32)
    u = f32.view(np.uint32)
    rounded = u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))
    return np.where(np.isnan(f32), np.uint16(0x7FC0), (rounded >> 16).astype(np.uint16))


def read_model(path):
    """Returns (GPT2Config, params) with params a flat float32 array in llm.c's layout."""
    h = read_header(path, MODEL_MAGIC, (FP32, BF16), "model")
    maxT, V, L, NH, C, Vp = (int(x) for x in h[2:8])
    try:
        cfg = GPT2Config(max_seq_len=maxT, vocab_size=V, padded_vocab_size=Vp,
                         num_layers=L, num_heads=NH, channels=C)
    except ValueError as e:
        raise LlmpyError(f"{path}: inconsistent model header: {e}") from None
    n = num_params(cfg)
    itemsize = 4 if h[1] == FP32 else 2
    expected = HEADER_BYTES + n * itemsize
    size = file_size(path)
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise LlmpyError(f"{path}: model file {what}: {size} bytes, expected {expected} for "
                         f"L={L} NH={NH} C={C} V={V} Vp={Vp} maxT={maxT}")
    if h[1] == FP32:
        params = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES, count=n)
    else:
        params = bf16_to_fp32(np.fromfile(path, dtype="<u2", offset=HEADER_BYTES, count=n))
    return cfg, params


def write_model(path, cfg, params, version=FP32):
    """Write flat float32 params (llm.c layout) as an llm.c model file, atomically."""
    params = np.asarray(params, dtype=np.float32).ravel()
    if params.size != num_params(cfg):
        raise LlmpyError(f"{path}: {params.size} parameters do not match the config's "
                         f"{num_params(cfg)}")
    header = make_header(MODEL_MAGIC, version, cfg.max_seq_len, cfg.vocab_size, cfg.num_layers,
                         cfg.num_heads, cfg.channels, cfg.padded_vocab_size)
    body = params.astype("<f4") if version == FP32 else fp32_to_bf16(params).astype("<u2")
    atomic_write(path, [header, body])
