"""Boundary codecs: error within the documented bound, exact byte counts, non-finite policy, errors."""

import ml_dtypes
import numpy as np
import pytest

from hxtrain import backends
from hxtrain.planning import costmodel
from hxtrain.config import checks as topology_checks
from hxtrain.links.codecs import CODEC_NAMES, codec_by_id, get_codec, roundtrip_error_bound

CODECS = [("none", "e4m3fn"), ("bf16", "e4m3fn"), ("int8", "e4m3fn"), ("fp8", "e4m3fn"), ("fp8", "e4m3fnuz")]


def _data(rng, shape):
    """Random rows spanning 1e-30..1e30 in magnitude (per row and within rows), signs mixed, an all-zero row."""
    rows = int(np.prod(shape[:-1]))
    x = rng.standard_normal((rows, shape[-1])) * 10.0 ** rng.uniform(-30, 30, size=(rows, 1))  # [R, D]
    x *= 10.0 ** rng.uniform(-3, 3, size=x.shape)  # values far below the row max exercise fp8 subnormals
    x[:, ::5] = 0.0
    x[-1] = -np.abs(x[-1])
    if rows > 1:
        x[0] = 0.0
    return x.astype(np.float32).reshape(shape)


@pytest.mark.parametrize("name,fmt", CODECS)
@pytest.mark.parametrize("shape", [(6, 33), (2, 3, 16), (40,)])
def test_roundtrip_within_documented_bound(name, fmt, shape):
    codec, bound = get_codec(name, fp8_format=fmt), roundtrip_error_bound(name, fp8_format=fmt)
    x = _data(np.random.default_rng(len(shape) * 7 + len(name)), shape)
    payload = codec.encode(x)
    assert len(payload) == codec.wire_bytes(x.shape, x.dtype)
    y = codec.decode(payload, x.shape, x.dtype)
    assert y.dtype == x.dtype and y.shape == x.shape
    err = np.abs(y.astype(np.float64) - x)
    allowed = bound.max_error(x)
    worst = np.unravel_index(np.argmax(err - allowed), x.shape)
    assert (err <= allowed).all(), f"{name}: at {worst} x={x[worst]} y={y[worst]} err={err[worst]} > {allowed[worst]}"
    assert (y[x == 0] == 0).all()  # zeros (and all-zero rows) stay exactly zero
    if name == "none":
        assert y.tobytes() == x.tobytes()
    else:  # the bound is not vacuous: the lossy codecs do change the data, by less than the bound
        assert err.max() > 0


def test_bounds_are_the_documented_numbers():
    assert roundtrip_error_bound("none").rel == 0 and roundtrip_error_bound("none").row_abs == 0
    assert roundtrip_error_bound("bf16").rel == 2.0**-8
    assert roundtrip_error_bound("int8").row_abs == 1 / 254
    assert roundtrip_error_bound("fp8").rel == 2.0**-4
    assert roundtrip_error_bound("fp8").row_abs == 2.0**-10 / 448
    assert roundtrip_error_bound("fp8", fp8_format="e4m3fnuz").row_abs == 2.0**-11 / 240


def test_int8_error_reaches_but_never_exceeds_half_a_step():
    # a row of max 127 has step 1: values at k + 0.5 - tiny round to k, error just under 0.5 = 127/254
    x = np.array([[127.0, 0.49, -3.49, 10.25]], np.float32)
    c = get_codec("int8")
    y = c.decode(c.encode(x), x.shape, x.dtype)
    np.testing.assert_allclose(y, [[127, 0, -3, 10]])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_other_float_dtypes_come_back_as_themselves(dtype):
    x = np.linspace(-4, 4, 24).reshape(4, 6).astype(dtype)
    for name in ("bf16", "int8", "fp8"):
        c = get_codec(name)
        y = c.decode(c.encode(x), x.shape, x.dtype)
        assert y.dtype == np.dtype(dtype)
        np.testing.assert_array_less(np.abs(y.astype(np.float64) - x.astype(np.float64)), 0.3)


