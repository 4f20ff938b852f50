"""Update compression: fewer bytes per update for the same delta, chosen per run by the server.

  none  float32, as trained
  fp16  IEEE half precision: 2x fewer bytes; error <= 2^-11 of the value for |x| >= 2^-14 (6.1e-5),
        at most 2^-25 (3e-8) below, where half precision is subnormal; a value beyond +-65504
        becomes infinity, which the server refuses as non_finite
  int8  per-tensor symmetric 8 bits with stochastic rounding (QSGD-style, Alistarh et al. 2017,
        with 127 levels each side): 4x fewer bytes; unbiased, error < one level (max|x| / 127)

Only floating-point arrays are compressed; any other array travels as it is. An int8 array `name`
travels with its scale, a float32 array of one value named SCALE_PREFIX + name. The server knows the run's
scheme (it sends it in every TrainRequest), so wire_spec() says exactly which names, shapes and
dtypes an update must have, and decompress() turns a checked update back into float32 deltas.
The model the server sends stays float32: compression is for the upload, the many-to-one side.
"""
from __future__ import annotations

import math

import numpy as np

COMPRESSIONS = ("none", "fp16", "int8")
SCALE_PREFIX = "__scale__/"  # no state_dict name starts with "__"
LEVELS = 127                 # int8 values used: -127..127 (symmetric, so -128 is never sent)

Spec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, numpy dtype str), as app/verify.py's


def _is_float(dtype_str: str) -> bool:
    return np.dtype(dtype_str).kind == "f"


def check_scheme(scheme: str) -> None:
    if scheme not in COMPRESSIONS:
        raise ValueError(f"unknown compression {scheme!r}; choose one of {', '.join(COMPRESSIONS)}")


def compress(delta: dict[str, np.ndarray], scheme: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The arrays to send for `delta` under `scheme` (names in delta's order, scales after their arrays)."""
    check_scheme(scheme)
    if scheme == "none":
        return delta
    import torch  # here, not at the top: the config checks import this module, and --help should not load torch
    out: dict[str, np.ndarray] = {}
    for name, x in delta.items():
        if not _is_float(x.dtype.str):
            out[name] = x
        elif scheme == "fp16":
            out[name] = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).half().numpy()  # ~25x numpy's cast
        else:
            out[name], out[SCALE_PREFIX + name] = quantize_int8(x, rng)
    return out


def quantize_int8(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(q, [scale]) with x ~ q * scale: q = floor(x / scale + u), u uniform on 256 steps of [0, 1).

    E[q * scale] = x up to 1/512 of a level. The noise is one random byte per value, cut from 64-bit
    draws (8 values per draw), and the float passes run in torch: about half the CPU of numpy's
    per-value byte draws and float passes, which matters when ten clients quantise on two cores.
    """
    import torch
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    lo, hi = (float(v) for v in torch.aminmax(t)) if t.numel() else (0.0, 0.0)  # one pass, no |x| copy
    peak = max(-lo, hi)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        scale = np.float32(np.nan)  # NaN or inf in x: the scale says so and the server refuses it (non_finite)
    else:
        scale = np.float32(peak / LEVELS if peak > 0 else 1.0)
    words = rng.integers(0, 2**64, size=-(-t.numel() // 8), dtype=np.uint64)
    noise = torch.from_numpy(words.view(np.uint8)[:t.numel()]).reshape(t.shape)
    v = noise.to(torch.float32).mul_(1 / 256).add_(1 / 512).add_(t, alpha=float(np.float32(1) / scale))
    q = v.floor_().clamp_(-LEVELS, LEVELS).to(torch.int8)  # NaN (a NaN scale) casts to some int8: refused anyway
    return q.numpy(), np.array([scale], dtype=np.float32)


def wire_spec(spec: Spec, scheme: str) -> Spec:
    """The names, shapes and dtypes an update compressed with `scheme` carries, for a model of `spec`."""
    check_scheme(scheme)
    if scheme == "none":
        return dict(spec)
    out: Spec = {}
    for name, (shape, dtype) in spec.items():
        if not _is_float(dtype):
            out[name] = (shape, dtype)
        elif scheme == "fp16":
            out[name] = (shape, np.dtype(np.float16).str)
        else:
            out[name] = (shape, np.dtype(np.int8).str)
            out[SCALE_PREFIX + name] = ((1,), np.dtype(np.float32).str)
    return out


def decompress(arrays: dict[str, np.ndarray], scheme: str, spec: Spec) -> dict[str, np.ndarray]:
    """Float deltas in the model's dtypes and order from arrays that match wire_spec(spec, scheme)."""
    check_scheme(scheme)
    if scheme == "none":
        return arrays
    import torch
    out: dict[str, np.ndarray] = {}
    for name, (_, dtype) in spec.items():
        a = arrays[name]
        if not _is_float(dtype):
            out[name] = a
        elif scheme == "fp16":
            out[name] = torch.from_numpy(a).float().numpy() if dtype == "<f4" else a.astype(dtype)  # torch: ~10x faster
        else:
            out[name] = a.astype(dtype) * arrays[SCALE_PREFIX + name].astype(dtype)[0]
    return out
