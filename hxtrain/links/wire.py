"""hxtrain's wire format: one frame = a fixed 130-byte header + `extra` bytes + payload.

The format depends on numpy (and ml_dtypes for bfloat16 / float8) only, never on JAX, so that a site could one day
run another framework. All integers are big-endian (network order); tensor bytes are little-endian, C order.

    offset  size  field
    0       4     magic b"HXTR"
    4       2     format version (u16), FORMAT_VERSION = 2
    6       1     kind (u8, `Kind`)
    7       1     codec id (u8; 0 = raw tensor bytes, others are defined by `hxtrain.links.codecs`)
    8       1     dtype code (u8, `DTYPE_CODES`; 0 = opaque bytes)
    9       1     ndim (u8, <= 8)
    10      32    shape, 8 x u32 (unused dims are 0)
    42      8     step (u64)
    50      4     microbatch (u32)
    54      4     stage (u32)
    58      4     extra length (u32)
    62      8     payload length (u64)
    70      8     sequence number (u64): frames of one link direction count 0, 1, 2, ... (the endpoint checks it)
    78      4     CRC32 of header[0:78] + extra + payload  (catches corruption, reason "checksum")
    82      32    body tag: HMAC-SHA256(key, "body" | header[0:82] | extra | payload)         (reason "auth")
    114     16    head tag: HMAC-SHA256(key, "head" | header[0:114]), first 16 bytes          (reason "auth")

The head tag is checked before the body is read, so nothing is allocated at a size an unauthenticated header
claims. `key` is a per-direction session key (`hxtrain.network.handshake`). A frame sent over TLS carries no tags
(`key=None`, both all zero): TLS already authenticates every byte, and a second MAC would halve the link's crypto
throughput (`benchmarks/tls.py`).

The header is generic: a codec that needs side data (int8 per-row scales) puts it inside its payload. `dtype` and
`shape` always describe the *original* tensor, so the receiver can decode without any negotiation.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import select
import socket
import struct
import time
import zlib
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np

MAGIC = b"HXTR"
FORMAT_VERSION = 2
MAX_NDIM = 8
MIN_SECRET_BYTES = 16

_PREFIX = struct.Struct("!4sH")  # magic, version: read first, so a future layout is still recognised
_REST = struct.Struct("!BBBB8IQIIIQQ")  # kind .. sequence number
_CRC = struct.Struct("!I")
_BODY_TAG = 32
_HEAD_TAG = 16
_CRC_AT = _PREFIX.size + _REST.size  # 78
_BODY_TAG_AT = _CRC_AT + _CRC.size  # 82
_HEAD_TAG_AT = _BODY_TAG_AT + _BODY_TAG  # 114
HEADER_SIZE = _HEAD_TAG_AT + _HEAD_TAG  # 130
_NO_TAGS = bytes(_BODY_TAG + _HEAD_TAG)


class Kind(enum.IntEnum):
    ACTIVATION = 1
    COTANGENT = 2
    CONTROL = 3
    HELLO = 4
    ERROR = 5
    BYE = 6
    PSEUDO_GRADIENT = 7  # DiLoCo: a replica's pseudo-gradient of one parameter (stage = fragment, microbatch = key)
    STATE = 8  # DiLoCo: the outer state a returning replica takes from the other (microbatch = which array)


# Code 0 is reserved for opaque bytes (control messages, handshake). Codes are append-only: never renumber.
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.float16),
    3: np.dtype(ml_dtypes.bfloat16),
    4: np.dtype(ml_dtypes.float8_e4m3fn),
    5: np.dtype(ml_dtypes.float8_e4m3fnuz),
    6: np.dtype(np.int8),
    7: np.dtype(np.int32),
    8: np.dtype(np.uint8),
    9: np.dtype(np.float64),
    10: np.dtype(np.int64),
    11: np.dtype(np.int16),
    12: np.dtype(np.uint16),
    13: np.dtype(np.uint32),
    14: np.dtype(np.bool_),
    15: np.dtype(ml_dtypes.float8_e5m2),
    16: np.dtype(ml_dtypes.float8_e5m2fnuz),
}
_CODE_OF = {dt: code for code, dt in DTYPE_CODES.items()}


class FrameError(Exception):
    """A frame that must not be delivered. `reason` is one of: "closed" (EOF at a frame boundary), "truncated",
    "checksum", "auth", "oversize", "version", "magic", "dtype", "kind", "shape", "sequence". For "version",
    `version` holds
    the version the peer spoke."""

    def __init__(self, reason: str, message: str, *, version: int | None = None):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.version = version


@dataclass(frozen=True)
class Header:
    """Decoded frame header. `dtype` is None for opaque bytes; `length` is the payload length in bytes."""

    kind: Kind
    codec: int
    dtype: np.dtype | None
    shape: tuple[int, ...]
    step: int
    microbatch: int
    stage: int
    length: int
    extra: bytes = b""
    version: int = FORMAT_VERSION
    seq: int = 0

    @property
    def frame_bytes(self) -> int:
        """Bytes this frame occupied on the wire."""
        return HEADER_SIZE + len(self.extra) + self.length


def frame_size(payload_bytes: int, extra_bytes: int = 0) -> int:
    """Bytes a frame with this payload occupies on the wire (header included)."""
    return HEADER_SIZE + extra_bytes + payload_bytes


def dtype_code(dtype) -> int:
    """The wire code of a numpy dtype; ValueError listing the supported dtypes when it has none."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    if dt not in _CODE_OF:
        names = ", ".join(d.name for d in DTYPE_CODES.values())
        raise ValueError(f"dtype {dt.name!r} has no wire code; supported: {names}")
    return _CODE_OF[dt]


