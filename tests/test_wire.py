"""Wire format: round trips, exact sizes, and every kind of bad frame refused with its reason."""

import hashlib
import hmac
import io
import struct
import zlib

import ml_dtypes
import numpy as np
import pytest

from hxtrain.links import wire
from hxtrain.links.wire import FrameError, Kind

SECRET = b"s" * 32
MAX = 1 << 20


def _frame(x=None, **kw):
    x = np.arange(24, dtype=np.float32).reshape(2, 3, 4) if x is None else x
    return wire.encode(Kind.ACTIVATION, x, key=SECRET, step=7, microbatch=3, stage=1, **kw)


@pytest.mark.parametrize(
    "dtype,shape",
    [(np.float32, (2, 3, 4)), (np.float16, (5,)), (ml_dtypes.bfloat16, (3, 2)), (ml_dtypes.float8_e4m3fn, (4, 4)),
     (ml_dtypes.float8_e4m3fnuz, (1, 1, 1, 1, 1, 1, 1, 8)), (np.int8, (0, 3)), (np.int32, ()), (np.uint8, (7,)),
     (np.float64, (2, 2)), (np.bool_, (3,))],
)
def test_roundtrip_dtypes_and_shapes(dtype, shape):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(shape) * 10).astype(dtype)
    buf = wire.encode(Kind.COTANGENT, x, key=SECRET, step=2**40, microbatch=5, stage=3)
    assert len(buf) == wire.frame_size(x.nbytes) == wire.HEADER_SIZE + x.nbytes
    h, y = wire.decode(buf, key=SECRET, max_bytes=MAX)
    assert (h.kind, h.step, h.microbatch, h.stage, h.shape, h.dtype) == (
        Kind.COTANGENT, 2**40, 5, 3, shape, np.dtype(dtype))
    assert h.frame_bytes == len(buf)
    assert y.dtype == np.dtype(dtype) and y.shape == shape and y.flags.writeable
    assert y.tobytes() == np.asarray(x).tobytes()  # bit-exact, NaN patterns included


def test_bytes_payload_extra_and_read_frame_from_stream():
    a = wire.encode(Kind.CONTROL, b"hello", key=SECRET, extra=b"meta")
    b = _frame()
    stream = io.BytesIO(a + b)
    h, p = wire.read_frame(stream, key=SECRET, max_bytes=MAX, timeout=None)
    assert (h.kind, h.dtype, h.extra, p) == (Kind.CONTROL, None, b"meta", b"hello")
    h, y = wire.read_frame(stream, key=SECRET, max_bytes=MAX, timeout=None)
    assert (h.step, h.microbatch, h.stage) == (7, 3, 1) and y.sum() == sum(range(24))
    with pytest.raises(FrameError, match="end of stream between frames") as e:
        wire.read_frame(stream, key=SECRET, max_bytes=MAX, timeout=None)
    assert e.value.reason == "closed"


def _resign(buf: bytes) -> bytes:
    """Recompute CRC and both tags after editing a header field, so only the edited field is wrong."""
    head = bytearray(buf[:78])
    body = buf[wire.HEADER_SIZE:]
    head += struct.pack("!I", zlib.crc32(body, zlib.crc32(bytes(head))))
    head += hmac.new(SECRET, b"body" + bytes(head) + body, hashlib.sha256).digest()
    head += hmac.new(SECRET, b"head" + bytes(head), hashlib.sha256).digest()[:16]
    return bytes(head) + body


def _recrc(buf: bytes) -> bytes:
    """Fix the CRC and the head tag after editing the body, keeping the old body tag, which no longer verifies."""
    body = buf[wire.HEADER_SIZE:]
    head = buf[:78] + struct.pack("!I", zlib.crc32(body, zlib.crc32(buf[:78]))) + buf[82:114]
    return head + hmac.new(SECRET, b"head" + head, hashlib.sha256).digest()[:16] + body


