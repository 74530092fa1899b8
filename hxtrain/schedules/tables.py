"""Pipeline schedules as plain data: per-site task orders that the executor walks and the simulator times.

Model: `S` sites in a chain, `M` microbatches, `v` virtual stages (chunks) per site, so `S*v` stages; stage `s`
lives on site `s % S` (Megatron interleaving: site d holds stages d, d+S, d+2S, ...). A `Task` is one
`(stage, microbatch, kind)` with kind "F" (forward), "B" (backward; for split-backward schedules only the
input-gradient part) or "W" (weight gradient, split-backward schedules only). Dependencies:

    F(s,m) <- F(s-1,m)            (s > 0)
    B(s,m) <- F(s,m), B(s+1,m)    (the latter for s < S*v-1)
    W(s,m) <- B(s,m)

Table syntax (`UserTable`, `Task.parse`, `Task.token`): a token is `<kind><microbatch>[.<chunk>]`, e.g. "F3" or
"B0.1"; the chunk is the site-local virtual stage (default 0, so "F3", "B3", "W3" with `virtual = 1`): on site d of
S sites "F0.1" is stage d + 1*S.

Pure Python on purpose: schedules are tested and planned with no device.
"""

from __future__ import annotations

import abc
import os
import tomllib
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from hxtrain.schedules.simulate import KINDS, ScheduleError, Task, dependencies, simulate  # the first four re-exported here
from hxtrain.schedules.latency import latency_extra, name_extra  # latency_extra re-exported here


