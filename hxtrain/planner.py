"""Planner: which layers run on which site, how each site splits its devices, and what a step will cost.

`plan(topology, model_cfg, ...)` chooses, within per-device memory, the (uneven, contiguous) layer partition over
the topology's sites in their pipeline order, `data x tensor` inside each site, the microbatch count, the schedule,
recompute, and each link's codec; and predicts the step with `hxtrain.simulate` fed by `hxtrain.costmodel`.

Search, per candidate (schedule x microbatch count x recompute):
 1. per site and per layer count L, the fastest (data, tensor) that fits memory, as numpy arrays over L: the work
    of one microbatch w_i(L) (non-decreasing in L);
 2. the min-max partition by water-filling: one layer per site, then each next layer to the site whose w_i grows
    least. With sites in a fixed order every vector of counts is a contiguous split, so this is the optimum of the
    bottleneck (the classic greedy for separable min-max allocation);
 3. every (candidate, codec) is ranked by an analytic step estimate; the best few are simulated;
 4. the winner's partition is hill-climbed with the simulator (move one layer between two sites) until no move
    helps or the time budget ends; each link's codec is then relaxed to the least lossy one within 1%.
`exhaustive=True` instead simulates every partition of every candidate: small cases only (the tests check that the
fast search finds the same step time).

The result is a `Plan` with three `Prediction`s (the plan, an even split, cross-site data parallelism); its TOML
form is two files: a topology that `load_topology` reads as is (chosen data/tensor/layers/codecs and the `[run]`)
and the plan itself (`[plan]`, `[predicted]`, ...), which names the topology file by a relative path
(`hxtrain.plan_file`).
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from hxtrain import costmodel as cm

DEFAULT_SCHEDULES = ("1f1b", "zb-h1", "interleaved", "gpipe")
DEFAULT_CODECS = ("none", "bf16", "int8", "fp8")  # least lossy first: ties go to the earlier one
MAX_TENSOR = 8  # tensor parallelism stays inside one node (8 accelerators per host on every shipped mesh)
_TIE = 1e-3  # a lossier codec or a later schedule must be faster by more than this fraction to be chosen
_CODEC_TIE = 0.01  # a less lossy codec is kept if it costs at most 1% of step time (precision is worth that)
_SIMULATE_TOP = 4  # candidates simulated after the analytic ranking
_MAX_EXHAUSTIVE = 200_000  # simulations an exhaustive search may run


class PlanError(ValueError):
    """No plan exists for these inputs (nothing fits, a batch that cannot be split, ...); the message says why."""


@dataclass(frozen=True)
class SitePlan:
    """One site in a prediction: its layers and device shape, compute seconds per step, memory per device."""

    name: str
    layers: int
    data: int
    tensor: int
    devices: int
    busy_s: float
    utilisation: float  # busy_s / step_s
    memory_gib: float  # predicted per device
    memory_limit_gib: float  # the device's memory (the planner fills at most Assumptions.memory_fraction of it)


@dataclass(frozen=True)
class LinkPlan:
    """One link in a prediction: codecs, bytes each way per step, the bandwidth that needs vs what it has."""

    sites: tuple[str, str]
    activations: str
    cotangents: str
    bytes_per_step: float  # each way (activations forward = cotangents back in size)
    needed_gbps: float  # bytes_per_step * 8 / step time
    available_gbps: float
    latency_ms: float


@dataclass(frozen=True)
class Prediction:
    """Predicted figures of one way to run the step (the plan, an even split, or cross-site data parallelism)."""

    label: str
    fits: bool  # False: shown for comparison, but some site runs out of memory (see notes)
    step_s: float
    tokens_per_s: float
    fraction_of_ideal: float  # tokens_per_s / sum of the sites' capacities
    bubble: float  # idle share of all sites over the step
    schedule: str
    microbatches: int
    recompute: bool
    sites: tuple[SitePlan, ...]
    links: tuple[LinkPlan, ...]
    notes: tuple[str, ...] = ()

    def with_ideal(self, ideal: float) -> Prediction:
        return replace(self, fraction_of_ideal=self.tokens_per_s / ideal)


@dataclass(frozen=True)
class Plan:
    """A chosen placement with its predicted figures; `to_toml` writes what `hxtrain train --plan` runs."""

    topology: object  # hxtrain.topology.Topology, as given to plan()
    model: str | None
    global_batch: int
    seq: int
    predicted: Prediction
    even: Prediction | None
    cross_site_dp: Prediction | None
    ideal_tokens_per_s: float
    warnings: tuple[str, ...]
    assumptions: cm.Assumptions
    planning_s: float

    @property
    def schedule(self) -> str:
        return self.predicted.schedule

    @property
    def microbatches(self) -> int:
        return self.predicted.microbatches

    @property
    def recompute(self) -> bool:
        return self.predicted.recompute

    @property
    def layers(self) -> tuple[int, ...]:
        return tuple(s.layers for s in self.predicted.sites)

    def to_topology(self):
        """The topology with this plan applied: each site's data/tensor/layers, link codecs, and the [run]."""
        topo = self.topology
        by_site = {s.name: s for s in self.predicted.sites}
        by_link = {frozenset(lp.sites): lp for lp in self.predicted.links}
        sites = tuple(replace(s, data=by_site[s.name].data, tensor=by_site[s.name].tensor,
                              layers=by_site[s.name].layers) for s in topo.sites)
        links = tuple(replace(ln, activations=by_link[frozenset(ln.sites)].activations,
                              cotangents=by_link[frozenset(ln.sites)].cotangents)
                      if frozenset(ln.sites) in by_link else ln for ln in topo.links)
        run = replace(topo.run, model=self.model or topo.run.model, schedule=self.schedule,
                      microbatches=self.microbatches, batch_size=self.global_batch)
        return replace(topo, sites=sites, links=links, run=run)

    def to_toml(self, path) -> tuple[Path, Path]:
        """Write the plan to `path` and its topology next to it (`<stem>.topology.toml`); returns both paths."""
        from hxtrain.plan_file import write_plan

        return write_plan(self, path)

    @classmethod
    def load(cls, path) -> Plan:
        """Read a plan written by `to_toml` (and the topology file it names)."""
        from hxtrain.plan_file import load_plan

        return load_plan(path)


