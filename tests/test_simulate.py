"""Discrete-event simulator and Chrome-trace timeline: makespans derived by hand, link latency and queueing."""

import json

import pytest

from hxtrain.schedules.tables import GPipe, OneFOneB, ScheduleError, Task, analytic_bubble
from hxtrain.schedules.simulate import Event, bubble_fraction, busy_fraction, makespan, simulate
from hxtrain.schedules.timeline import format_summary, summarize, to_chrome_trace

F, B = 1.0, 2.0  # forward and backward cost per stage and microbatch


def _dur(site, task):
    return F if task.kind == "F" else B


def _run(schedule, microbatches, transfer=None, sites=2):
    return simulate(schedule.site_orders(sites, microbatches), sites, duration=_dur, transfer=transfer)


@pytest.mark.parametrize("schedule", [GPipe(), OneFOneB()], ids=["gpipe", "1f1b"])
@pytest.mark.parametrize("microbatches", [1, 2, 4, 7])
def test_makespan_without_links(schedule, microbatches):
    # GPipe, 2 stages: site 1's last forward ends at (M+1)F, its backwards run back to back, site 0's last one
    # ends one B later: (M+1)F + M*B + B = (M+S-1)(F+B). 1F1B with free links has the same critical path.
    events = _run(schedule, microbatches)
    assert makespan(events) == (microbatches + 1) * (F + B)
    assert bubble_fraction(events, 2) == pytest.approx(analytic_bubble(schedule.name, 2, microbatches))
    assert busy_fraction(events, 2) == [microbatches * (F + B) / makespan(events)] * 2


