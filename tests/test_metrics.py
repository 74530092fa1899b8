"""Metrics files: JSONL rows and hand-written TensorBoard event files that parse back (ours and protobuf's)."""

import json

import pytest

from hxtrain.training import metrics
from hxtrain.schedules.simulate import Event


def test_crc32c_known_vectors():
    assert metrics.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert metrics.crc32c(b"") == 0
    assert metrics.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4: 32 bytes of zeros


def test_writer_round_trip(tmp_path):
    rows = [{"step": s, "loss": 5.0 - s, "lr": 1e-3 * s, "bytes_per_link": {"0->1": 4096 * s}, "busy": {"a": 0.5},
             "note": "ignored"} for s in (1, 2, 3)]
    with metrics.MetricsWriter(tmp_path) as w:
        for r in rows:
            w.write(r)
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    (events,) = list((tmp_path / "tb").iterdir())
    assert events.name.startswith("events.out.tfevents.")
    got = metrics.read_events(events)
    assert [(s, t) for s, t, _ in got if s == 2] == [(2, "loss"), (2, "lr"), (2, "bytes_per_link/0->1"), (2, "busy/a")]
    assert {(s, t): v for s, t, v in got}[(3, "bytes_per_link/0->1")] == 12288.0
    assert {(s, t): v for s, t, v in got}[(2, "lr")] == pytest.approx(2e-3, rel=1e-7)


def test_event_file_parses_with_protobuf(tmp_path):
    """Cross-check against the real Event protobuf (tensorboardX ships the compiled .proto)."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2", reason="tensorboardX not installed")
    w = metrics.EventFileWriter(tmp_path)
    w.scalars(7, {"loss": 2.5, "grad_norm": 0.25})
    w.close()
    first, second = (event_pb2.Event.FromString(p) for p in metrics.read_records(w.path))
    assert first.file_version == "brain.Event:2"
    assert second.step == 7 and [(v.tag, v.simple_value) for v in second.summary.value] == [("loss", 2.5),
                                                                                           ("grad_norm", 0.25)]


def test_damaged_event_file_is_reported(tmp_path):
    w = metrics.EventFileWriter(tmp_path)
    w.scalars(1, {"loss": 1.0})
    w.close()
    data = bytearray(w.path.read_bytes())
    data[-6] ^= 0xFF  # inside the last payload
    w.path.write_bytes(bytes(data))
    with pytest.raises(metrics.EventFileError, match="bad payload checksum at byte"):
        metrics.read_events(w.path)
    w.path.write_bytes(bytes(data[:-3]))
    with pytest.raises(metrics.EventFileError, match="truncated record at byte"):
        metrics.read_records(w.path)


def test_busy_fractions_from_a_recorded_step():
    class Topo:
        sites = [type("S", (), {"name": "a"}), type("S", (), {"name": "b"})]

    class Pipe:
        topology = Topo()
        last_step_stats = type("Stats", (), {"events": [Event(0, "F0", 0.0, 3.0), Event(1, "F1", 1.0, 4.0),
                                                        Event(0, "send", 3.0, 4.0, category="transfer")]})

    assert metrics.busy_fractions(Pipe()) == {"a": 0.75, "b": 0.75}
    Pipe.last_step_stats = None
    assert metrics.busy_fractions(Pipe()) is None
