"""Update compression: fewer bytes per update for the same delta, chosen per run by the server.

  none  float32, as trained
  fp16  IEEE half precision: 2x fewer bytes; error <= 2^-11 of the value for |x| >= 2^-14 (6.1e-5),
        at most 2^-25 (3e-8) below, where half precision is subnormal; a value beyond +-65504
        becomes infinity, which the server refuses as non_finite
  int8  per-tensor symmetric 8 bits with stochastic rounding (QSGD-style, Alistarh et al. 2017,
        with 127 levels each side): 4x fewer bytes; unbiased, error < one level (max|x| / 127)
  topk  per tensor, the k = ceil(topk_ratio * size) largest values by magnitude (float32) and their
        indices, sorted and delta-coded as LEB128 varints (1 byte for a gap below 128). Each tensor sends
        at least MIN_SENT values, and a tensor whose k is half its values or more travels whole, without
        indices (cheaper than indices): biases, a first convolution and a last layer go whole, a second
        convolution sends 8% (the McMahan CNN); their few values steer the model most per byte
        (bench/RESULTS.md, Communication). Lossy: the client keeps what it did not send and adds it to its
        next delta (error feedback, client/feedback.py; Lin et al. 2018, "Deep Gradient Compression")
  topk+int8  the same, with the k values quantised as int8: about 1.9 bytes per value sent in all (26,691 for
        the McMahan CNN at ratio 0.01: 51.5 KB, 0.77% of float32's bytes, 129x; bench/RESULTS.md, Communication)

Only floating-point arrays are compressed; any other array travels as it is. An int8 array `name`
travels with its scale, a float32 array of one value named SCALE_PREFIX + name. A top-k array `name` holds
the k values, and INDEX_PREFIX + name their index stream (uint8, k to 5k bytes; none for a tensor sent
whole). The server knows the run's scheme (it sends it in every TrainRequest), so wire_spec() says exactly
which names, shapes and dtypes an update must have, and decompress() turns a checked update back into
float32 deltas.
The model the server sends is float32. With `download_compression int8` the server makes each new global model
the previous one plus an int8-coded step (app/downlink.py), so a client that holds the previous model gets the
new one exactly from that step (apply_step), deflated: about 6x fewer bytes than the model.
"""
from __future__ import annotations

import math
import zlib

import numpy as np

COMPRESSIONS = ("none", "fp16", "int8", "topk", "topk+int8")
SPARSE = ("topk", "topk+int8")
SCALE_PREFIX = "__scale__/"  # no state_dict name starts with "__"
INDEX_PREFIX = "__index__/"
DEFAULT_RATIO = 0.01
DOWNLINK = "int8"           # how a delta-coded download's step is coded (app/downlink.py)
MIN_SENT = 4096             # top-k sends at least this many values of a tensor (all of a smaller one)
VARINT_MAX = 5              # bytes of one LEB128 varint of a uint32 gap
LEVELS = 127                 # int8 values used: -127..127 (symmetric, so -128 is never sent)

Spec = dict[str, tuple[tuple[int, ...], str]]  # name -> (shape, numpy dtype str), as app/verify.py's


def _is_float(dtype_str: str) -> bool:
    return np.dtype(dtype_str).kind == "f"


def check_scheme(scheme: str) -> None:
    if scheme not in COMPRESSIONS:
        raise ValueError(f"unknown compression {scheme!r}; choose one of {', '.join(COMPRESSIONS)}")


def topk_count(size: int, ratio: float) -> int:
    """k of a tensor of `size` values at `ratio`: at least MIN_SENT values, and all of them once k would be half
    the tensor or more. A tensor whose k is its size travels whole, in order, with no index stream."""
    k = max(math.ceil(ratio * size), MIN_SENT)
    return size if 2 * k >= size else k


def compress(delta: dict[str, np.ndarray], scheme: str, rng: np.random.Generator,
             ratio: float = DEFAULT_RATIO) -> dict[str, np.ndarray]:
    """The arrays to send for `delta` under `scheme` (names in delta's order, scales and index streams after
    their arrays); `ratio` is topk's share of values sent."""
    check_scheme(scheme)
    if scheme == "none":
        return delta
    if scheme in SPARSE:
        return _compress_topk(delta, scheme, rng, ratio)
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


def _compress_topk(delta: dict[str, np.ndarray], scheme: str, rng: np.random.Generator,
                   ratio: float) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, x in delta.items():
        if not _is_float(x.dtype.str):
            out[name] = x
            continue
        flat = np.ascontiguousarray(x, dtype=np.float32).ravel()
        k = topk_count(flat.size, ratio)
        index = None
        if k < flat.size:
            index = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:])
        values = flat if index is None else flat[index]
        if scheme == "topk+int8":
            out[name], out[SCALE_PREFIX + name] = quantize_int8(values, rng)
        else:
            out[name] = values
        if index is not None:
            out[INDEX_PREFIX + name] = encode_indices(index)
    return out


def encode_indices(index: np.ndarray) -> np.ndarray:
    """Sorted, distinct indices as LEB128 varints of their gaps (the first gap is the first index): uint8."""
    gaps = np.diff(index.astype(np.int64), prepend=0).astype(np.uint64)
    size = np.ones(gaps.size, np.int64)
    for shift in (7, 14, 21, 28):
        size += gaps >= (1 << shift)
    out = np.empty(int(size.sum()), np.uint8)
    start = np.cumsum(size) - size
    for j in range(VARINT_MAX):
        has = size > j
        more = (size[has] > j + 1).astype(np.uint64) << np.uint64(7)
        out[start[has] + j] = ((gaps[has] >> np.uint64(7 * j)) & np.uint64(0x7F)) | more
    return out


