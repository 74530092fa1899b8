"""Planner, predicting one candidate: its step simulated, and the `Prediction` figures a report shows.

`simulated` runs `hxtrain.schedules.simulate` on a `Cand`'s task orders with durations from the cost model; `prediction`
turns a simulated candidate into per-site and per-link figures; `cross_site_dp` predicts the alternative of
every site holding the whole model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from hxtrain.planning import costmodel as cm
from hxtrain.planning.problem import MAX_TENSOR, Cand, Ctx, link_list, mb_bytes, occupancy


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
    fraction_of_ideal: float  # tokens_per_s / the plan's ideal (what the sites would do, each alone)
    bubble: float  # idle share of all sites over the step
    schedule: str
    microbatches: int
    recompute: bool
    sites: tuple[SitePlan, ...]
    links: tuple[LinkPlan, ...]
    notes: tuple[str, ...] = ()
    shares: tuple[float, ...] = ()  # replicated rows (cross-site DP, DiLoCo): each site's share of the batch

    def with_ideal(self, ideal: float) -> Prediction:
        return replace(self, fraction_of_ideal=self.tokens_per_s / ideal)


# --- simulation ----------------------------------------------------------------------------------------------


def simulated(ctx: Ctx, c: Cand, free_links: bool = False) -> Cand:
    """`c` with its simulated step time and events; `free_links`: transfers take no time (compute-bound step)."""
    from hxtrain.schedules.simulate import simulate

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
            return n * (s.block_bwd_w + s.block_split_extra) + head * (s.head_bwd_w + s.head_split_extra) + ov
        extra = 0.0 if opt.split else n * s.block_bwd_w + head * s.head_bwd_w
        return n * s.block_bwd_in + head * s.head_bwd_in + extra + ov

    cost = {}
    for (i, j, ln), codec in zip(link_list(ctx, opt), c.codecs):
        pair = (0.0, 0.0) if free_links else (occupancy(ctx, opt, ln, codec), ln.latency_ms * 1e-3)
        cost[(i, j)] = cost[(j, i)] = pair

    events = simulate(opt.orders, S, duration=duration, transfer=lambda src, dst, task: cost[(src, dst)])
    end = [0.0] * S
    for e in events:
        if e.category == "compute":
            end[e.site] = max(end[e.site], e.end)
    step = max(max(e.end for e in events),
               max(end[i] + float(t.exposed[L - 1]) for i, (t, L) in enumerate(zip(c.tables, c.layers))))
    return Cand(opt, c.tables, c.layers, c.codecs, step, tuple(events))


# --- predictions ---------------------------------------------------------------------------------------------


def prediction(label: str, ctx: Ctx, c: Cand, fits: bool = True, notes=()) -> Prediction:
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
    for (i, j, ln), codec in zip(link_list(ctx, opt), c.codecs):
        crossings = opt.microbatches * (opt.v if j == i + 1 else opt.v - 1)
        nbytes = crossings * mb_bytes(ctx, opt, codec)  # each way: activations forward, cotangents back
        links.append(LinkPlan((ctx.topo.sites[i].name, ctx.topo.sites[j].name), codec, codec, nbytes,
                              nbytes * 8 / c.step / 1e9, ln.bandwidth_gbps, ln.latency_ms))
    return Prediction(label=label, fits=fits, step_s=c.step, tokens_per_s=ctx.batch * ctx.seq / c.step,
                      fraction_of_ideal=math.nan, bubble=1.0 - sum(busy) / (S * c.step), schedule=opt.schedule,
                      microbatches=opt.microbatches, recompute=opt.recompute, sites=tuple(sites),
                      links=tuple(links), notes=tuple(notes))


# Bytes per parameter of a DiLoCo pseudo-gradient on the link, per codec (int8 and fp8 add a float32 scale per
# row of d_model or more elements: under 1%).
CODEC_BYTES = {"none": 4.0, "bf16": 2.0, "int8": 1.0, "fp8": 1.0}


def cross_site_dp(ctx: Ctx, alone: list | None = None) -> Prediction | None:
    """Every site holds the whole model; the batch splits over sites in proportion to their speed; gradients are
    all-reduced across sites once per step (a ring: 2 (n-1)/n x params x 4 bytes each way per link), not
    overlapped with compute. `alone`: each site's own plan for the whole model (see `_replicated`)."""
    return _replicated(ctx, "cross-site DP", alone=alone)