@dataclass(frozen=True)
class _Ctx:
    """Everything about one planning problem that does not depend on the choices."""

    topo: object
    shape: cm.ModelShape
    hw: tuple[cm.Hardware, ...]
    caps: tuple[float, ...]  # usable bytes per device per site
    profiles: tuple[cm.SiteProfile | None, ...]
    batch: int
    seq: int
    a: cm.Assumptions
    links: tuple[object, ...]  # Link between site i and i+1
    wrap: object | None  # Link between the last and first site (interleaving needs it), if any

    @property
    def S(self) -> int:
        return len(self.hw)


@dataclass(frozen=True)
class _Option:
    """One (schedule, microbatches, recompute) candidate with its task orders and live-activation counts."""

    schedule: str
    rank: int  # position in the user's schedule list (ties go to the earlier)
    sched: object
    microbatches: int
    recompute: bool
    orders: tuple
    live: tuple[int, ...]  # peak live (stage, microbatch) inputs per site

    @property
    def v(self) -> int:
        return self.sched.virtual

    @property
    def split(self) -> bool:
        return self.sched.split_backward


@dataclass(frozen=True)
class _Table:
    """One site under one option, indexed by layers - 1: the chosen shape and its per-microbatch costs."""

    costs: tuple[cm.StageCosts, ...]
    choice: np.ndarray  # index into costs
    fwd: np.ndarray  # seconds per microbatch on this site: all forwards
    bwd: np.ndarray  # input-grad (+ weight-grad when not split)
    wgt: np.ndarray  # weight-grad (split schedules)
    mem: np.ndarray  # bytes per device
    exposed: np.ndarray  # once-per-step data-parallel gradient sync not hidden behind the last backward
    work: np.ndarray  # fwd + bwd + wgt + dispatch; inf where nothing fits


@dataclass(frozen=True)
class _Cand:
    opt: _Option
    tables: tuple[_Table, ...]
    layers: tuple[int, ...]
    codecs: tuple[str, ...]  # per link in _link_list order
    step: float = math.inf
    events: tuple = ()


def plan(topology, model_cfg, *, global_batch: int | None = None, seq: int | None = None,
         schedules=DEFAULT_SCHEDULES, codecs=DEFAULT_CODECS, microbatch_choices=None,
         efficiency: float | None = None, assumptions: cm.Assumptions | None = None,
         profiles: dict | None = None, hardware: dict | None = None, exhaustive: bool = False,
         time_budget_s: float = 1.0, model_name: str | None = None, capability=None) -> Plan:
    """Plan a run of `model_cfg` (GPTConfig-like) on `topology` (a hxtrain.topology.Topology).

    global_batch: sequences per step (default: the topology's run.batch_size); seq: tokens per sequence (default
    model_cfg.seq_len); microbatch_choices: microbatch counts to try (default: divisors of the batch);
    profiles: {site name: SiteProfile} measured block times; hardware: {site name: Hardware} overrides of the
    capability table; capability: device_kind -> Capability (default hxtrain.backends.capability_for).
    Raises PlanError when nothing fits or the inputs are inconsistent.
    """
    t0 = time.perf_counter()
    a = assumptions or cm.Assumptions()
    if efficiency is not None:
        a = cm.Assumptions(**{**a.__dict__, "efficiency": efficiency})
    ctx = _context(topology, model_cfg, global_batch, seq, a, profiles or {}, hardware or {}, capability)
    codecs = _check_codecs(codecs)
    options = _options(ctx, schedules, microbatch_choices)
    # The budget bounds the optional refinements (hill climbing, codec relaxation), never the first answer.
    climb, relax = t0 + 0.5 * time_budget_s, t0 + 0.7 * time_budget_s
    best = _search(ctx, options, codecs, exhaustive=exhaustive, climb_until=climb, relax_until=relax)
    if best is None:
        raise _no_fit_error(ctx, options, model_name)
    planned = _prediction("planned", ctx, best)
    even = _even(ctx, options, codecs, t0 + 0.85 * time_budget_s)
    dp = _cross_site_dp(ctx)
    ideal = _ideal(ctx)
    warnings = _warnings(ctx, best, planned, dp, ideal)
    fix = lambda p: p and p.with_ideal(ideal)  # noqa: E731
    return Plan(topology=topology, model=model_name, global_batch=ctx.batch, seq=ctx.seq, predicted=fix(planned),
                even=fix(even), cross_site_dp=fix(dp), ideal_tokens_per_s=ideal, warnings=tuple(warnings),
                assumptions=a, planning_s=time.perf_counter() - t0)


