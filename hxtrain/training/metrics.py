"""Training metrics on disk: one JSON line per step (`metrics.jsonl`) and TensorBoard event files (`tb/`).

    with MetricsWriter("runs/a") as w:
        w.write({"step": 1, "loss": 5.5, "lr": 1e-3, "bytes_per_link": {"0->1": 4096}, "busy": {"a": 0.7}})
    read_events(next(Path("runs/a/tb").glob("events.out.tfevents.*")))   # [(step, tag, value), ...]

Nested dicts become slash-separated TensorBoard tags (`bytes_per_link/0->1`, `busy/a`).

The TensorBoard writer is written by hand rather than taken from `tensorboardX` or TensorFlow: the format is small
and stable (TFRecord framing: u64 length, masked CRC32C of the length, payload, masked CRC32C of the payload; the
payload an `Event` protobuf with a `Summary` of `simple_value`s), and a hand-written writer keeps hxtrain free of a
protobuf runtime dependency. Only the fields used here are encoded; `read_events` decodes them back.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

# ---- CRC32C (Castagnoli), as TFRecord framing wants it -------------------------------------------------------------


def _crc_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = tuple(_crc_table())  # a constant, computed once


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ---- the few protobuf fields of Event / Summary -------------------------------------------------------------------


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 as protobuf encodes negatives
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    # Event: wall_time = 1 (double), step = 2 (int64), file_version = 3 (string), summary = 5 (Summary)
    # Summary: repeated Value value = 1;  Value: tag = 1 (string), simple_value = 2 (float)
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _bytes_field(3, file_version.encode())
    if scalars:
        values = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5) + struct.pack("<f", v))
                          for tag, v in scalars.items())
        out += _bytes_field(5, values)
    return out


def _record(payload: bytes) -> bytes:
    header = struct.pack("<Q", len(payload))
    return header + struct.pack("<I", masked_crc32c(header)) + payload + struct.pack("<I", masked_crc32c(payload))


class EventFileWriter:
    """A TensorBoard event file `events.out.tfevents.<time>.<host>` in `logdir`; `scalars(step, {tag: value})`."""

    def __init__(self, logdir: str | os.PathLike):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        self.path = Path(logdir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self._f = open(self.path, "ab")
        self._f.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._f.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._f.write(_record(_event(time.time(), int(step), scalars={k: float(v) for k, v in values.items()})))
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# ---- reading back ---------------------------------------------------------------------------------------------------


class EventFileError(ValueError):
    """An event file whose framing or checksums are wrong."""


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        shift += 7
        if not b & 0x80:
            return n, i


def _fields(buf: bytes):
    """(field number, value) pairs of a protobuf message; value is int, bytes, or raw 4/8 bytes."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            n, i = _read_varint(buf, i)
            value, i = buf[i:i + n], i + n
        else:
            raise EventFileError(f"unsupported protobuf wire type {wire} in field {number}")
        yield number, value


def read_records(path: str | os.PathLike) -> list[bytes]:
    """Payloads of every record, checking both CRCs; raises EventFileError naming the offset of a bad one."""
    data = Path(path).read_bytes()
    out, i = [], 0
    while i < len(data):
        if i + 12 > len(data):
            raise EventFileError(f"{path}: truncated record header at byte {i}")
        header = data[i:i + 8]
        (n,), (hcrc,) = struct.unpack("<Q", header), struct.unpack("<I", data[i + 8:i + 12])
        if hcrc != masked_crc32c(header):
            raise EventFileError(f"{path}: bad length checksum at byte {i}")
        payload = data[i + 12:i + 12 + n]
        if len(payload) != n or i + 16 + n > len(data):
            raise EventFileError(f"{path}: truncated record at byte {i}")
        (pcrc,) = struct.unpack("<I", data[i + 12 + n:i + 16 + n])
        if pcrc != masked_crc32c(payload):
            raise EventFileError(f"{path}: bad payload checksum at byte {i}")
        out.append(payload)
        i += 16 + n
    return out


def read_events(path: str | os.PathLike) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in an event file, in file order."""
    out = []
    for payload in read_records(path):
        step, summary = 0, None
        for number, value in _fields(payload):
            if number == 2:
                step = value
            elif number == 5:
                summary = value
        for number, value in _fields(summary or b""):
            if number == 1:
                tag, scalar = "", None
                for n2, v2 in _fields(value):
                    if n2 == 1:
                        tag = v2.decode()
                    elif n2 == 2:
                        (scalar,) = struct.unpack("<f", v2)
                if scalar is not None:
                    out.append((step, tag, scalar))
    return out


# ---- the writer the trainer uses ----------------------------------------------------------------------------------


def flatten(row: dict, prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics row as {'loss': .., 'bytes_per_link/0->1': ..}; `step` and non-numbers are
    left out."""
    out = {}
    for k, v in row.items():
        tag = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, tag + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and tag != "step":
            out[tag] = float(v)
    return out


class MetricsWriter:
    """`out/metrics.jsonl` (appended) and `out/tb/events.out.tfevents.*` (a new file per writer); a site process
    names its own (`jsonl="metrics-a.jsonl", tensorboard_dir="tb/a"`)."""

    def __init__(self, out: str | os.PathLike, *, tensorboard: bool = True, jsonl: str = "metrics.jsonl",
                 tensorboard_dir: str = "tb"):
        Path(out).mkdir(parents=True, exist_ok=True)
        self.jsonl = open(Path(out) / jsonl, "a")
        self.events = EventFileWriter(Path(out) / tensorboard_dir) if tensorboard else None

    def write(self, row: dict) -> None:
        """One step's metrics; `row["step"]` is the TensorBoard step."""
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.events is not None:
            self.events.scalars(int(row["step"]), flatten(row))

    def close(self) -> None:
        self.jsonl.close()
        if self.events is not None:
            self.events.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def busy_fractions(pipeline) -> dict[str, float] | None:
    """Per-site busy fraction of the pipeline's last step if it was recorded (`timeline=True`), else None."""
    stats = getattr(pipeline, "last_step_stats", None)
    events = getattr(stats, "events", None)
    if not events:
        return None
    from hxtrain.schedules.simulate import busy_fraction

    names = [s.name for s in pipeline.topology.sites]
    return dict(zip(names, busy_fraction(events, len(names))))