def check_key(key: bytes | None) -> None:
    """ValueError unless `key` is None (a TLS link: no frame tags) or bytes of >= MIN_SECRET_BYTES."""
    if key is not None and (not isinstance(key, (bytes, bytearray)) or len(key) < MIN_SECRET_BYTES):
        got = f"{len(key)} bytes" if isinstance(key, (bytes, bytearray)) else type(key).__name__
        raise ValueError(f"key must be None (TLS link) or bytes of length >= {MIN_SECRET_BYTES}, got {got}; "
                         f"e.g. secrets.token_bytes(32)")


def _tag(key: bytes, label: bytes, *parts) -> bytes:
    mac = hmac.new(key, label, hashlib.sha256)
    for part in parts:
        mac.update(part)
    return mac.digest()


def _u32(name: str, value: int, bits: int = 32) -> int:
    if not 0 <= int(value) < 2**bits:
        raise ValueError(f"{name} must be in [0, 2**{bits}), got {value}")
    return int(value)


def encode(
    kind: Kind | int,
    array: np.ndarray | bytes,
    *,
    key: bytes | None,
    seq: int = 0,
    step: int = 0,
    microbatch: int = 0,
    stage: int = 0,
    codec: int = 0,
    extra: bytes = b"",
    shape: tuple[int, ...] = (),
    dtype=None,
    version: int = FORMAT_VERSION,
) -> bytes:
    """One frame as bytes.

    `array` is either a numpy array (raw tensor bytes, codec must be 0; dtype and shape come from the array) or an
    already-encoded payload as bytes, described by `shape` / `dtype` (the original tensor's; dtype None = opaque
    bytes) and `codec`. `key`: the session key that tags the frame, None on a TLS link. `seq`: the frame's number
    on its link direction. `version` exists so tests can speak another version.
    """
    check_key(key)
    kind = Kind(kind)
    if isinstance(array, (np.ndarray, np.generic)):
        array = np.asarray(array)  # numpy scalars are 0-d arrays
        if codec != 0:
            raise ValueError(f"codec={codec} needs a pre-encoded bytes payload; pass codec.encode(array)")
        shape, dtype = array.shape, array.dtype
        if dtype.byteorder == ">":
            array = array.astype(dtype.newbyteorder("<"))
        payload = np.ascontiguousarray(array).tobytes()
    elif isinstance(array, (bytes, bytearray, memoryview)):
        payload = bytes(array)
    else:
        raise TypeError(f"payload must be a numpy array or bytes, got {type(array).__name__}")
    code = 0 if dtype is None else dtype_code(dtype)
    if len(shape) > MAX_NDIM:
        raise ValueError(f"shape {tuple(shape)} has ndim {len(shape)}; the wire carries at most {MAX_NDIM}")
    dims = [_u32("shape dim", d) for d in shape] + [0] * (MAX_NDIM - len(shape))
    rest = _REST.pack(
        kind, _u32("codec", codec, 8), code, len(shape), *dims, _u32("step", step, 64),
        _u32("microbatch", microbatch), _u32("stage", stage), len(extra), len(payload), _u32("seq", seq, 64),
    )
    head = _PREFIX.pack(MAGIC, _u32("version", version, 16)) + rest
    head += _CRC.pack(zlib.crc32(payload, zlib.crc32(extra, zlib.crc32(head))))
    if key is None:
        return b"".join((head, _NO_TAGS, extra, payload))
    head += _tag(key, b"body", head, extra, payload)
    return b"".join((head, _tag(key, b"head", head)[:_HEAD_TAG], extra, payload))


