"""Timelines of pipeline runs, simulated or real: Chrome-trace JSON (Perfetto, chrome://tracing) and a summary.

Trace layout: one process per site (pid = site, named by `site_names`), thread 0 = compute, thread 1 =
transfers leaving that site. A site can have several transfers in flight at once (to both neighbours, or
overlapping latencies); a track must not hold overlapping slices, so those spill onto threads 2, 3, ...
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

from hxtrain.schedules.tables import ScheduleError
from hxtrain.schedules.simulate import Event, busy_fraction, makespan


def _site_name(site: int, site_names: Sequence[str] | None) -> str:
    if site_names is None:
        return f"site {site}"
    if not 0 <= site < len(site_names):
        raise ScheduleError(f"site_names: has {len(site_names)} names but an event is on site {site}")
    return f"site {site}: {site_names[site]}"


def _lanes(events: Sequence[Event]) -> list[int]:
    """Thread id per event: 0 for compute; transfers take the first lane >= 1 free on their site."""
    tids = [0] * len(events)
    free: dict[int, list[float]] = {}  # site -> end time of the last slice in each transfer lane
    for i in sorted(range(len(events)), key=lambda i: (events[i].start, events[i].end)):
        e = events[i]
        if e.category != "transfer":
            continue
        lanes = free.setdefault(e.site, [])
        lane = next((k for k, end in enumerate(lanes) if end <= e.start), len(lanes))
        if lane == len(lanes):
            lanes.append(e.end)
        lanes[lane] = e.end
        tids[i] = 1 + lane
    return tids


def to_chrome_trace(events: Sequence[Event], path: str | os.PathLike, *, site_names: Sequence[str] | None = None,
                    metadata: Mapping[str, Any] | None = None) -> dict:
    """Write `events` as Chrome-trace JSON to `path` and return the written object.

    "X" (complete) events with `ts`/`dur` in microseconds from the first event's start; `args` carry stage,
    microbatch, kind (and dst_site, nbytes for transfers). `metadata` goes under "otherData".
    """
    t0 = min((e.start for e in events), default=0.0)
    tids = _lanes(events)
    trace: list[dict] = []
    sites = sorted({e.site for e in events} | set(range(len(site_names or ()))))
    for site in sites:
        trace.append({"name": "process_name", "ph": "M", "pid": site, "tid": 0,
                      "args": {"name": _site_name(site, site_names)}})
        trace.append({"name": "process_sort_index", "ph": "M", "pid": site, "tid": 0, "args": {"sort_index": site}})
    for site, tid in sorted({(e.site, t) for e, t in zip(events, tids)}):
        label = "compute" if tid == 0 else "transfer" if tid == 1 else f"transfer {tid}"
        trace.append({"name": "thread_name", "ph": "M", "pid": site, "tid": tid, "args": {"name": label}})
    for e, tid in zip(events, tids):
        args = {k: v for k, v in (("stage", e.stage), ("microbatch", e.microbatch), ("kind", e.kind)) if v is not None}
        if e.category == "transfer":
            args.update(dst_site=e.dst_site, nbytes=e.nbytes)
        trace.append({"name": e.name, "cat": e.category, "ph": "X", "pid": e.site, "tid": tid,
                      "ts": (e.start - t0) * 1e6, "dur": (e.end - e.start) * 1e6, "args": args})
    out = {"traceEvents": trace, "displayTimeUnit": "ms", "otherData": dict(metadata or {})}
    with open(path, "w") as f:
        json.dump(out, f)
    return out


def summarize(events: Sequence[Event], sites: int) -> dict:
    """{'makespan': s, 'bubble': idle share of all sites, 'sites': [{'site', 'busy', 'idle', 'compute_s',
    'transfer_s', 'tasks'}]} with busy/idle as fractions of the makespan."""
    busy = busy_fraction(events, sites)
    rows = []
    for d in range(sites):
        mine = [e for e in events if e.site == d]
        rows.append({"site": d, "busy": busy[d], "idle": 1.0 - busy[d],
                     "compute_s": sum(e.end - e.start for e in mine if e.category == "compute"),
                     "transfer_s": sum(e.end - e.start for e in mine if e.category == "transfer"),
                     "tasks": sum(e.category == "compute" for e in mine)})
    return {"makespan": makespan(events), "bubble": 1.0 - sum(busy) / sites, "sites": rows}


def format_summary(events: Sequence[Event], sites: int, *, site_names: Sequence[str] | None = None,
                   analytic: float | None = None) -> str:
    """A small table: site, busy %, idle %, then the whole pipeline's bubble (and the analytic one if given)."""
    summary = summarize(events, sites)
    names = [_site_name(d, site_names) for d in range(sites)]
    width = max(len("site"), *(len(n) for n in names))
    lines = [f"{'site':<{width}}  {'busy %':>7}  {'idle %':>7}"]
    for name, row in zip(names, summary["sites"]):
        lines.append(f"{name:<{width}}  {100 * row['busy']:7.1f}  {100 * row['idle']:7.1f}")
    tail = f"bubble {100 * summary['bubble']:.1f} %"
    if analytic is not None:
        tail += f" (analytic {100 * analytic:.1f} %)"
    lines.append(f"makespan {summary['makespan']:.6g} s, {tail}")
    return "\n".join(lines)
