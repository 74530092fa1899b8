"""Discrete-event simulation of a pipeline schedule: when each task and each cross-site transfer runs.

Model:
- every site runs its order strictly sequentially; a task starts at max(site free, every input available);
- an input made on the same site is available when its task ends; one made on another site is available when
  its transfer arrives;
- a transfer leaves when its producer ends, on the directed link (src, dst); **each directed link is one channel
  that carries one transfer at a time**, first come first served (transfers on a link all come from src's
  sequential order, so FIFO = src's execution order). `transfer(src, dst, task)` gives the cost of sending
  `task`'s output (the producer: an F's activation, a B's cotangent) as either
    * seconds: the channel is busy that long and the data lands at the end (latency queues, pessimistic), or
    * a pair `(occupancy, latency)`: the channel is busy `occupancy` seconds (bytes / bandwidth) and the data
      lands `latency` seconds after that; latencies of successive transfers overlap, as on a real WAN link.
- one transfer per (producer, destination site), however many tasks there consume it.

`Event` is also what the real executor records, so real and simulated runs are plotted and summarised alike.

`Task` (one unit of pipeline work), `dependencies` and `ScheduleError` live here, below `schedules`: the schedules
are built from tasks and use `simulate` for their unit-time order and deadlock check, so imports go
schedules -> simulate only (`hxtrain.schedules.tables` re-exports the three).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

KINDS = ("F", "B", "W")
_TOKEN = re.compile(r"^([FBW])(\d+)(?:\.(\d+))?$")


class ScheduleError(ValueError):
    """A schedule, a table or its arguments are inconsistent; the message says where and how to fix it."""


@dataclass(frozen=True, order=True)
class Task:
    """One unit of pipeline work: `kind` of `stage` (0..S*v-1) on `microbatch` (0..M-1)."""

    stage: int
    microbatch: int
    kind: str

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ScheduleError(f"Task.kind: expected one of {KINDS}, got {self.kind!r}")
        if not (isinstance(self.stage, int) and self.stage >= 0):
            raise ScheduleError(f"Task.stage: expected an int >= 0, got {self.stage!r}")
        if not (isinstance(self.microbatch, int) and self.microbatch >= 0):
            raise ScheduleError(f"Task.microbatch: expected an int >= 0, got {self.microbatch!r}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}"

    def describe(self) -> str:
        """Unambiguous form for messages, e.g. 'B3 (stage 2)'."""
        return f"{self} (stage {self.stage})"

    def token(self, sites: int) -> str:
        """Table token: 'F3' for chunk 0, 'F3.1' for chunk 1 (stage = site + chunk*sites)."""
        chunk = self.stage // sites
        return f"{self}" if chunk == 0 else f"{self}.{chunk}"

    @classmethod
    def parse(cls, text: str, stage: int | None = None, *, site: int | None = None,
              sites: int | None = None) -> Task:
        """Parse 'F3' with an explicit `stage=`, or 'F3' / 'F3.1' on `site` of `sites` (stage = site + chunk*sites)."""
        match = _TOKEN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ScheduleError(f"task token {text!r}: expected <F|B|W><microbatch>[.<chunk>], e.g. 'F3' or 'B0.1'")
        kind, mb, chunk = match.group(1), int(match.group(2)), match.group(3)
        if stage is not None:
            if chunk is not None or site is not None:
                raise ScheduleError(f"task token {text!r}: give either stage= (and no .chunk) or site=/sites=, "
                                    "not both")
            return cls(stage, mb, kind)
        if site is None:
            raise ScheduleError(f"task token {text!r}: Task.parse needs stage= or site= to know the stage")
        chunk_i = int(chunk) if chunk is not None else 0
        if chunk_i and sites is None:
            raise ScheduleError(f"task token {text!r}: a .chunk suffix needs sites= to compute the stage")
        return cls(site + chunk_i * (sites or 1), mb, kind)


def dependencies(task: Task, stages: int) -> tuple[Task, ...]:
    """Tasks whose results `task` consumes, for a pipeline of `stages` (virtual) stages."""
    s, m = task.stage, task.microbatch
    if task.kind == "F":
        return (Task(s - 1, m, "F"),) if s > 0 else ()
    if task.kind == "B":
        return (Task(s, m, "F"),) + ((Task(s + 1, m, "B"),) if s + 1 < stages else ())
    return (Task(s, m, "B"),)


Duration = Callable[[int, Task], float]
Transfer = Callable[[int, int, Task], "float | tuple[float, float] | None"]


@dataclass(frozen=True)
class Event:
    """One interval on one site's timeline; times in seconds. Transfers sit on the sending site."""

    site: int
    name: str
    start: float
    end: float
    stage: int | None = None
    microbatch: int | None = None
    kind: str | None = None
    category: str = "compute"  # "compute" | "transfer"
    dst_site: int | None = None
    nbytes: int = 0

    @property
    def duration(self) -> float:
        return self.end - self.start