def _parse_header(head: bytes, max_bytes: int) -> tuple[Header, int, int]:
    """(header, extra length, payload length) from HEADER_SIZE bytes; checks everything but checksum and HMAC."""
    magic, version = _PREFIX.unpack_from(head)
    if magic != MAGIC:
        raise FrameError("magic", f"expected magic {MAGIC!r}, got {magic!r} (not an hxtrain peer?)")
    if version != FORMAT_VERSION:
        raise FrameError(
            "version", f"peer speaks wire format version {version}, this side speaks {FORMAT_VERSION}",
            version=version,
        )
    kind, codec, code, ndim, *rest = _REST.unpack_from(head, _PREFIX.size)
    dims, (step, microbatch, stage, extra_len, length, seq) = rest[:MAX_NDIM], rest[MAX_NDIM:]
    if kind not in Kind._value2member_map_:
        raise FrameError("kind", f"unknown message kind {kind}; known: {[int(k) for k in Kind]}")
    if code != 0 and code not in DTYPE_CODES:
        raise FrameError("dtype", f"unknown dtype code {code}; known: {sorted(DTYPE_CODES)}")
    if ndim > MAX_NDIM or any(dims[ndim:]):
        raise FrameError("shape", f"bad shape: ndim={ndim}, dims={dims}")
    if extra_len + length > max_bytes:
        raise FrameError(
            "oversize", f"frame body of {extra_len + length} bytes exceeds max_bytes={max_bytes}"
        )
    header = Header(
        Kind(kind), codec, DTYPE_CODES.get(code), tuple(dims[:ndim]), step, microbatch, stage, length,
        version=version, seq=seq,
    )
    return header, extra_len, length


def _check_head(head: bytes, key: bytes | None) -> None:
    """The head tag, before any of the body is read (nothing is allocated at an unauthenticated size)."""
    if key is not None and not hmac.compare_digest(
        _tag(key, b"head", head[:_HEAD_TAG_AT])[:_HEAD_TAG], head[_HEAD_TAG_AT:HEADER_SIZE]
    ):
        raise FrameError("auth", "HMAC-SHA256 header tag mismatch (wrong key, or the frame was tampered with)")


def _finish(head: bytes, header: Header, body: bytearray, extra_len: int, key: bytes | None):
    """Check CRC then the body tag over header + body; interpret the payload. Returns (header, payload)."""
    (crc,) = _CRC.unpack_from(head, _CRC_AT)
    if zlib.crc32(body, zlib.crc32(head[:_CRC_AT])) != crc:
        raise FrameError("checksum", f"CRC32 mismatch on a {len(body)}-byte body (corrupted in transit)")
    if key is not None and not hmac.compare_digest(
        _tag(key, b"body", head[:_BODY_TAG_AT], body), head[_BODY_TAG_AT:_HEAD_TAG_AT]
    ):
        raise FrameError("auth", "HMAC-SHA256 tag mismatch (wrong key, or the frame was tampered with)")
    extra = bytes(body[:extra_len])
    header = replace(header, extra=extra)
    view = memoryview(body)[extra_len:]
    if header.codec != 0 or header.dtype is None:
        return header, bytes(view)
    want = int(np.prod(header.shape, dtype=np.int64)) * header.dtype.itemsize
    if want != len(view):
        raise FrameError(
            "shape", f"shape {header.shape} {header.dtype.name} needs {want} bytes, payload has {len(view)}"
        )
    wire_dtype = header.dtype.newbyteorder("<")  # tensor bytes are little-endian on the wire
    array = np.frombuffer(view, dtype=wire_dtype).astype(header.dtype, copy=False)
    return header, array.reshape(header.shape)


