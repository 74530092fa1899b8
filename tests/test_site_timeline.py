"""`hxtrain site --timeline`: each site process writes its own recorded step as a Chrome trace, and what it waited
for from another site shows as transfer, not compute (issue 15: bubbles on a slow link)."""

import io
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.transport import Relay  # noqa: E402  (the user-space WAN of the benchmarks)
from hxtrain.sites.launch import free_port, launch  # noqa: E402
from hxtrain.sites.steps import site_timeline_path  # noqa: E402

DELAY_S = 0.060  # one way: far longer than any task of `tiny` here


def _mesh(tmp_path) -> Path:
    sites = "".join(f'[[sites]]\nname = "{n}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n\n' for n in "ab")
    path = tmp_path / "two.toml"
    path.write_text(f'name = "slow-link"\n{sites}[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 1\n'
                    'latency_ms = 60\n')
    return path


def _events(trace: dict, pid: int, category: str) -> list[dict]:
    return sorted((e for e in trace["traceEvents"] if e.get("ph") == "X" and e["pid"] == pid
                   and e["cat"] == category), key=lambda e: e["ts"])


def test_site_timelines_show_the_wait_for_a_slow_link_as_transfer(tmp_path):
    b_port = free_port()
    relay = Relay(("127.0.0.1", b_port), delay=DELAY_S)
    log = io.StringIO()
    try:
        exits = launch(str(_mesh(tmp_path)), ["--model", "tiny", "--steps", "3", "--batch-size", "4",
                                              "--microbatches", "2", "--schedule", "1f1b",
                                              "--timeline", str(tmp_path / "tl" / "run.json")],
                       timeout=60.0, out=log, addresses={"b": f"127.0.0.1:{b_port}"},
                       extra={"a": ["--connect", f"b=127.0.0.1:{relay.port}"]})
    finally:
        relay.close()
    assert [e.returncode for e in exits] == [0, 0], log.getvalue()
    traces = {s: json.loads(Path(site_timeline_path(str(tmp_path / "tl" / "run.json"), s)).read_text())
              for s in "ab"}
    assert sorted(p.name for p in (tmp_path / "tl").iterdir()) == ["run-a.json", "run-b.json"]
    for pid, site in enumerate("ab"):
        t = traces[site]
        assert t["otherData"]["site"] == site and t["otherData"]["step"] == 3
        compute = _events(t, pid, "compute")
        # every task of the site's 1F1B order, once: F and B of 2 microbatches
        assert sorted((e["args"]["kind"], e["args"]["microbatch"]) for e in compute) == \
            [("B", 0), ("B", 1), ("F", 0), ("F", 1)]
        for x, y in zip(compute, compute[1:]):  # one device: its tasks do not overlap
            assert x["ts"] + x["dur"] <= y["ts"] + 1.0, (x, y)
        # what came from the other site is a transfer on the sender's track, into this one
        got = [e for e in _events(t, 1 - pid, "transfer") if e["name"].endswith("(received)")]
        assert sorted(e["args"]["microbatch"] for e in got) == [0, 1]
        assert all(e["args"]["dst_site"] == pid and e["args"]["nbytes"] == 2 * 16 * 32 * 4 for e in got)
    # Site a sends F0 and F1, then waits for b's first cotangent: a round trip over the slow link (2 x 60 ms).
    # That idle gap on a's compute track is covered by the transfer it waited for, not by compute.
    a = traces["a"]
    compute = _events(a, 0, "compute")
    gaps = [(y["ts"] - (x["ts"] + x["dur"]), x, y) for x, y in zip(compute, compute[1:])]
    gap, before, after = max(gaps, key=lambda g: g[0])
    assert gap >= 0.8 * 2 * DELAY_S * 1e6, (gap, compute)
    assert (after["args"]["kind"], after["args"]["microbatch"]) == ("B", 0)
    wait = next(e for e in _events(a, 1, "transfer") if e["name"].endswith("(received)")
                and e["args"]["microbatch"] == 0)
    assert wait["ts"] <= before["ts"] + before["dur"] + 1e3  # asked for by the time the device went idle (1 ms)
    assert wait["ts"] + wait["dur"] >= after["ts"] - 1e3  # and it is what the next task started on
    assert max(e["dur"] for e in compute) < gap / 2  # the gap is the link, not a slow task


def test_timeline_step_out_of_range_is_refused_in_one_line(tmp_path):
    import subprocess

    r = subprocess.run([sys.executable, "-m", "hxtrain", "site", "--mesh", str(_mesh(tmp_path)), "--site", "a",
                        "--model", "tiny", "--steps", "3", "--batch-size", "4", "--microbatches", "2",
                        "--timeline", str(tmp_path / "t.json"), "--timeline-step", "5"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[-1] == "hxtrain site 'a': error: --timeline-step: expected a step in 1..3 (--steps), got 5", r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("path, site, want", [("tl/run.json", "a", "tl/run-a.json"), ("t", "b", "t-b.json")])
def test_each_site_writes_its_own_file(path, site, want):
    assert site_timeline_path(path, site) == want