@pytest.mark.parametrize("m", [1, 2, 3, 4, 7])
def test_link_latency_shifts_makespan_as_predicted(m):
    lat = 0.25  # lat <= F, B: a link never queues
    base = (m + 1) * (F + B)
    # GPipe: the critical path crosses the link once forward (last F) and once backward (first B chain): +2L.
    gpipe = _run(GPipe(), m, transfer=lambda src, dst, task: lat)
    assert makespan(gpipe) == pytest.approx(base + 2 * lat)
    # 1F1B: let x_m be when site 0 starts B(m). Site 0 runs F(m+1) right after B(m-1); that activation goes
    # over (L), through site 1 (F+B, site 1 is free by then) and back (L), so
    #   x_0 = 2F+B+2L,  x_{m+1} = max(x_m + F+B, x_{m-1} + 2(F+B+L))
    # giving x_m = x_0 + m(F+B) + 2L*floor(m/2): the one warm-up microbatch in flight hides every other round
    # trip. Makespan x_{M-1} + B = (M+1)(F+B) + 2L*ceil(M/2).
    one = _run(OneFOneB(), m, transfer=lambda src, dst, task: lat)
    assert makespan(one) == pytest.approx(base + 2 * lat * ((m + 1) // 2))
    transfers = [e for e in one if e.category == "transfer"]
    assert len(transfers) == 2 * m  # one activation and one cotangent per microbatch
    assert {(e.site, e.dst_site, e.kind) for e in transfers} == {(0, 1, "F"), (1, 0, "B")}


def test_link_is_one_channel_and_latency_may_overlap():
    m = 4
    # 2.5 s per transfer, all of it holding the channel: forwards leave site 0 every 1 s but queue, arriving at
    # 3.5, 6, 8.5, 11; site 1's backwards end at 14, 16, 18, 20 and queue back, arriving 16.5, 19, 21.5, 24;
    # site 0's last backward ends at 26.
    queued = _run(GPipe(), m, transfer=lambda src, dst, task: 2.5)
    assert makespan(queued) == pytest.approx(26.0)
    # Same 2.5 s, but only 0.5 s of it occupies the channel (bandwidth) and 2 s is latency: no queueing, so
    # it is the +2L shift again: 15 + 2 * 2.5.
    pipelined = _run(GPipe(), m, transfer=lambda src, dst, task: (0.5, 2.0))
    assert makespan(pipelined) == pytest.approx(20.0)


def test_single_site_has_no_transfers():
    events = simulate(GPipe().site_orders(1, 3), 1, duration=_dur, transfer=lambda s, d, t: 1.0)
    assert all(e.category == "compute" for e in events) and makespan(events) == 3 * (F + B)


def test_simulate_errors():
    orders = GPipe().site_orders(2, 2)
    with pytest.raises(ScheduleError, match=r"duration\(site=0, task=F0 \(stage 0\)\): expected seconds >= 0, got -1"):
        simulate(orders, 2, duration=lambda s, t: -1)
    with pytest.raises(ScheduleError, match=r"transfer\(src=0, dst=1, task=F0 \(stage 0\)\): expected seconds >= 0"):
        simulate(orders, 2, duration=_dur, transfer=lambda s, d, t: "fast")
    with pytest.raises(ScheduleError, match=r"site 1: B0 \(stage 1\) needs F0 \(stage 1\), which no site runs"):
        simulate([orders[0], orders[1][1:]], 2, duration=_dur)
    with pytest.raises(ScheduleError, match=r"expected one order per site \(3\), got 2"):
        simulate(orders, 3, duration=_dur)
    with pytest.raises(ScheduleError, match=r"deadlock after 0 of 2 tasks"):
        simulate([(Task(0, 0, "B"), Task(0, 0, "F"))], 1, duration=_dur)


def test_chrome_trace_round_trip(tmp_path):
    m = 4
    events = _run(GPipe(), m, transfer=lambda src, dst, task: 0.25)
    path = tmp_path / "trace.json"
    to_chrome_trace(events, path, site_names=["gpu-a", "npu-b"], metadata={"schedule": "gpipe"})
    trace = json.loads(path.read_text())
    complete = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert len(complete) == 2 * 2 * m + 2 * m  # 16 compute, 4 activations + 4 cotangents
    assert sum(e["tid"] == 0 for e in complete) == 4 * m and sum(e["tid"] == 1 for e in complete) == 2 * m
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "site 0: gpu-a", 1: "site 1: npu-b"}
    assert trace["otherData"] == {"schedule": "gpipe"}
    last = max(complete, key=lambda e: e["ts"] + e["dur"])
    assert last["ts"] + last["dur"] == pytest.approx(makespan(events) * 1e6)  # microseconds
    assert last["args"] == {"stage": 0, "microbatch": m - 1, "kind": "B"}


def test_trace_spills_overlapping_transfers_to_new_lanes(tmp_path):
    # Two overlapping transfers from one site (to both neighbours) must not share a track.
    events = [Event(1, "F0 1->2", 0.0, 2.0, category="transfer", dst_site=2),
              Event(1, "B0 1->0", 1.0, 3.0, category="transfer", dst_site=0),
              Event(1, "F1 1->2", 2.0, 4.0, category="transfer", dst_site=2)]
    trace = to_chrome_trace(events, tmp_path / "t.json")
    assert [e["tid"] for e in trace["traceEvents"] if e["ph"] == "X"] == [1, 2, 1]


def test_summary_table():
    events = _run(GPipe(), 4)
    summary = summarize(events, 2)
    assert summary["makespan"] == 15.0 and summary["bubble"] == pytest.approx(0.2)
    assert [r["tasks"] for r in summary["sites"]] == [8, 8]
    assert summary["sites"][0]["busy"] == pytest.approx(12 / 15) and summary["sites"][0]["idle"] == pytest.approx(0.2)
    text = format_summary(events, 2, site_names=["a", "b"], analytic=analytic_bubble("gpipe", 2, 4))
    assert "site 0: a" in text and "80.0" in text and "20.0" in text
    assert text.splitlines()[-1] == "makespan 15 s, bubble 20.0 % (analytic 20.0 %)"
    with pytest.raises(ScheduleError, match="site_names: has 1 names but an event is on site 1"):
        format_summary(events, 2, site_names=["a"])