def decode(buf: bytes, *, key: bytes | None, max_bytes: int) -> tuple[Header, np.ndarray | bytes]:
    """(header, payload) from one whole frame. The payload is a writable numpy array for raw tensors (codec 0) and
    bytes otherwise (pass them to the codec named by `header.codec`). Raises FrameError."""
    check_key(key)
    if len(buf) < HEADER_SIZE:
        raise FrameError("truncated", f"frame has {len(buf)} bytes, the header alone needs {HEADER_SIZE}")
    head = bytes(buf[:HEADER_SIZE])
    header, extra_len, length = _parse_header(head, max_bytes)
    _check_head(head, key)
    body = bytearray(memoryview(buf)[HEADER_SIZE:])
    if len(body) != extra_len + length:
        reason = "truncated" if len(body) < extra_len + length else "shape"
        raise FrameError(reason, f"header announces a {extra_len + length}-byte body, got {len(body)} bytes")
    return _finish(head, header, body, extra_len, key)


def wait_readable(sock: socket.socket, seconds: float) -> bool:
    """Wait until `sock` has data (or EOF); poll() where it exists, since select() fails for fds >= 1024."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLIN | select.POLLPRI)
        return bool(poller.poll(max(1, int(seconds * 1000))))
    return bool(select.select([sock], [], [], seconds)[0])


def _exact_reader(src, deadline: float | None):
    """A function read(n, done) -> bytearray of exactly n bytes from a socket, a channel with
    `read_into(view, deadline) -> int` (TimeoutError at the deadline; `hxtrain.network.tls.TlsChannel`) or a
    file-like object.

    `done` is how many bytes of the current frame were read before, to tell EOF-between-frames from truncation.
    For sockets the deadline is enforced with select(), leaving the socket's own timeout (used by senders on
    other threads) untouched.
    """

    def stalled(got: int):
        if got == 0:
            return TimeoutError("no frame arrived before the deadline")
        return FrameError("truncated", f"frame stalled after {got} bytes (timed out)")

    def read(n: int, done: int) -> bytearray:
        out = bytearray(n)
        view, got = memoryview(out), 0
        while got < n:
            if isinstance(src, socket.socket):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and (left <= 0 or not wait_readable(src, left)):
                    raise stalled(done + got)
                k = src.recv_into(view[got:])
            elif hasattr(src, "read_into"):
                try:
                    k = src.read_into(view[got:], deadline)
                except TimeoutError:
                    raise stalled(done + got) from None
            else:
                chunk = src.read(n - got)
                k = len(chunk) if chunk else 0
                view[got : got + k] = chunk or b""
            if k == 0:
                if done + got == 0:
                    raise FrameError("closed", "end of stream between frames")
                raise FrameError("truncated", f"stream ended after {done + got} bytes of a frame")
            got += k
        return out

    return read


def read_frame(sock_or_reader, *, key: bytes | None, max_bytes: int, timeout: float | None):
    """Read exactly one frame from a socket (or an object with `.read(n)`); returns (header, payload) as `decode`.

    Never reads a body larger than `max_bytes`, nor one whose header does not authenticate with `key`. `timeout`
    bounds the whole frame: TimeoutError if no byte arrived (an idle link is not an error), FrameError("truncated")
    if the frame stalled midway; None waits forever.
    """
    check_key(key)
    read = _exact_reader(sock_or_reader, None if timeout is None else time.monotonic() + timeout)
    prefix = read(_PREFIX.size, 0)
    magic, version = _PREFIX.unpack_from(prefix)
    if magic != MAGIC or version != FORMAT_VERSION:  # before reading more: another version's header may differ
        _parse_header(bytes(prefix) + bytes(HEADER_SIZE - _PREFIX.size), max_bytes)
    head = bytes(prefix + read(HEADER_SIZE - _PREFIX.size, _PREFIX.size))
    header, extra_len, length = _parse_header(head, max_bytes)
    _check_head(head, key)
    body = read(extra_len + length, HEADER_SIZE) if extra_len + length else bytearray()
    return _finish(head, header, body, extra_len, key)