# --- the problem ---------------------------------------------------------------------------------------------


def _context(topo, cfg, batch, seq, a, profiles, hardware, capability) -> _Ctx:
    shape = cm.ModelShape.of(cfg)
    batch = topo.run.batch_size if batch is None else batch
    seq = shape.seq_len if seq is None else seq
    for name, v in (("global_batch", batch), ("seq", seq)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise PlanError(f"{name}: expected a positive integer, got {v!r}")
    S = len(topo.sites)
    if S > shape.n_layers:
        raise PlanError(f"topology {topo.name!r} has {S} sites but the model has {shape.n_layers} layers; every "
                        "site needs at least one block: use fewer sites or a deeper model")
    for s in topo.sites:
        if isinstance(s.devices, bool) or not isinstance(s.devices, int) or s.devices < 1:
            raise PlanError(f"site {s.name!r}: devices: expected a positive integer, got {s.devices!r}; a site "
                            "with no devices cannot hold layers (remove it from the topology)")
    unknown = set(profiles) | set(hardware)
    unknown -= {s.name for s in topo.sites}
    if unknown:
        raise PlanError(f"profiles/hardware name unknown sites {sorted(unknown)}; sites: "
                        f"{[s.name for s in topo.sites]}")
    hw = tuple(hardware.get(s.name) or cm.hardware_for(s, capability) for s in topo.sites)
    links = tuple(topo.link(x.name, y.name) for x, y in zip(topo.sites, topo.sites[1:]))
    for ln in links:
        if not ln.bandwidth_gbps > 0:
            raise PlanError(f"link {ln.sites[0]}-{ln.sites[1]}: bandwidth_gbps = {ln.bandwidth_gbps!r}; a link "
                            "with no bandwidth cannot carry activations: give a value > 0 Gbit/s")
    wrap = None
    if S > 2:
        wrap = next((ln for ln in topo.links if set(ln.sites) == {topo.sites[0].name, topo.sites[-1].name}), None)
    elif S == 2:
        wrap = links[0]
    return _Ctx(topo, shape, hw, tuple(h.memory_bytes * a.memory_fraction for h in hw),
                tuple(profiles.get(s.name) for s in topo.sites), batch, seq, a, links, wrap)


def _check_codecs(codecs) -> tuple[str, ...]:
    codecs = tuple(codecs)
    bad = [c for c in codecs if c not in cm.CODEC_BYTES]
    if not codecs or bad:
        raise PlanError(f"codecs: expected a non-empty list from {list(cm.CODEC_BYTES)}, got {list(codecs)}")
    return codecs


def _shapes(ctx: _Ctx, i: int, micro: int | None) -> list[tuple[int, int]]:
    """(data, tensor) choices of site i for microbatches of `micro` sequences: all devices used, tensor <= 8
    dividing heads and d_ff, data dividing the microbatch (any data when micro is None); a measured profile
    pins its tensor size."""
    site, sh, prof = ctx.topo.sites[i], ctx.shape, ctx.profiles[i]
    out = []
    for t in range(1, min(MAX_TENSOR, site.devices) + 1):
        if site.devices % t or sh.n_heads % t or sh.d_ff % t or (prof is not None and t != prof.tensor):
            continue
        d = site.devices // t
        if micro is None or micro % d == 0:
            out.append((d, t))
    return out


def _options(ctx: _Ctx, schedules, microbatch_choices) -> list[_Option]:
    from hxtrain.schedules import ScheduleError, get_schedule, live_activations

    if isinstance(schedules, str) or not schedules:
        raise PlanError(f"schedules: expected a non-empty list of names such as {list(DEFAULT_SCHEDULES)}, "
                        f"got {schedules!r}")
    scheds = []
    for name in schedules:
        try:
            scheds.append(get_schedule(name))
        except ScheduleError as e:
            raise PlanError(f"schedules: {e}") from None
    if microbatch_choices is None:
        ms = [m for m in range(1, min(ctx.batch, 256) + 1) if ctx.batch % m == 0]
    else:
        ms = list(microbatch_choices)
        bad = [m for m in ms if isinstance(m, bool) or not isinstance(m, int) or m < 1 or ctx.batch % m]
        if bad or not ms:
            raise PlanError(f"microbatch_choices: {bad or ms} do not divide the global batch of {ctx.batch} "
                            "sequences into equal microbatches; give divisors of the batch")
    ms = [m for m in ms if all(_shapes(ctx, i, ctx.batch // m) for i in range(ctx.S))]
    if not ms:
        raise PlanError(_batch_message(ctx))
    if microbatch_choices is None and len(ms) > 8:  # keep the largest counts: they shrink the bubble
        ms = ms[-8:]
    out = []
    for rank, sched in enumerate(scheds):
        if sched.virtual > 1 and ctx.S > 1 and ctx.wrap is None:
            continue  # interleaving sends the last site's output back to the first: needs that link
        if sched.virtual * ctx.S > ctx.shape.n_layers:
            continue
        for m in ms:
            orders = sched.site_orders(ctx.S, m)
            live = tuple(live_activations(o) for o in orders)
            for rec in (False, True):
                out.append(_Option(sched.name, rank, sched, m, rec, orders, live))
    if not out:
        raise PlanError(f"no schedule of {list(schedules)} can run {ctx.S} sites x {ctx.shape.n_layers} layers "
                        "(interleaving needs a link from the last site back to the first and v layers per site)")
    return out


def _batch_message(ctx: _Ctx) -> str:
    parts = []
    for i, s in enumerate(ctx.topo.sites):
        ds = sorted({d for d, _ in _shapes(ctx, i, None)})
        parts.append(f"{s.name!r} needs a multiple of one of data = {ds}")
    return (f"global batch {ctx.batch}: no microbatch count splits it so that every site's data-parallel size "
            f"divides the microbatch ({'; '.join(parts)}); choose a global batch that is a multiple of the sites' "
            "data sizes (e.g. their least common multiple times the microbatch count)")


# --- per-site tables -----------------------------------------------------------------------------------------


def _table(ctx: _Ctx, opt: _Option, i: int, enforce_memory: bool = True) -> _Table:
    micro = ctx.batch // opt.microbatches
    costs = tuple(cm.stage_costs(ctx.shape, ctx.hw[i], microbatch=micro, seq=ctx.seq, data=d, tensor=t,
                                 recompute=opt.recompute, assumptions=ctx.a, profile=ctx.profiles[i])
                  for d, t in _shapes(ctx, i, micro))
    first, last = float(i == 0), float(i == ctx.S - 1)
    L = np.arange(1, ctx.shape.n_layers - ctx.S + 2, dtype=np.float64)[None, :]  # [1, Lmax]
    col = lambda f: np.array([[f(c)] for c in costs])  # noqa: E731  [options, 1]
    tasks = opt.v * (3 if opt.split else 2)
    fwd = L * col(lambda c: c.block_fwd) + last * col(lambda c: c.head_fwd)
    wgt = L * col(lambda c: c.block_bwd_w) + last * col(lambda c: c.head_bwd_w)
    bwd = L * col(lambda c: c.block_bwd_in) + last * col(lambda c: c.head_bwd_in)
    if not opt.split:
        bwd, wgt = bwd + wgt, 0.0 * wgt
    mem = (L * col(lambda c: c.block_param_bytes) + opt.live[i] * (L / opt.v) * col(lambda c: c.block_act_bytes)
           + col(lambda c: c.block_work_bytes) + first * col(lambda c: c.embed_param_bytes)
           + last * col(lambda c: c.head_param_bytes + c.head_work_bytes))
    sync = (L * col(lambda c: c.dp_sync_per_block) + first * col(lambda c: c.dp_sync_embed)
            + last * col(lambda c: c.dp_sync_head))
    exposed = np.maximum(0.0, sync - bwd - wgt)
    work = fwd + bwd + wgt + tasks * ctx.a.task_overhead_s
    key = opt.microbatches * work + exposed
    if enforce_memory:
        key = np.where(mem <= ctx.caps[i], key, np.inf)
    k = np.argmin(key, axis=0)
    pick = lambda x: np.take_along_axis(np.broadcast_to(x, key.shape), k[None], 0)[0]  # noqa: E731
    w = np.where(np.isfinite(pick(key)), pick(work), np.inf)
    return _Table(costs, k, pick(fwd), pick(bwd), pick(wgt), pick(mem), pick(exposed), w)


# --- partitions ----------------------------------------------------------------------------------------------


def _greedy(tables: tuple[_Table, ...], n_layers: int, least: int) -> tuple[int, ...] | None:
    """Min-max split: `least` layers per site, then each next layer where the work grows least."""
    S = len(tables)
    layers = [least] * S
    if any(not np.isfinite(t.work[least - 1]) for t in tables) or least * S > n_layers:
        return None
    heap = [(_w(t, least + 1), i) for i, t in enumerate(tables)]
    heapq.heapify(heap)
    for _ in range(n_layers - least * S):
        w, i = heapq.heappop(heap)
        if not np.isfinite(w):
            return None
        layers[i] += 1
        heapq.heappush(heap, (_w(tables[i], layers[i] + 1), i))
    return tuple(layers)


def _w(t: _Table, L: int) -> float:
    return float(t.work[L - 1]) if L <= len(t.work) else math.inf


def _compositions(n: int, parts: int, least: int):
    """Every way to write n as `parts` ordered integers >= least."""
    for cuts in itertools.combinations(range(1, n - parts * (least - 1)), parts - 1):
        bounds = (0, *cuts, n - parts * (least - 1))
        yield tuple(b - a + least - 1 for a, b in zip(bounds, bounds[1:]))


def _even_layers(n: int, S: int) -> tuple[int, ...]:
    q, r = divmod(n, S)
    return tuple(q + (i < r) for i in range(S))


def _fits(tables, layers) -> bool:
    return all(np.isfinite(_w(t, L)) for t, L in zip(tables, layers))


# --- links and codecs ----------------------------------------------------------------------------------------


def _link_list(ctx: _Ctx, opt: _Option) -> list[tuple[int, int, object]]:
    """(site, next site, Link) for every link the option's activations cross."""
    out = [(i, i + 1, ln) for i, ln in enumerate(ctx.links)]
    if opt.v > 1 and ctx.S > 2:
        out.append((ctx.S - 1, 0, ctx.wrap))
    return out


def _allowed(ctx: _Ctx, i: int, j: int, codec: str) -> bool:
    if codec != "fp8":
        return True
    a, b = ctx.hw[i], ctx.hw[j]  # NVIDIA e4m3fn and AMD e4m3fnuz differ: a mixed link does not use fp8
    return a.fp8_format is not None and a.fp8_format == b.fp8_format


def _codec_sets(ctx: _Ctx, opt: _Option, codecs: tuple[str, ...]) -> list[tuple[str, ...]]:
    """One uniform assignment per codec; a link that cannot use it keeps the previous allowed one."""
    out = []
    for k, c in enumerate(codecs):
        row = []
        for i, j, _ in _link_list(ctx, opt):
            ok = [x for x in codecs[:k + 1] if _allowed(ctx, i, j, x)]
            row.append(ok[-1] if ok else "none")
        if tuple(row) not in out:
            out.append(tuple(row))
    return out


def _mb_bytes(ctx: _Ctx, opt: _Option, codec: str) -> float:
    return cm.wire_bytes(codec, ctx.batch // opt.microbatches * ctx.seq, ctx.shape.d_model)


def _occupancy(ctx: _Ctx, opt: _Option, ln, codec: str) -> float:
    return _mb_bytes(ctx, opt, codec) * 8.0 / (ln.bandwidth_gbps * 1e9)


# --- evaluation ----------------------------------------------------------------------------------------------


def _estimate(ctx: _Ctx, c: _Cand) -> float:
    """Analytic step time, for ranking only: fill/drain + steady state + link crossings + exposed sync.

    1F1B-like schedules keep only S microbatches in flight, so the steady-state period is also bounded by one
    round trip through every site and link divided by S.
    """
    M, v, S = c.opt.microbatches, c.opt.v, ctx.S
    works = [_w(t, L) for t, L in zip(c.tables, c.layers)]
    trip, bound = sum(works), 0.0
    for (i, j, ln), codec in zip(_link_list(ctx, c.opt), c.codecs):
        occ = _occupancy(ctx, c.opt, ln, codec)
        trip += 2 * (occ + ln.latency_ms * 1e-3)
        bound = max(bound, M * v * occ)
    # Fill and drain: the bottleneck's work once, the rest in 1/v_eff slices (v chunks interleaved; ZB-H1's
    # W tasks fill about 2/3 of 1F1B's bubble, as if v = 3); exact for uniform stages and v = 1.
    v_eff = 3 if c.opt.split else v
    period = max(works) if c.opt.schedule == "gpipe" else max(max(works), trip / (S * v))
    est = (M - 1) * period + max(works) + (trip - max(works)) / v_eff
    return max(est, bound) + max(float(t.exposed[L - 1]) for t, L in zip(c.tables, c.layers))


def _simulate(ctx: _Ctx, c: _Cand, free_links: bool = False) -> _Cand:
    from hxtrain.simulate import simulate

    opt, S, v = c.opt, ctx.S, c.opt.v
    last_stage = S * v - 1
    chunk = [[L // v + (k < L % v) for k in range(v)] for L in c.layers]  # layers of each site's chunk
    sc = [t.costs[int(t.choice[L - 1])] for t, L in zip(c.tables, c.layers)]
    ov = ctx.a.task_overhead_s

    def duration(site, task):
        n, s = chunk[site][task.stage // S], sc[site]
        head = task.stage == last_stage
        if task.kind == "F":
            return n * s.block_fwd + head * s.head_fwd + ov
        if task.kind == "W":
            return n * s.block_bwd_w + head * s.head_bwd_w + ov
        extra = 0.0 if opt.split else n * s.block_bwd_w + head * s.head_bwd_w
        return n * s.block_bwd_in + head * s.head_bwd_in + extra + ov

    cost = {}
    for (i, j, ln), codec in zip(_link_list(ctx, opt), c.codecs):
        pair = (0.0, 0.0) if free_links else (_occupancy(ctx, opt, ln, codec), ln.latency_ms * 1e-3)
        cost[(i, j)] = cost[(j, i)] = pair

    events = simulate(opt.orders, S, duration=duration, transfer=lambda src, dst, task: cost[(src, dst)])
    end = [0.0] * S
    for e in events:
        if e.category == "compute":
            end[e.site] = max(end[e.site], e.end)
    step = max(max(e.end for e in events),
               max(end[i] + float(t.exposed[L - 1]) for i, (t, L) in enumerate(zip(c.tables, c.layers))))
    return _Cand(opt, c.tables, c.layers, c.codecs, step, tuple(events))


def _better(a: _Cand, b: _Cand | None) -> bool:
    """a beats b: faster by more than the tie margin, or tied and simpler (earlier codecs / schedule, no recompute)."""
    if b is None:
        return True
    if a.step < b.step * (1 - _TIE):
        return True
    if a.step > b.step * (1 + _TIE):
        return False
    rank = lambda c: (c.opt.recompute, sum(_CODEC_RANK[x] for x in c.codecs), c.opt.rank, c.step)  # noqa: E731
    return rank(a) < rank(b)


_CODEC_RANK = {c: k for k, c in enumerate(DEFAULT_CODECS)}


def _search(ctx, options, codecs, *, exhaustive, climb_until, relax_until, fixed=None, enforce_memory=True,
            top=_SIMULATE_TOP) -> _Cand | None:
    pool = []
    for opt in options:
        tables = tuple(_table(ctx, opt, i, enforce_memory) for i in range(ctx.S))
        if fixed is not None:
            parts = [fixed] if min(fixed) >= opt.v and _fits(tables, fixed) else []
        elif exhaustive:
            parts = [p for p in _compositions(ctx.shape.n_layers, ctx.S, opt.v) if _fits(tables, p)]
        else:
            p = _greedy(tables, ctx.shape.n_layers, opt.v)
            parts = [p] if p else []
        for p in parts:
            pool += [_Cand(opt, tables, p, cs) for cs in _codec_sets(ctx, opt, codecs)]
    if not pool:
        return None
    if exhaustive:
        if len(pool) > _MAX_EXHAUSTIVE:
            raise PlanError(f"exhaustive search: {len(pool)} simulations is too many (limit {_MAX_EXHAUSTIVE}); "
                            "drop exhaustive=True or narrow schedules/codecs/microbatch_choices")
        top = pool
    else:
        ranked = sorted(pool, key=lambda c: _estimate(ctx, c))
        # The estimate is rough: also simulate the best candidate of every schedule.
        firsts = {c.opt.schedule: c for c in reversed(ranked)}
        chosen = {id(c) for c in ranked[:top]}
        top = ranked[:top] + [c for c in firsts.values() if id(c) not in chosen]
    best = None
    for c in top:
        c = _simulate(ctx, c)
        if _better(c, best):
            best = c
    if fixed is None and not exhaustive:
        best = _hill_climb(ctx, best, climb_until)
    return _relax_codecs(ctx, best, codecs, math.inf if exhaustive else relax_until)


def _hill_climb(ctx: _Ctx, best: _Cand, deadline: float) -> _Cand:
    """Move one layer between two sites while the simulated step improves (all pairs up to 4 sites, else
    neighbours and moves off the busiest site), until no move helps or the deadline passes."""
    seen = {best.layers}
    while time.perf_counter() < deadline:
        S, L = ctx.S, best.layers
        if S <= 4:
            pairs = [(i, j) for i in range(S) for j in range(S) if i != j]
        else:
            busiest = max(range(S), key=lambda i: _w(best.tables[i], L[i]))
            pairs = {(i, i + 1) for i in range(S - 1)} | {(i + 1, i) for i in range(S - 1)}
            pairs |= {(busiest, j) for j in range(S) if j != busiest}
        improved = None
        for i, j in sorted(pairs):
            new = list(L)
            new[i], new[j] = new[i] - 1, new[j] + 1
            new = tuple(new)
            if new in seen or new[i] < best.opt.v or not _fits(best.tables, new):
                continue
            seen.add(new)
            c = _simulate(ctx, _Cand(best.opt, best.tables, new, best.codecs))
            if c.step < (improved or best).step * (1 - 1e-9):
                improved = c
            if time.perf_counter() > deadline:
                break
        if improved is None:
            break
        best = improved
    return best


def _relax_codecs(ctx: _Ctx, best: _Cand, codecs: tuple[str, ...], deadline: float) -> _Cand:
    """Per link, the least lossy codec that costs at most _CODEC_TIE of step time (until `deadline`)."""
    links = _link_list(ctx, best.opt)
    for k, (i, j, _) in enumerate(links):
        if time.perf_counter() > deadline:
            break
        for codec in codecs[:codecs.index(best.codecs[k])] if best.codecs[k] in codecs else ():
            if not _allowed(ctx, i, j, codec):
                continue
            trial = list(best.codecs)
            trial[k] = codec
            c = _simulate(ctx, _Cand(best.opt, best.tables, best.layers, tuple(trial)))
            if c.step <= best.step * (1 + _CODEC_TIE):
                best = c
                break
    return best


# --- predictions ---------------------------------------------------------------------------------------------


def _prediction(label: str, ctx: _Ctx, c: _Cand, fits: bool = True, notes=()) -> Prediction:
    S, opt = ctx.S, c.opt
    busy = [0.0] * S
    for e in c.events:
        if e.category == "compute":
            busy[e.site] += e.end - e.start
    sites = []
    for i, (t, L) in enumerate(zip(c.tables, c.layers)):
        sc = t.costs[int(t.choice[L - 1])]
        s = ctx.topo.sites[i]
        sites.append(SitePlan(s.name, L, sc.data, sc.tensor, s.devices, busy[i], busy[i] / c.step,
                              float(t.mem[L - 1]) / 2**30, ctx.hw[i].memory_bytes / 2**30))
    links = []
    for (i, j, ln), codec in zip(_link_list(ctx, opt), c.codecs):
        crossings = opt.microbatches * (opt.v if j == i + 1 else opt.v - 1)
        nbytes = crossings * _mb_bytes(ctx, opt, codec)  # each way: activations forward, cotangents back
        links.append(LinkPlan((ctx.topo.sites[i].name, ctx.topo.sites[j].name), codec, codec, nbytes,
                              nbytes * 8 / c.step / 1e9, ln.bandwidth_gbps, ln.latency_ms))
    return Prediction(label=label, fits=fits, step_s=c.step, tokens_per_s=ctx.batch * ctx.seq / c.step,
                      fraction_of_ideal=math.nan, bubble=1.0 - sum(busy) / (S * c.step), schedule=opt.schedule,
                      microbatches=opt.microbatches, recompute=opt.recompute, sites=tuple(sites),
                      links=tuple(links), notes=tuple(notes))


def _even(ctx: _Ctx, options, codecs, deadline) -> Prediction:
    layers = _even_layers(ctx.shape.n_layers, ctx.S)
    best = _search(ctx, options, codecs, exhaustive=False, climb_until=0, relax_until=deadline, fixed=layers)
    if best is not None:
        return _prediction("even split", ctx, best)
    best = _search(ctx, options, codecs, exhaustive=False, climb_until=0, relax_until=deadline, fixed=layers,
                   enforce_memory=False)
    if best is None:  # e.g. interleaving with fewer layers than chunks: nothing to show
        return None
    p = _prediction("even split", ctx, best, fits=False)
    over = [f"{s.name} needs {s.memory_gib:.1f} GiB per device (has {s.memory_limit_gib:.0f})"
            for s, cap in zip(p.sites, ctx.caps) if s.memory_gib * 2**30 > cap]
    return replace(p, notes=p.notes + (f"does not fit in memory: {'; '.join(over)}",))


def _cross_site_dp(ctx: _Ctx) -> Prediction | None:
    """Every site holds the whole model; the batch splits over sites in proportion to their speed; gradients are
    all-reduced across sites once per step (a ring: 2 (n-1)/n x params x 4 bytes each way per link), not
    overlapped with compute."""
    sh, a, S = ctx.shape, ctx.a, ctx.S
    rates, fits, over, sites, exposed = [], True, [], [], []
    for i, s in enumerate(ctx.topo.sites):
        best = None
        for rec in (False, True):
            for t in range(1, min(MAX_TENSOR, s.devices) + 1):
                if s.devices % t or sh.n_heads % t or sh.d_ff % t:
                    continue
                d = s.devices // t
                c = cm.stage_costs(sh, ctx.hw[i], microbatch=d, seq=ctx.seq, data=d, tensor=t, recompute=rec,
                                   assumptions=a, profile=ctx.profiles[i] if ctx.profiles[i] and
                                   ctx.profiles[i].tensor == t else None)
                work = (sh.n_layers * (c.block_fwd + c.block_bwd_in + c.block_bwd_w) + 3 * c.head_fwd
                        + 2 * a.task_overhead_s)
                mem = (sh.n_layers * (c.block_param_bytes + c.block_act_bytes) + c.block_work_bytes
                       + c.embed_param_bytes + c.head_param_bytes + c.head_work_bytes)
                sync = sh.n_layers * c.dp_sync_per_block + c.dp_sync_embed + c.dp_sync_head
                ok = mem <= ctx.caps[i]
                cand = (not ok, d / work if ok else -mem, d, t, work, mem, max(0.0, sync - work * 2 / 3))
                if best is None or (cand[0], -cand[1]) < (best[0], -best[1]):
                    best = cand
        bad, _, d, t, work, mem, exp = best
        if bad:
            fits = False
            over.append(f"{s.name} needs {mem / 2**30:.1f} GiB per device for the whole model (has "
                        f"{ctx.hw[i].memory_bytes / 2**30:.0f})")
        rates.append(d / work)
        exposed.append(exp)
        sites.append((s, d, t, work, mem))
    compute = ctx.batch / sum(rates)  # seconds: sequences / (sequences per second of all sites)
    nbytes = 2 * (S - 1) / S * sh.params * a.grad_bytes if S > 1 else 0.0
    all_links = list(ctx.links) + ([ctx.wrap] if ctx.wrap is not None and S > 2 else [])
    slowest = min((ln.bandwidth_gbps for ln in all_links), default=math.inf)
    lat = max((ln.latency_ms for ln in all_links), default=0.0) * 1e-3
    cross = nbytes * 8 / (slowest * 1e9) + 2 * (S - 1) * lat if S > 1 else 0.0
    step = compute + max(exposed) + cross
    # With the batch split in proportion to speed every site computes for the whole `compute` seconds.
    plans = tuple(SitePlan(s.name, sh.n_layers, d, t, s.devices, compute, compute / step, mem / 2**30,
                           h.memory_bytes / 2**30) for (s, d, t, work, mem), h in zip(sites, ctx.hw))
    links = tuple(LinkPlan(tuple(ln.sites), "none", "none", nbytes, nbytes * 8 / step / 1e9, ln.bandwidth_gbps,
                           ln.latency_ms) for ln in all_links)
    notes = [f"batch split over sites in proportion to their speed; cross-site gradient all-reduce "
             f"{nbytes / 1e9:.3g} GB each way per link, {cross:.3g} s, not overlapped"]
    if not fits:
        notes.append(f"does not fit in memory: {'; '.join(over)}")
    return Prediction(label="cross-site DP", fits=fits, step_s=step, tokens_per_s=ctx.batch * ctx.seq / step,
                      fraction_of_ideal=math.nan, bubble=1.0 - compute / step, schedule="data-parallel",
                      microbatches=1, recompute=False, sites=plans, links=links, notes=tuple(notes))


def _ideal(ctx: _Ctx) -> float:
    """Sum of the sites' capacities: tokens/s each would train at alone with no communication or bubble."""
    return sum(cm.site_capacity_tokens_per_s(ctx.shape, h, s.devices, ctx.seq, ctx.a.efficiency)
               for s, h in zip(ctx.topo.sites, ctx.hw))


# --- diagnostics ---------------------------------------------------------------------------------------------


def _warnings(ctx: _Ctx, best: _Cand, planned: Prediction, dp: Prediction | None, ideal: float) -> list[str]:
    out = []
    for s, h in zip(ctx.topo.sites, ctx.hw):
        if not h.known:
            out.append(f"site {s.name!r}: device kind {s.device_kind or s.backend!r} is not in the capability "
                       f"table; assumed {h.peak_flops / 1e12:g} TFLOP/s and {h.memory_bytes / 2**30:g} GiB per "
                       "device: set peak_tflops and memory_gib in the topology for a real plan")
    free = _simulate(ctx, best, free_links=True)  # the same plan with instantaneous links: compute-bound step
    for lp in planned.links:
        need = lp.bytes_per_step * 8 / free.step / 1e9
        if need > lp.available_gbps and planned.step_s > free.step * 1.05:
            out.append(
                f"link {lp.sites[0]}-{lp.sites[1]} limits the pipeline: it must carry {lp.bytes_per_step / 1e9:.3g} GB "
                f"each way per step ({lp.activations}); to keep up with compute ({free.step:.3g} s per step with free "
                f"links) it needs {need:.3g} Gbit/s but has {lp.available_gbps:g} Gbit/s, so the step takes "
                f"{planned.step_s:.3g} s ({planned.tokens_per_s / ideal:.0%} of ideal). Activation traffic grows "
                "with tokens per step like compute does, so a bigger batch does not help; pipelining across this "
                "link cannot pay unless it is faster or the codec smaller")
    if dp is not None and dp.fits and dp.step_s < planned.step_s * (1 - _TIE):
        out.append(f"cross-site data parallelism predicts {dp.step_s:.3g} s per step vs {planned.step_s:.3g} s for "
                   f"the pipeline ({planned.step_s / dp.step_s:.2f}x faster): it sends gradients, not "
                   "activations, across sites; hxtrain's pipeline plan is written, but consider data parallelism")
    return out


def _no_fit_error(ctx: _Ctx, options, model_name) -> PlanError:
    """The smallest per-device memory any plan needs (min over options of the memory-balanced split)."""
    need, where = math.inf, ""
    for opt in options:
        tables = [_table(ctx, opt, i, enforce_memory=False) for i in range(ctx.S)]
        ratio = [lambda L, t=t, i=i: float(t.mem[L - 1]) / ctx.caps[i] if L <= len(t.mem) else math.inf
                 for i, t in enumerate(tables)]
        layers = [opt.v] * ctx.S
        for _ in range(ctx.shape.n_layers - opt.v * ctx.S):
            i = min(range(ctx.S), key=lambda i: ratio[i](layers[i] + 1))
            layers[i] += 1
        i = max(range(ctx.S), key=lambda i: ratio[i](layers[i]))
        if ratio[i](layers[i]) < need:
            t = tables[i]
            sc = t.costs[int(t.choice[layers[i] - 1])]
            need = ratio[i](layers[i])
            where = (f"{float(t.mem[layers[i] - 1]) / 2**30:.1f} GiB per device on site "
                     f"{ctx.topo.sites[i].name!r} ({layers[i]} layers, tensor {sc.tensor}, {opt.schedule}, "
                     f"{opt.microbatches} microbatches{', recompute' if opt.recompute else ''})")
    name = model_name or type(ctx.shape).__name__
    largest = max(range(ctx.S), key=lambda i: ctx.hw[i].memory_bytes)
    return PlanError(
        f"model {name!r} ({ctx.shape.params / 1e9:.2f}B parameters) does not fit in device memory on "
        f"{ctx.topo.name!r}: the least memory any plan needs is {where}, but the largest available is "
        f"{ctx.hw[largest].memory_bytes / 2**30:.0f} GiB per device (site {ctx.topo.sites[largest].name!r}, of "
        f"which the planner uses {ctx.a.memory_fraction:.0%}); use more devices per site, devices with more "
        "memory, a smaller global batch, or a smaller model")