def _bad_frames():
    good = _frame()
    flipped_body = bytearray(good)
    flipped_body[-1] ^= 0x01
    flipped_step = bytearray(good)
    flipped_step[49] ^= 0x01  # low byte of step: header is covered by CRC too
    unknown_dtype = bytearray(good)
    unknown_dtype[8] = 200
    unknown_kind = bytearray(good)
    unknown_kind[6] = 99
    bad_shape = bytearray(good)
    bad_shape[10:14] = struct.pack("!I", 3)  # 3x3x4 float32 != 96 bytes
    return {
        "truncated": (good[:-5], "announces a 96-byte body, got 91"),
        "checksum": (bytes(flipped_body), "CRC32 mismatch"),
        "auth-header": (bytes(flipped_step), "HMAC-SHA256 header tag mismatch"),  # checked before the body
        "auth": (wire.encode(Kind.ACTIVATION, np.ones(3, np.float32), key=b"t" * 32), "header tag mismatch"),
        "auth-body": (_recrc(bytes(flipped_body)), "HMAC-SHA256 tag mismatch"),
        "oversize": (_frame(np.zeros(1000, np.float32)), "exceeds max_bytes=1000"),
        "version": (_frame(version=3), "peer speaks wire format version 3, this side speaks 2"),
        "magic": (b"GET / HTTP/1.1\r\n" + good[16:], "expected magic b'HXTR', got b'GET '"),
        "dtype": (_resign(bytes(unknown_dtype)), "unknown dtype code 200"),
        "kind": (_resign(bytes(unknown_kind)), "unknown message kind 99"),
        "shape": (_resign(bytes(bad_shape)), r"shape \(3, 3, 4\) float32 needs 144 bytes, payload has 96"),
    }


@pytest.mark.parametrize("name", list(_bad_frames()))
def test_bad_frames_refused_with_reason(name):
    buf, message = _bad_frames()[name]
    reason = name.split("-")[0]
    with pytest.raises(FrameError, match=message) as e:
        wire.decode(buf, key=SECRET, max_bytes=1000 if reason == "oversize" else MAX)
    assert e.value.reason == reason
    # same verdict when read from a stream (truncated: the stream ends mid-frame)
    with pytest.raises(FrameError) as e:
        wire.read_frame(io.BytesIO(buf), key=SECRET, max_bytes=1000 if reason == "oversize" else MAX, timeout=1)
    assert e.value.reason == reason
    if reason == "version":
        assert e.value.version == 3


def test_untagged_frames_of_a_tls_link_still_catch_corruption():
    """key=None (a TLS link, which authenticates every byte itself): no tags are written or checked, the CRC
    still refuses a corrupted header or body, and a tagged reader refuses an untagged frame."""
    buf = wire.encode(Kind.ACTIVATION, np.arange(6, dtype=np.float32), key=None, seq=5, step=1)
    assert buf[82:130] == bytes(48)
    h, y = wire.decode(buf, key=None, max_bytes=MAX)
    assert (h.seq, h.step, y.tolist()) == (5, 1, [0, 1, 2, 3, 4, 5])
    for at in (49, len(buf) - 1):  # the step's low byte, the last payload byte
        bad = bytearray(buf)
        bad[at] ^= 1
        with pytest.raises(FrameError, match="CRC32 mismatch"):
            wire.decode(bytes(bad), key=None, max_bytes=MAX)
    with pytest.raises(FrameError, match="header tag mismatch") as e:
        wire.decode(buf, key=SECRET, max_bytes=MAX)
    assert e.value.reason == "auth"


def test_a_forged_header_is_refused_before_its_body_is_read():
    """Nothing is read (or allocated) at the size an unauthenticated header claims."""
    class Reader(io.BytesIO):
        asked = 0

        def read(self, n=-1):
            Reader.asked += n
            return super().read(n)

    forged = wire.encode(Kind.ACTIVATION, np.zeros(1 << 18, np.float32), key=b"t" * 32)
    with pytest.raises(FrameError, match="header tag mismatch"):
        wire.read_frame(Reader(forged), key=SECRET, max_bytes=1 << 30, timeout=None)
    assert Reader.asked == wire.HEADER_SIZE