def _check_counts(sites, microbatches, who: str) -> None:
    for arg, value in (("sites", sites), ("microbatches", microbatches)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{who}: {arg} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Schedule(abc.ABC):
    """A pipeline schedule: per-site task orders for any (sites, microbatches) it supports."""

    name: str
    virtual: int = 1
    split_backward: bool = False

    @abc.abstractmethod
    def _orders(self, sites: int, microbatches: int) -> list[list[Task]]:
        """Per-site task lists; arguments already checked."""

    def site_orders(self, sites: int, microbatches: int) -> tuple[tuple[Task, ...], ...]:
        """Per site (index = site), the tasks in the order that site runs them."""
        _check_counts(sites, microbatches, f"{self.name}.site_orders")
        return tuple(tuple(order) for order in self._orders(sites, microbatches))

    def tasks(self, sites: int, microbatches: int) -> tuple[Task, ...]:
        """One global dependency-respecting order for a single-threaded host executor.

        Unit-time list scheduling of `site_orders`: every task takes 1, no transfer cost; sorted by (start, site),
        so tasks that could run at the same time on different sites are adjacent and the host can issue them
        back to back (JAX dispatch is asynchronous).
        """
        events = simulate(self.site_orders(sites, microbatches), sites, duration=lambda site, task: 1.0)
        events.sort(key=lambda e: (e.start, e.site))
        return tuple(Task(e.stage, e.microbatch, e.kind) for e in events)


def _one_f_one_b(site: int, sites: int, microbatches: int, extra: int = 0) -> list[Task]:
    # Warm-up fills the pipe below this site (and `extra` more, to cover a link's round trip; the last site waits
    # on no link for its backward); then one F, one B; cool-down drains the remaining B's.
    warm = min(sites - site - 1 + (extra if site < sites - 1 else 0), microbatches)
    order = [Task(site, m, "F") for m in range(warm)]
    for i in range(microbatches - warm):
        order += [Task(site, warm + i, "F"), Task(site, i, "B")]
    return order + [Task(site, m, "B") for m in range(microbatches - warm, microbatches)]


@dataclass(frozen=True, kw_only=True)
class GPipe(Schedule):
    """All forwards, then all backwards, per site (peak live activations = M)."""

    name: str = "gpipe"

    def __post_init__(self):
        if self.virtual != 1 or self.split_backward:
            raise ScheduleError(f"GPipe: virtual must be 1 and split_backward False, got {self.virtual}, "
                                f"{self.split_backward}; use Interleaved or ZBH1 for those")

    def _orders(self, sites, microbatches):
        return [[Task(d, m, k) for k in "FB" for m in range(microbatches)] for d in range(sites)]


@dataclass(frozen=True, kw_only=True)
class OneFOneB(Schedule):
    """1F1B (PipeDream-flush): min(S-d-1, M) warm-up forwards on site d, then alternate F and B, then the B's.

    `extra` = k > 0 is the latency-aware variant "1f1b:k": k more warm-up forwards on every site but the last, so
    that while a cotangent makes its round trip over a slow link the site still has forwards to run (k = the
    round trip / one microbatch's F + B, `latency_extra`). Site d then holds min(S-d+k, M) stage inputs (the last
    site 1) instead of min(S-d, M): k more activations of memory for a bubble that no longer grows with latency."""

    name: str = ""
    extra: int = 0

    def __post_init__(self):
        if self.virtual != 1 or self.split_backward:
            raise ScheduleError(f"OneFOneB: virtual must be 1 and split_backward False, got {self.virtual}, "
                                f"{self.split_backward}; use Interleaved or ZBH1 for those")
        name_extra(self, "OneFOneB", "1f1b")

    def _orders(self, sites, microbatches):
        return [_one_f_one_b(d, sites, microbatches, self.extra) for d in range(sites)]


@dataclass(frozen=True, kw_only=True)
class Interleaved(Schedule):
    """Interleaved 1F1B with `virtual` chunks per site (Megatron-LM, Narayanan et al. 2021).

    Forwards go in groups of G = S microbatches: chunk 0 of the group, then chunk 1, ...; backwards the same with
    the chunks reversed. Site d runs min(2*(S-d-1) + (v-1)*G, v*M) warm-up forwards, then alternates one F and
    one B, then drains. When M is not a multiple of G the table is built for M rounded up and the padding
    microbatches are dropped: valid and deadlock-free for every (S, M), at the price of a bigger bubble (their
    slots stay idle); a smaller last group, as in newer Megatron, deadlocks for some (S, M, v).

    `extra` = k > 0 is the latency-aware variant "interleaved:v:k": groups of G = S + k microbatches, so that a
    chunk's output still has k more microbatches of work behind it on the next site while it crosses a slow link
    (every site sends over a link in an interleaved pipeline, the last back to the first); (v-1) k more inputs
    held per site. Deadlock-free for every (S, M, v, k) tested (`tests/test_schedules.py`).
    """

    name: str = ""
    virtual: int = 2
    extra: int = 0

    def __post_init__(self):
        if not isinstance(self.virtual, int) or self.virtual < 2:
            raise ScheduleError(f"Interleaved.virtual: expected an int >= 2, got {self.virtual!r}; "
                                "for one chunk per site use OneFOneB()")
        if self.split_backward:
            raise ScheduleError("Interleaved: split_backward is not supported; use ZBH1 for split backward")
        name_extra(self, "Interleaved", "interleaved" if self.extra == 0 else f"interleaved:{self.virtual}")

    def _orders(self, sites, microbatches):
        # Megatron's table for M rounded up to whole groups (its warm-up counts are right only for those), less the
        # padding microbatches: dropping tasks keeps a table deadlock-free (a cycle without them is one with them).
        v, group, orders = self.virtual, sites + self.extra, []
        padded = -(-microbatches // group) * group
        for d in range(sites):
            fwd = [Task(d + c * sites, g + i, "F") for g in range(0, padded, group) for c in range(v)
                   for i in range(group)]
            bwd = [Task(d + c * sites, g + i, "B") for g in range(0, padded, group) for c in reversed(range(v))
                   for i in range(group)]
            warm = min(2 * (sites - d - 1) + (v - 1) * group, len(fwd))
            order = fwd[:warm]
            for k in range(len(fwd) - warm):
                order += [fwd[warm + k], bwd[k]]
            orders.append([t for t in order + bwd[len(fwd) - warm:] if t.microbatch < microbatches])
        return orders


@dataclass(frozen=True, kw_only=True)
class ZBH1(Schedule):
    """Zero-bubble ZB-H1 (Qi et al. 2023): 1F1B's F/B order, W's placed into the bubbles.

    Construction (unit costs F = B = W = 1, the paper's assumption): run 1F1B's F and B sequence on every site;
    whenever a site's next F/B cannot start at this time step (input not there yet, or an F would exceed
    min(S, M) microbatches whose W has not run) it runs its oldest pending W instead; leftover W's go last.
    Peak live activations (F done, W not yet) <= min(S, M) on every site: 1F1B's peak (site 0's).

    `extra` = k > 0 is the latency-aware variant "zb-h1:k", built the same way on 1f1b:k's F/B sequence (k more
    warm-up forwards on every site but the last) with the cap raised to min(S + k, M) on those sites (the last
    keeps min(S, M)): microbatches in flight cover a slow link's round trip as in 1f1b:k, and the W's still fill
    what is left of the bubbles.
    """

    name: str = ""
    split_backward: bool = True
    extra: int = 0

    def __post_init__(self):
        if self.virtual != 1 or not self.split_backward:
            raise ScheduleError(f"ZBH1: virtual must be 1 and split_backward True, got {self.virtual}, "
                                f"{self.split_backward}")
        name_extra(self, "ZBH1", "zb-h1")

    def _orders(self, sites, microbatches):
        fb = [_one_f_one_b(d, sites, microbatches, self.extra) for d in range(sites)]
        # at most this many F's without their W per site: ZB-H1's min(S, M); k more where a link's round trip
        # must be covered (every site but the last, as in 1f1b:k)
        cap = [min(sites + (self.extra if d < sites - 1 else 0), microbatches) for d in range(sites)]
        end: dict[Task, int] = {}  # task -> unit time step at which it finished
        nxt, inflight = [0] * sites, [0] * sites
        pending: list[list[Task]] = [[] for _ in range(sites)]
        out: list[list[Task]] = [[] for _ in range(sites)]
        t, left = 0, 3 * sites * microbatches
        while left:
            finished = []
            for d in range(sites):
                task = fb[d][nxt[d]] if nxt[d] < len(fb[d]) else None
                ready = task is not None and all(end.get(x, t + 1) <= t for x in dependencies(task, sites))
                if ready and (task.kind != "F" or inflight[d] < cap[d]):
                    nxt[d] += 1
                    inflight[d] += task.kind == "F"
                    if task.kind == "B":
                        pending[d].append(Task(task.stage, task.microbatch, "W"))
                elif pending[d]:
                    task = pending[d].pop(0)
                    inflight[d] -= 1
                else:
                    continue
                out[d].append(task)
                finished.append(task)
            for task in finished:
                end[task] = t + 1
            left -= len(finished)
            t += 1
            if t > 4 * sites * microbatches + 4 * sites:  # 1F1B never stalls this long; guard against a bug
                raise ScheduleError(f"ZBH1: construction stalled at step {t} for S={sites}, M={microbatches}")
        return out


def _parse_site(text_or_tasks, site: int, sites: int) -> tuple[Task, ...]:
    items = text_or_tasks.replace(",", " ").split() if isinstance(text_or_tasks, str) else list(text_or_tasks)
    return tuple(x if isinstance(x, Task) else Task.parse(x, site=site, sites=sites) for x in items)


@dataclass(frozen=True, kw_only=True)
class UserTable(Schedule):
    """A hand-written table: `orders[d]` is site d's tasks, as a string "F0 F1 B0 B1" or a sequence of Tasks.

    The table fixes S = len(orders) and M = 1 + the largest microbatch named; it is validated on construction.
    `UserTable.load(path)` reads TOML: `sites = ["F0 F1 B0 B1", "F0 B0 F1 B1"]`, optional `virtual = 2`
    (tokens then name chunks: "F0.1"), optional `split_backward = true` (tokens "W0"), optional `name`.
    """

    orders: tuple[tuple[Task, ...], ...] = field(kw_only=False)
    name: str = "table"

    def __post_init__(self):
        if isinstance(self.orders, str) or not isinstance(self.orders, Sequence) or not self.orders:
            raise ScheduleError(f"UserTable.orders: expected a non-empty list with one order per site, "
                                f"got {self.orders!r}")
        sites = len(self.orders)
        orders = tuple(_parse_site(o, d, sites) for d, o in enumerate(self.orders))
        object.__setattr__(self, "orders", orders)
        tasks = [t for o in orders for t in o]
        if not tasks:
            raise ScheduleError("UserTable.orders: the table has no tasks")
        validate(orders, sites, self.microbatches, self.virtual, self.split_backward)

    @property
    def sites(self) -> int:
        return len(self.orders)

    @property
    def microbatches(self) -> int:
        return 1 + max(t.microbatch for o in self.orders for t in o)

    def _orders(self, sites, microbatches):
        if (sites, microbatches) != (self.sites, self.microbatches):
            raise ScheduleError(f"{self.name}: this table is for sites={self.sites}, microbatches="
                                f"{self.microbatches}; got sites={sites}, microbatches={microbatches} "
                                "(change the run or write a table for it)")
        return [list(o) for o in self.orders]

    @classmethod
    def load(cls, path: str | os.PathLike) -> UserTable:
        """Read a TOML table (see the class docstring)."""
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ScheduleError(f"schedule table {str(path)!r}: file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ScheduleError(f"schedule table {str(path)!r}: not valid TOML ({e})") from None
        known = {"sites", "virtual", "split_backward", "name"}
        if unknown := sorted(set(data) - known):
            raise ScheduleError(f"schedule table {str(path)!r}: unknown keys {unknown}; expected {sorted(known)}")
        sites = data.get("sites")
        if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
            raise ScheduleError(f"schedule table {str(path)!r}: 'sites' must be a list of strings like "
                                f"\"F0 F1 B0 B1\", got {sites!r}")
        virtual, split = data.get("virtual", 1), data.get("split_backward", False)
        if not isinstance(virtual, int) or isinstance(virtual, bool) or virtual < 1:
            raise ScheduleError(f"schedule table {str(path)!r}: 'virtual' must be an int >= 1, got {virtual!r}")
        if not isinstance(split, bool):
            raise ScheduleError(f"schedule table {str(path)!r}: 'split_backward' must be true/false, got {split!r}")
        name = data.get("name", os.path.splitext(os.path.basename(str(path)))[0])
        return cls(sites, virtual=virtual, split_backward=split, name=str(name))


_NAMES = ("gpipe", "1f1b", "1f1b:<k>", "interleaved", "interleaved:<v>", "interleaved:<v>:<k>", "zb-h1", "zb-h1:<k>",
          "zbh1", "<path>.toml")


def get_schedule(name: str | Schedule) -> Schedule:
    """Schedule by name: 'gpipe', '1f1b', '1f1b:2' (latency-aware, 2 more in flight), 'interleaved' (v=2),
    'interleaved:3', 'zb-h1'/'zbh1', or a .toml path."""
    if isinstance(name, Schedule):
        return name
    if not isinstance(name, str):
        raise ScheduleError(f"schedule: expected a name, got {name!r}; choices: {', '.join(_NAMES)}")
    key = name.strip().lower()
    if key.endswith(".toml"):
        return UserTable.load(name.strip())
    simple = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved": Interleaved, "zb-h1": ZBH1, "zbh1": ZBH1}
    if key in simple:
        return simple[key]()
    for prefix, cls in (("1f1b:", OneFOneB), ("zb-h1:", ZBH1), ("zbh1:", ZBH1)):
        if key.startswith(prefix):
            k = key.split(":", 1)[1]
            if not k.isdigit():
                raise ScheduleError(f"schedule {name!r}: expected '{prefix}<extra microbatches in flight>', e.g. "
                                    f"'{prefix}2'")
            return cls(extra=int(k))
    if key.startswith("interleaved:"):
        v, _, k = key.split(":", 1)[1].partition(":")
        if not v.isdigit() or not (k.isdigit() or key.count(":") == 1):
            raise ScheduleError(f"schedule {name!r}: expected 'interleaved:<int virtual stages>[:<extra microbatches "
                                "in flight>]', e.g. 'interleaved:3' or 'interleaved:2:4'")
        return Interleaved(virtual=int(v), extra=int(k or 0))
    raise ScheduleError(f"unknown schedule {name!r}; choices: {', '.join(_NAMES)}")


def validate(orders: Sequence[Sequence[Task]], sites: int, microbatches: int, virtual: int = 1,
             split_backward: bool = False, forward_only: bool = False) -> None:
    """Raise ScheduleError unless `orders` runs every task exactly once, on its site, in a deadlock-free order
    (`forward_only`: F tasks only, as `schedules.forward.ForwardOnly` gives)."""
    _check_counts(sites, microbatches, "validate")
    if len(orders) != sites:
        raise ScheduleError(f"validate: expected one order per site ({sites}), got {len(orders)}")
    stages = sites * virtual
    kinds = ("F",) if forward_only else ("F", "B", "W") if split_backward else ("F", "B")
    where: dict[Task, tuple[int, int]] = {}
    for d, order in enumerate(orders):
        for i, task in enumerate(order):
            if not isinstance(task, Task):
                raise ScheduleError(f"site {d}: entry {i} is {task!r}, expected a Task")
            if task.kind not in kinds:
                raise ScheduleError(f"site {d}: {task.describe()} has kind {task.kind!r} but this schedule only "
                                    f"has {kinds}" + (" (set split_backward for W tasks)" if task.kind == "W" else ""))
            if task.stage >= stages or task.microbatch >= microbatches:
                raise ScheduleError(f"site {d}: {task.describe()} is out of range: stages 0..{stages - 1}, "
                                    f"microbatches 0..{microbatches - 1}")
            if task.stage % sites != d:
                raise ScheduleError(f"site {d}: {task.describe()} is on the wrong site; stage {task.stage} "
                                    f"lives on site {task.stage % sites}")
            if task in where:
                raise ScheduleError(f"site {d}: duplicate task {task.describe()} at positions {where[task][1]} "
                                    f"and {i}")
            where[task] = (d, i)
    for s in range(stages):
        for m in range(microbatches):
            for k in kinds:
                if Task(s, m, k) not in where:
                    raise ScheduleError(f"site {s % sites}: missing task {Task(s, m, k).describe()}")
    for task, (d, i) in where.items():
        before = {"B": "F", "W": "B"}.get(task.kind)
        j = where[Task(task.stage, task.microbatch, before)][1] if before else -1
        if j > i:
            raise ScheduleError(f"site {d}: {task.describe()} at position {i} comes before its "
                                f"{before}{task.microbatch} at position {j}")
    simulate(orders, sites, duration=lambda site, task: 1.0)  # deadlock check: a unit-time run must finish


def analytic_bubble(name: str | Schedule, sites: int, microbatches: int, virtual: int = 1) -> float:
    """Idle fraction of a schedule under unit costs (what `bubble_fraction` of a unit-time simulation gives).

    gpipe, 1f1b: (S-1)/(M+S-1) (F = B = 1, or any F:B ratio). interleaved: (S-1)/(v*M+S-1) with each chunk's F =
    B = 1; v is `virtual` when given (> 1), else the schedule's. zb-h1: (S-1)/(3M+S-1) with F = B = W = 1, i.e.
    a bubble of (S-1) units against 1F1B's 3(S-1) (Qi et al. 2023); exact for M >= S (tested), a lower bound
    below that.
    """
    sched = get_schedule(name)
    _check_counts(sites, microbatches, "analytic_bubble")
    s, m = sites, microbatches
    if isinstance(sched, GPipe) or (isinstance(sched, OneFOneB) and sched.extra == 0):
        return (s - 1) / (m + s - 1)
    if isinstance(sched, Interleaved) and sched.extra == 0:
        v = virtual if virtual > 1 else sched.virtual
        return (s - 1) / (v * m + s - 1)
    if isinstance(sched, ZBH1) and sched.extra == 0:
        return (s - 1) / (3 * m + s - 1)
    raise ScheduleError(f"analytic_bubble: no formula for schedule {sched.name!r}; simulate it instead "
                        "(bubble_fraction(simulate(...)))")


def live_activations(order: Iterable[Task]) -> int:
    """Peak number of stage inputs one site holds: F done, its last backward part (W if split, else B) not yet.
    A forward-only order holds none (no backward will need them)."""
    order = list(order)
    if all(t.kind == "F" for t in order):
        return 0
    release = "W" if any(t.kind == "W" for t in order) else "B"
    live = peak = 0
    for t in order:
        if t.kind == "F":
            live += 1
            peak = max(peak, live)
        elif t.kind == release:
            live -= 1
    return peak