@pytest.mark.parametrize("shape", [(8, 16), (2, 3, 5), (7,), (), (3, 0)])
def test_exact_byte_counts(shape):
    x = np.ones(shape, np.float32)
    n = x.size
    rows = int(np.prod(shape[:-1])) if shape else 1
    sizes = {name: len(get_codec(name).encode(x)) for name in ("none", "bf16", "int8", "fp8")}
    assert sizes["none"] == 4 * n
    assert sizes["bf16"] == 2 * n  # half of fp32
    assert sizes["int8"] == n + 4 * rows  # a quarter of fp32 + one fp32 scale per row
    assert sizes["fp8"] == n + 4 * rows
    for name, size in sizes.items():
        assert get_codec(name).wire_bytes(shape, np.float32) == size


def test_fp8_variants_differ_and_use_their_range():
    x = np.array([[1.0, -0.5, 2.0**-12, 0.0]], np.float32)
    fn, fnuz = get_codec("fp8", fp8_format="e4m3fn"), get_codec("fp8", fp8_format="e4m3fnuz")
    assert (fn.id, fnuz.id) == (3, 4)
    pn, pz = fn.encode(x), fnuz.encode(x)
    assert np.frombuffer(pn[:4], "<f4")[0] == np.float32(1 / 448)  # scale maps the row max onto the format max
    assert np.frombuffer(pz[:4], "<f4")[0] == np.float32(1 / 240)
    assert np.frombuffer(pn[4:5], ml_dtypes.float8_e4m3fn)[0] == 448
    assert np.frombuffer(pz[4:5], ml_dtypes.float8_e4m3fnuz)[0] == 240
    assert 0x80 not in pz[4:]  # 0x80 is NaN in e4m3fnuz: never emitted for finite data


def test_non_finite_values():
    x = np.array([[1.0, np.nan, -np.inf, np.inf]], np.float32)
    for name in ("none", "bf16"):  # carried through unchanged
        c = get_codec(name)
        y = c.decode(c.encode(x), x.shape, x.dtype)
        assert np.isnan(y[0, 1]) and y[0, 2] == -np.inf and y[0, 3] == np.inf and y[0, 0] == 1
    for name in ("int8", "fp8"):  # refused: a NaN activation means the run already diverged
        with pytest.raises(ValueError, match=rf"codec '{name}': array of shape \(1, 4\) has 3 NaN/inf values "
                                             r"\(first at index \(0, 1\)\).*already diverged"):
            get_codec(name).encode(x)


def test_one_list_of_codec_names():
    """Every module takes its codec names from codecs.CODEC_NAMES (least lossy first), and the cost model prices
    exactly those codecs."""
    assert CODEC_NAMES == ("none", "bf16", "int8", "fp8")
    assert backends.CODECS is CODEC_NAMES and topology_checks.CODEC_NAMES is CODEC_NAMES
    assert tuple(costmodel.CODEC_BYTES) == CODEC_NAMES
    assert {codec_by_id(i).name for i in range(5)} == set(CODEC_NAMES)


def test_errors():
    with pytest.raises(ValueError, match=r"unknown codec 'zstd'; choose one of \['none', 'bf16', 'int8', 'fp8'\]"):
        get_codec("zstd")
    with pytest.raises(ValueError, match=r"fp8_format must be one of \['e4m3fn', 'e4m3fnuz'\].*got 'e5m2'"):
        get_codec("fp8", fp8_format="e5m2")
    with pytest.raises(ValueError, match="codec 'int8' compresses floating arrays .* got int32; send it with codec"):
        get_codec("int8").encode(np.ones((2, 2), np.int32))
    with pytest.raises(ValueError, match=r"codec 'bf16': payload for shape \(2, 2\) float32 must be 8 bytes, got 7"):
        get_codec("bf16").decode(b"\0" * 7, (2, 2), np.float32)
    with pytest.raises(ValueError, match="values exceed the float32 range"):
        get_codec("int8").encode(np.array([1e300], np.float64))
    with pytest.raises(ValueError, match=r"unknown codec id 9; known ids: \[0, 1, 2, 3, 4\]"):
        codec_by_id(9)
    assert codec_by_id(4) == get_codec("fp8", fp8_format="e4m3fnuz")
    assert all(codec_by_id(get_codec(n, fp8_format=f).id) == get_codec(n, fp8_format=f) for n, f in CODECS)