def test_oversize_is_refused_before_reading_the_body():
    class Reader(io.BytesIO):
        asked = 0

        def read(self, n=-1):
            Reader.asked += n
            return super().read(n)

    r = Reader(_frame(np.zeros(10_000, np.float32)))
    with pytest.raises(FrameError, match="exceeds max_bytes=100") as e:
        wire.read_frame(r, key=SECRET, max_bytes=100, timeout=None)
    assert e.value.reason == "oversize" and Reader.asked == wire.HEADER_SIZE


def test_truncated_header_and_short_secret():
    with pytest.raises(FrameError, match="the header alone needs 130") as e:
        wire.decode(_frame()[:50], key=SECRET, max_bytes=MAX)
    assert e.value.reason == "truncated"
    with pytest.raises(FrameError, match="stream ended after 50 bytes") as e:
        wire.read_frame(io.BytesIO(_frame()[:50]), key=SECRET, max_bytes=MAX, timeout=None)
    assert e.value.reason == "truncated"
    with pytest.raises(ValueError, match=r"key must be None \(TLS link\) or bytes of length >= 16, got 5 bytes"):
        wire.encode(Kind.CONTROL, b"x", key=b"short")


def test_encode_input_errors():
    with pytest.raises(ValueError, match="dtype 'complex64' has no wire code; supported: float32"):
        wire.encode(Kind.ACTIVATION, np.zeros(2, np.complex64), key=SECRET)
    with pytest.raises(ValueError, match="ndim 9; the wire carries at most 8"):
        wire.encode(Kind.ACTIVATION, np.zeros((1,) * 9, np.float32), key=SECRET)
    with pytest.raises(ValueError, match=r"microbatch must be in \[0, 2\*\*32\), got -1"):
        wire.encode(Kind.ACTIVATION, np.zeros(2, np.float32), key=SECRET, microbatch=-1)
    with pytest.raises(ValueError, match="codec=2 needs a pre-encoded bytes payload"):
        wire.encode(Kind.ACTIVATION, np.zeros(2, np.float32), key=SECRET, codec=2)
    with pytest.raises(ValueError, match="99 is not a valid Kind"):
        wire.encode(99, b"", key=SECRET)


def test_big_endian_input_is_sent_little_endian():
    x = np.arange(5, dtype=">i4")
    h, y = wire.decode(wire.encode(Kind.ACTIVATION, x, key=SECRET), key=SECRET, max_bytes=MAX)
    assert h.dtype == np.dtype("<i4") and y.tolist() == [0, 1, 2, 3, 4]


def test_transport_modules_do_not_depend_on_jax():
    """The wire format and the TCP endpoints stay framework-free: links/wire, links/codecs, network/tcp,
    network/handshake, network/tls, network/listener and network/certs import stdlib, numpy, ml_dtypes, cryptography
    (X.509 for the run's certificates) and each other."""
    import ast
    import pathlib
    import sys

    allowed = set(sys.stdlib_module_names) | {"numpy", "ml_dtypes", "hxtrain", "__future__", "cryptography"}
    names = ("links/wire.py", "links/codecs.py", "network/tcp.py", "network/handshake.py", "network/tls.py",
             "network/listener.py", "network/certs.py")
    ours = {"hxtrain." + n[:-3].replace("/", ".") for n in names}
    root = pathlib.Path(wire.__file__).parents[1]
    for name in names:
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
                if node.module in ("hxtrain.links", "hxtrain.network"):
                    mods = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for mod in mods:
                assert mod.split(".")[0] in allowed, f"hxtrain/{name} imports {mod}"
                assert not mod.startswith("hxtrain") or mod in ours, (name, mod)