def _cost(value, what: str) -> tuple[float, float]:
    """(occupancy, latency) from a transfer callback's answer."""
    if value is None:
        return 0.0, 0.0
    pair = value if isinstance(value, tuple) else (value, 0.0)
    if len(pair) != 2 or not all(isinstance(x, (int, float)) and x >= 0 for x in pair):
        raise ScheduleError(f"{what}: expected seconds >= 0 or a pair (occupancy, latency), got {value!r}")
    return float(pair[0]), float(pair[1])


def simulate(orders: Sequence[Sequence[Task]], sites: int, *, duration: Duration,
             transfer: Transfer | None = None) -> list[Event]:
    """Time `orders` (per site, in execution order); returns compute and transfer events.

    duration(site, task) -> seconds. transfer(src_site, dst_site, producer_task) -> seconds, (occupancy,
    latency), or None for free; with transfer=None no transfer events are recorded. Raises ScheduleError on a
    duplicate task, a dependency no site runs, or a deadlock (naming where each site is stuck).
    """
    if len(orders) != sites:
        raise ScheduleError(f"simulate: expected one order per site ({sites}), got {len(orders)}")
    site_of: dict[Task, int] = {}
    for d, order in enumerate(orders):
        for task in order:
            if task in site_of:
                raise ScheduleError(f"site {d}: duplicate task {task.describe()} (also on site {site_of[task]})")
            site_of[task] = d
    stages = 1 + max((t.stage for t in site_of), default=0)
    consumers: dict[Task, set[int]] = {}  # producer -> other sites that need its output
    for task, d in site_of.items():
        for dep in dependencies(task, stages):
            if dep not in site_of:
                raise ScheduleError(f"site {d}: {task.describe()} needs {dep.describe()}, which no site runs; "
                                    "add it to a site's order")
            if site_of[dep] != d:
                consumers.setdefault(dep, set()).add(d)

    events: list[Event] = []
    done: dict[Task, float] = {}  # task -> end time
    arrival: dict[tuple[Task, int], float] = {}  # (producer, dst site) -> when its output is there
    link_free: dict[tuple[int, int], float] = {}
    site_free, nxt = [0.0] * sites, [0] * sites
    progressed = True
    while progressed:
        progressed = False
        for d in range(sites):
            while nxt[d] < len(orders[d]):
                task = orders[d][nxt[d]]
                deps = dependencies(task, stages)
                if any(dep not in done for dep in deps):
                    break
                start = max([site_free[d]] + [done[x] if site_of[x] == d else arrival[(x, d)] for x in deps])
                cost = duration(d, task)
                if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
                    raise ScheduleError(f"duration(site={d}, task={task.describe()}): expected seconds >= 0, "
                                        f"got {cost!r}")
                end = start + cost
                events.append(Event(d, task.token(sites), start, end, task.stage, task.microbatch, task.kind))
                done[task], site_free[d], nxt[d], progressed = end, end, nxt[d] + 1, True
                for dst in sorted(consumers.get(task, ())):
                    occ, lat = _cost(transfer(d, dst, task) if transfer else None,
                                     f"transfer(src={d}, dst={dst}, task={task.describe()})")
                    t0 = max(end, link_free.get((d, dst), 0.0))
                    link_free[(d, dst)] = t0 + occ
                    arrival[(task, dst)] = t0 + occ + lat
                    if transfer is not None:
                        events.append(Event(d, f"{task.token(sites)} {d}->{dst}", t0, t0 + occ + lat, task.stage,
                                            task.microbatch, task.kind, "transfer", dst))
    if len(done) < len(site_of):
        raise ScheduleError(_deadlock_message(orders, nxt, done, site_of, stages))
    return events


def _deadlock_message(orders, nxt, done, site_of, stages) -> str:
    parts = []
    for d, order in enumerate(orders):
        if nxt[d] >= len(order):
            continue
        task = order[nxt[d]]
        waits = []
        for dep in dependencies(task, stages):
            if dep in done:
                continue
            s = site_of[dep]
            later = "later in its own order" if s == d else f"on site {s}, stuck behind {orders[s][nxt[s]].describe()}"
            waits.append(f"{dep.describe()} ({later})")
        parts.append(f"site {d} is stuck at {task.describe()} waiting for {', '.join(waits)}")
    return (f"deadlock after {len(done)} of {len(site_of)} tasks: " + "; ".join(parts)
            + ". Reorder the sites so every task's inputs can be produced first")


def makespan(events: Sequence[Event]) -> float:
    """Last end minus first start (0 for no events); works for simulated and wall-clock timestamps."""
    if not events:
        return 0.0
    return max(e.end for e in events) - min(e.start for e in events)


def busy_fraction(events: Sequence[Event], sites: int) -> list[float]:
    """Per site: compute time / makespan (transfers do not count as busy)."""
    span = makespan(events)
    busy = [0.0] * sites
    for e in events:
        if e.category == "compute":
            if not 0 <= e.site < sites:
                raise ScheduleError(f"busy_fraction: event {e.name!r} is on site {e.site}, expected 0..{sites - 1}")
            busy[e.site] += e.duration
    return [b / span if span > 0 else 0.0 for b in busy]


def bubble_fraction(events: Sequence[Event], sites: int) -> float:
    """1 - total compute / (sites * makespan): the idle share of the whole pipeline."""
    return 1.0 - sum(busy_fraction(events, sites)) / sites