def decode_indices(stream: np.ndarray, count: int, size: int) -> np.ndarray:
    """The `count` indices of a varint stream, each in 0..size-1, strictly increasing; ValueError saying what is
    wrong otherwise (a sender's stream is untrusted: the server refuses it with that reason)."""
    stream = np.asarray(stream, np.uint8)
    ends = np.flatnonzero(stream < 0x80)  # the last byte of each varint has no continuation bit
    if ends.size != count or (stream.size and stream[-1] >= 0x80):
        raise ValueError(f"the index stream holds {ends.size} indices, not the {count} values sent")
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts + 1
    if count and lengths.max() > VARINT_MAX:
        raise ValueError("an index gap is longer than 5 bytes")
    position = np.arange(stream.size) - np.repeat(starts, lengths)
    parts = (stream & np.uint8(0x7F)).astype(np.uint64) << (np.uint64(7) * position.astype(np.uint64))
    gaps = np.add.reduceat(parts, starts) if count else np.zeros(0, np.uint64)
    if count and (gaps[1:] == 0).any():
        raise ValueError("indices repeat (a gap of 0)")
    index = np.cumsum(gaps, dtype=np.uint64)
    if count and (gaps >= (1 << 32)).any() or (count and index[-1] >= size):
        raise ValueError(f"an index is out of range 0..{size - 1}")
    return index.astype(np.int64)


def wire_spec(spec: Spec, scheme: str, ratio: float = DEFAULT_RATIO) -> Spec:
    """The names, shapes and dtypes an update compressed with `scheme` carries, for a model of `spec`. A top-k
    index stream's length varies (k to 5k bytes): its shape here is (k,), the least it can be."""
    check_scheme(scheme)
    if scheme == "none":
        return dict(spec)
    out: Spec = {}
    for name, (shape, dtype) in spec.items():
        if not _is_float(dtype):
            out[name] = (shape, dtype)
        elif scheme in SPARSE:
            k = topk_count(math.prod(shape), ratio)
            out[name] = ((k,), np.dtype(np.int8 if scheme == "topk+int8" else np.float32).str)
            if scheme == "topk+int8":
                out[SCALE_PREFIX + name] = ((1,), np.dtype(np.float32).str)
            if k < math.prod(shape):
                out[INDEX_PREFIX + name] = ((k,), np.dtype(np.uint8).str)
        elif scheme == "fp16":
            out[name] = (shape, np.dtype(np.float16).str)
        else:
            out[name] = (shape, np.dtype(np.int8).str)
            out[SCALE_PREFIX + name] = ((1,), np.dtype(np.float32).str)
    return out


def decompress(arrays: dict[str, np.ndarray], scheme: str, spec: Spec) -> dict[str, np.ndarray]:
    """Float deltas in the model's dtypes and order from arrays that match wire_spec(spec, scheme); ValueError
    for a top-k index stream that does not decode to its values' count of sorted, distinct, in-range indices."""
    check_scheme(scheme)
    if scheme == "none":
        return arrays
    if scheme in SPARSE:
        return _densify(arrays, scheme, spec)
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


def _densify(arrays: dict[str, np.ndarray], scheme: str, spec: Spec) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, (shape, dtype) in spec.items():
        if not _is_float(dtype):
            out[name] = arrays[name]
            continue
        values = arrays[name]
        if scheme == "topk+int8":
            values = values.astype(np.float32) * arrays[SCALE_PREFIX + name].astype(np.float32)[0]
        size = math.prod(shape)
        if INDEX_PREFIX + name not in arrays:  # sent whole (wire_spec says which: k == size)
            out[name] = values.reshape(shape).astype(dtype, copy=False)
            continue
        try:
            index = decode_indices(arrays[INDEX_PREFIX + name], values.size, size)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        dense = np.zeros(size, np.float32)
        dense[index] = values
        out[name] = dense.reshape(shape).astype(dtype, copy=False)
    return out


def inflate(body: bytes, limit: int) -> bytes:
    """A delta-coded download's step (zlib) back to its safetensors bytes; ValueError past `limit` bytes (a zip
    bomb) or for bytes that are not one whole zlib stream."""
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, limit)
    except zlib.error as exc:
        raise ValueError(f"the step is not zlib: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
        raise ValueError(f"the step inflates past {limit} bytes, or is cut or followed by other bytes")
    return data


def apply_step(base: dict[str, np.ndarray], arrays: dict[str, np.ndarray], scheme: str) -> dict[str, np.ndarray]:
    """base + the delta `arrays` encode (as compress(..., scheme) made them), in base's order and dtypes. The server
    makes a delta-coded model with the same addition (add_step), so the client's result is bit for bit the server's."""
    return add_step(base, decompress(arrays, scheme, {k: (tuple(v.shape), v.dtype.str) for k, v in base.items()}))


def add_step(base: dict[str, np.ndarray], step: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """base + a decoded step, in base's dtypes: the one addition both the server and its clients make."""
    return {k: (v + step[k]).astype(v.dtype, copy=False) for k, v in base.items()}