def diloco(ctx: Ctx, d, alone: list | None = None) -> Prediction | None:
    """DiLoCo with one replica per site (`d`: a `hxtrain.config.topology.Diloco`): the same per-site compute as
    cross-site DP, but the replicas exchange pseudo-gradients (through `d.codec`) once every `d.sync_every` steps;
    with fragments, each fragment's exchange may hide behind `d.overlap` inner steps. Not the same optimisation as
    synchronous training."""
    return _replicated(ctx, f"diloco H={d.sync_every}", every=d.sync_every, bytes_per_param=CODEC_BYTES[d.codec],
                       fragments=d.fragments, overlap=d.overlap, alone=alone)


def _replicated(ctx: Ctx, label: str, *, every: int = 1, bytes_per_param: float | None = None, fragments: int = 1,
                overlap: int = 0, alone: list | None = None) -> Prediction | None:
    """A replica of the whole model on every site, the batch split by speed, an exchange of `bytes_per_param`
    (default: the gradient's) per parameter over a ring every `every` steps, in `fragments` parts that each may
    overlap `overlap` steps of compute; the exposed part is spread over the steps between exchanges.

    A site's replica computes what that site would alone: `alone[i]` is the planner's own prediction for site i
    holding the whole model at the same global batch, memory counted (its data x tensor, schedule, microbatches
    and in-site gradient all-reduce), the plan `planner.plan` makes for every site anyway (its IDEAL is the same
    plans with memory aside). Without it (a site the model does not fit alone, or a caller that has none) each
    site's best data x tensor is estimated here with one sequence per device and the in-site gradient all-reduce
    hidden behind the last two thirds of the backward."""
    sh, a, S = ctx.shape, ctx.a, ctx.S
    rates, fits, over, sites, exposed = [], True, [], [], []
    for i, s in enumerate(ctx.topo.sites):
        if alone is not None:
            one = alone[i].sites[0]  # the site's own plan: sequences per second at the run's global batch
            rates.append(alone[i].tokens_per_s / ctx.seq)
            exposed.append(0.0)  # inside its step already
            sites.append((s, one.data, one.tensor, one.data / rates[-1], one.memory_gib * 2**30))
            continue
        best = None
        for rec in (False, True):
            for t in range(1, min(MAX_TENSOR, s.devices) + 1):
                if s.devices % t or not sh.splits_over(t):
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
    per_param = a.grad_bytes if bytes_per_param is None else bytes_per_param
    nbytes = 2 * (S - 1) / S * sh.params * per_param if S > 1 else 0.0
    all_links = list(ctx.links) + ([ctx.wrap] if ctx.wrap is not None and S > 2 else [])
    slowest = min((ln.bandwidth_gbps for ln in all_links), default=math.inf)
    lat = max((ln.latency_ms for ln in all_links), default=0.0) * 1e-3
    cross = nbytes * 8 / (slowest * 1e9) + 2 * (S - 1) * lat if S > 1 else 0.0
    inner = compute + max(exposed)
    hidden = max(0.0, cross / fragments - overlap * inner)  # one fragment's exchange, past its overlap
    step = inner + fragments * hidden / every
    # With the batch split in proportion to speed every site computes for the whole `compute` seconds.
    plans = tuple(SitePlan(s.name, sh.n_layers, d, t, s.devices, compute, compute / step, mem / 2**30,
                           h.memory_bytes / 2**30) for (s, d, t, work, mem), h in zip(sites, ctx.hw))
    links = tuple(LinkPlan(tuple(ln.sites), "none", "none", nbytes / every, nbytes / every * 8 / step / 1e9,
                           ln.bandwidth_gbps, ln.latency_ms) for ln in all_links)
    if every == 1:
        notes = [f"batch split over sites in proportion to their speed; cross-site gradient all-reduce "
                 f"{nbytes / 1e9:.3g} GB each way per link, {cross:.3g} s, not overlapped"]
    else:
        notes = [f"DiLoCo: batch split over sites in proportion to their speed; pseudo-gradients "
                 f"({per_param:g} B/param) exchanged every {every} steps in {fragments} fragment(s), "
                 f"{nbytes / 1e9:.3g} GB each way per link per sync, {cross:.3g} s, {fragments * hidden:.3g} s "
                 f"exposed per {every} steps; not the same optimisation as synchronous training (its loss at equal "
                 f"tokens may differ: benchmarks/diloco.py)"]
    if not fits:
        notes.append(f"does not fit in memory: {'; '.join(over)}")
    return Prediction(label=label, fits=fits, step_s=step, tokens_per_s=ctx.batch * ctx.seq / step,
                      fraction_of_ideal=math.nan, bubble=1.0 - compute / step,
                      schedule="data-parallel" if every == 1 else "diloco",
                      microbatches=1, recompute=False, sites=plans, links=links, notes=tuple(notes),
                      shares=tuple(r / sum(rates) for r in rates))

