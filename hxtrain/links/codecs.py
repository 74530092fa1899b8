"""Compression codecs for tensors crossing a site boundary (numpy in, bytes out; no JAX).

A codec turns an array of shape S and dtype D into a payload whose layout it alone defines, and back into an array
of shape S and dtype D. The wire header carries S, D and the codec id, so the receiver needs no negotiation.

| name | id | payload layout (little-endian)                                  | bytes for N fp32 values in R rows |
| ---- | -- | --------------------------------------------------------------- | --------------------------------- |
| none | 0  | the raw tensor, C order                                         | 4 N                               |
| bf16 | 1  | bfloat16 values (round to nearest even)                         | 2 N                               |
| int8 | 2  | R fp32 scales, then N int8 values (symmetric, scale = max|row|/127) | N + 4 R                       |
| fp8  | 3  | R fp32 scales, then N float8_e4m3fn values (scale = max|row|/448)   | N + 4 R                       |
| fp8  | 4  | same with float8_e4m3fnuz (AMD MI300; scale = max|row|/240)         | N + 4 R                       |

A "row" is the last axis: an array of shape (B, T, D) has R = B*T rows of D values (a 0-d array is one row of one).

Non-finite values: `none` and `bf16` carry NaN/inf through unchanged. `int8` and `fp8` refuse them with a
ValueError: their scale would become NaN/inf and poison the whole row, and a NaN activation means the run has
already diverged, which should stop it loudly rather than be compressed.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

# The codec names, the one list of them (topology, backends and planner import it). Least lossy first: the
# planner ranks codecs in this order and breaks ties toward the earlier one.
CODEC_NAMES = ("none", "bf16", "int8", "fp8")
FP8_FORMATS = {"e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn), "e4m3fnuz": np.dtype(ml_dtypes.float8_e4m3fnuz)}
_FLOATS = tuple(np.dtype(d) for d in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16))
_SCALE = np.dtype("<f4")
# float32 arithmetic on the scale (x/scale, q*scale) adds a few ulp on top of each codec's rounding.
_F32_SLACK = 2.0**-21


@dataclass(frozen=True)
class ErrorBound:
    """|decode(encode(x)) - x| <= rel * |x| + row_abs * max|row of x| elementwise, for finite x in the normal
    range of float32 (|x| >= 2**-100 or x == 0); bf16 also needs |x| <= 3.38e38 (larger values round to inf)."""

    rel: float
    row_abs: float

    def max_error(self, x: np.ndarray) -> np.ndarray:
        """Elementwise allowed error for x (float64, same shape as x)."""
        a = np.abs(np.asarray(x, dtype=np.float64))
        rowmax = a.max(axis=-1, keepdims=True, initial=0.0) if a.ndim else a
        return (self.rel + _F32_SLACK) * a + self.row_abs * (1 + _F32_SLACK) * rowmax


@dataclass(frozen=True)
class Codec:
    """Base class; use `get_codec(name)`. Subclasses define `_encode`, `_decode`, `_payload_bytes`."""

    name: str
    id: int

    def encode(self, x: np.ndarray) -> bytes:
        """Payload bytes for array x of any shape."""
        return self._encode(np.asarray(x))

    def decode(self, payload: bytes, shape: tuple[int, ...], dtype) -> np.ndarray:
        """The array of `shape` and `dtype` (the original ones) from a payload made by `encode`."""
        dtype, shape = np.dtype(dtype), tuple(shape)
        want = self.wire_bytes(shape, dtype)
        if len(payload) != want:
            raise ValueError(
                f"codec {self.name!r}: payload for shape {shape} {dtype.name} must be {want} bytes, "
                f"got {len(payload)}"
            )
        return self._decode(payload, shape, dtype)

    def wire_bytes(self, shape: tuple[int, ...], dtype) -> int:
        """Exact payload bytes `encode` produces for an array of this shape and dtype (header not included)."""
        return self._payload_bytes(tuple(shape), np.dtype(dtype))

    def error_bound(self) -> ErrorBound:
        raise NotImplementedError


def _rows(shape: tuple[int, ...]) -> tuple[int, int]:
    """(rows, row length) of the last-axis view of `shape`; a 0-d array is one row of one value."""
    if not shape:
        return 1, 1
    return int(np.prod(shape[:-1], dtype=np.int64)), int(shape[-1])


def _need_float(codec: str, dtype: np.dtype) -> None:
    if dtype not in _FLOATS:
        raise ValueError(
            f"codec {codec!r} compresses floating arrays ({', '.join(d.name for d in _FLOATS)}), "
            f"got {dtype.name}; send it with codec 'none'"
        )


def _need_finite(codec: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(
            f"codec {codec!r}: array of shape {x.shape} has {int(bad.sum())} NaN/inf values (first at index "
            f"{first}); a non-finite activation means the run has already diverged: stop it and check the loss"
        )


@dataclass(frozen=True)
class _NoneCodec(Codec):
    def _encode(self, x):
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("<")).tobytes()

    def _decode(self, payload, shape, dtype):
        return np.frombuffer(payload, dtype.newbyteorder("<")).astype(dtype).reshape(shape)

    def _payload_bytes(self, shape, dtype):
        return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

    def error_bound(self):
        return ErrorBound(0.0, 0.0)


@dataclass(frozen=True)
class _Bf16Codec(Codec):
    def _encode(self, x):
        _need_float(self.name, x.dtype)
        # via float32: ml_dtypes rounds float32 -> bfloat16 to nearest even; float16/float64 go through it exactly
        # (float16 -> float32 is exact; float64 -> float32 -> bf16 double rounding stays within the bound).
        return np.ascontiguousarray(x, dtype=np.float32).astype(ml_dtypes.bfloat16).tobytes()

    def _decode(self, payload, shape, dtype):
        return np.frombuffer(payload, ml_dtypes.bfloat16).astype(dtype).reshape(shape)

    def _payload_bytes(self, shape, dtype):
        _need_float(self.name, dtype)
        return int(np.prod(shape, dtype=np.int64)) * 2

    def error_bound(self):
        return ErrorBound(2.0**-8, 0.0)  # 8 significand bits, round to nearest


@dataclass(frozen=True)
class _ScaledCodec(Codec):
    """Symmetric per-row scale: q = x / scale with scale = max|row| / qmax; payload = scales then q."""

    qdtype: np.dtype = np.dtype(np.int8)
    qmax: float = 127.0

    def _quantize(self, y: np.ndarray) -> np.ndarray:  # y already in [-qmax, qmax]
        return np.rint(y).astype(np.int8)

    def _encode(self, x):
        _need_float(self.name, x.dtype)
        _need_finite(self.name, x)
        rows, n = _rows(x.shape)
        if x.size and float(np.abs(x).max()) > float(np.finfo(np.float32).max):  # scales are fp32
            raise ValueError(f"codec {self.name!r}: values exceed the float32 range; use codec 'none'")
        x2 = np.asarray(x, dtype=np.float32).reshape(rows, n)  # [R, D]
        amax = np.abs(x2).max(axis=1, keepdims=True, initial=0.0)  # [R, 1]
        scale = (amax / np.float32(self.qmax)).astype(np.float32)  # [R, 1]; 0 for an all-zero row
        safe = np.where(scale > 0, scale, np.float32(1.0))  # all-zero (or underflowed) rows quantize to 0
        y = np.clip(x2 / safe, -self.qmax, self.qmax) * (scale > 0)
        return scale.astype(_SCALE).tobytes() + self._quantize(y).tobytes()

    def _decode(self, payload, shape, dtype):
        rows, n = _rows(shape)
        scale = np.frombuffer(payload, _SCALE, count=rows).reshape(rows, 1)  # [R, 1]
        q = np.frombuffer(payload, self.qdtype, offset=4 * rows).reshape(rows, n)  # [R, D]
        return (q.astype(np.float32) * scale).astype(dtype).reshape(shape)

    def _payload_bytes(self, shape, dtype):
        _need_float(self.name, dtype)
        rows, n = _rows(shape)
        return 4 * rows + rows * n

    def error_bound(self):
        return ErrorBound(0.0, 0.5 / self.qmax)  # half a quantization step, step = max|row| / 127


@dataclass(frozen=True)
class _Fp8Codec(_ScaledCodec):
    fp8_format: str = "e4m3fn"

    def _quantize(self, y):
        return y.astype(self.qdtype)  # ml_dtypes: round to nearest even; y is clipped so it cannot overflow to NaN

    def error_bound(self):
        # 4 significand bits -> relative 2**-4; below the smallest normal, half a subnormal step (in scaled units).
        half_sub = float(ml_dtypes.finfo(self.qdtype).smallest_subnormal) / 2
        return ErrorBound(2.0**-4, half_sub / self.qmax)


def _make(name: str, fp8_format: str) -> Codec:
    if name == "none":
        return _NoneCodec("none", 0)
    if name == "bf16":
        return _Bf16Codec("bf16", 1)
    if name == "int8":
        return _ScaledCodec("int8", 2)
    if name == "fp8":
        if fp8_format not in FP8_FORMATS:
            raise ValueError(
                f"fp8_format must be one of {sorted(FP8_FORMATS)} (e4m3fn: NVIDIA and CPU, e4m3fnuz: AMD MI300), "
                f"got {fp8_format!r}"
            )
        qdtype = FP8_FORMATS[fp8_format]
        qmax = float(ml_dtypes.finfo(qdtype).max)
        return _Fp8Codec("fp8", 3 if fp8_format == "e4m3fn" else 4, qdtype, qmax, fp8_format)
    raise ValueError(f"unknown codec {name!r}; choose one of {list(CODEC_NAMES)}")


def get_codec(name: str, *, fp8_format: str = "e4m3fn") -> Codec:
    """The codec called `name` ('none', 'bf16', 'int8', 'fp8'); `fp8_format` picks the fp8 variant."""
    return _make(name, fp8_format)


def codec_by_id(codec_id: int) -> Codec:
    """The codec a frame header names by id (0..4); ValueError for an unknown id."""
    table = {0: ("none", "e4m3fn"), 1: ("bf16", "e4m3fn"), 2: ("int8", "e4m3fn"), 3: ("fp8", "e4m3fn"),
             4: ("fp8", "e4m3fnuz")}
    if codec_id not in table:
        raise ValueError(f"unknown codec id {codec_id}; known ids: {sorted(table)}")
    name, fmt = table[codec_id]
    return _make(name, fmt)


def roundtrip_error_bound(name: str, *, fp8_format: str = "e4m3fn") -> ErrorBound:
    """The documented round-trip error of a codec: |x̂ - x| <= rel*|x| + row_abs*max|row| (see ErrorBound).

    none: exact. bf16: rel 2**-8. int8: row_abs 1/254 (half a step of max|row|/127). fp8 e4m3fn: rel 2**-4,
    row_abs 2**-10/448; e4m3fnuz: rel 2**-4, row_abs 2**-11/240.
    """
    return _make(name, fp8_format).error_bound()
