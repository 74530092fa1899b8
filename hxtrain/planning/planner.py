"""Planner: which layers run on which site, how each site splits its devices, and what a step will cost.

`plan(topology, model_cfg, ...)` chooses, within per-device memory, the (uneven, contiguous) layer partition over
the topology's sites in their pipeline order, `data x tensor` inside each site, the microbatch count, the schedule,
recompute, and each link's codec; and predicts the step with `hxtrain.schedules.simulate` fed by `hxtrain.planning.costmodel`.

Search, per candidate (schedule x microbatch count x recompute):
 1. per site and per layer count L, the fastest (data, tensor) that fits memory, as numpy arrays over L: the work
    of one microbatch w_i(L) (non-decreasing in L);
 2. the min-max partition by water-filling: one layer per site, then each next layer to the site whose w_i grows
    least. With sites in a fixed order every vector of counts is a contiguous split, so this is the optimum of the
    bottleneck (the classic greedy for separable min-max allocation);
 3. every (candidate, codec) is ranked by an analytic step estimate; the best few are simulated;
 4. the partition of the best simulated candidate of each of the 6 best schedules is hill-climbed with the
    simulator (move one layer between two sites) until no move helps or the time budget ends (a climb ends in a
    local optimum, so it starts from several); the best wins; each link's codec is then relaxed to the least lossy
    one within 1%.
`exhaustive=True` instead simulates every partition of every candidate: small cases only (the tests check that the
fast search finds the same step time).

The result is a `Plan` with four `Prediction`s (the plan, an even split, cross-site data parallelism, and DiLoCo
with one replica per site: `hxtrain train --strategy diloco`, a different optimisation); its TOML
form is two files: a topology that `load_topology` reads as is (chosen data/tensor/layers/codecs and the `[run]`)
and the plan itself (`[plan]`, `[predicted]`, ...), which names the topology file by a relative path
(`hxtrain.planning.plan_file`).

PIPELINE ORDER: the topology lists its sites in a chain, and the plan may run that chain last to first
(`Plan.reversed_order`; the written topology lists the sites in the order chosen). The order matters because the
stages are unequal: the first stage's backward ends the step, so its in-site gradient all-reduce is exposed while
every later stage's overlaps the rest of the step, and the last stage holds the head. A pair 2x apart in speed
runs faster with the slow site first (fewer layers, so less gradient to all-reduce at the end). Only the reverse
is tried: any other order may need links the topology does not have.

IDEAL, the yardstick of every `fraction_of_ideal`: the sum over sites of what each would do *alone* with the whole
model at the same global batch, at its own best configuration: data x tensor, schedule and microbatches that fit
its memory (its tensor-parallel and in-site gradient costs included, from the cost model or its measured profile).
It leaves out only what is between sites: the pipeline bubble and the links. A site that cannot hold the model
alone counts its compute with memory set aside. A pipeline can pass the ideal: holding part of the model, a site
may fit with less tensor parallelism than it needs for the whole. `compute_bound_tokens_per_s` sets memory aside
for every site, which no row can pass. A one-site topology's ideal is its plan.

Code: `problem` (inputs, options, per-site tables), `search` (steps 2-4),
`predict` (simulating a candidate, the `Prediction` figures); this module: `plan` and `Plan`.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

from hxtrain.planning import costmodel as cm
from hxtrain.links.codecs import CODEC_NAMES
from hxtrain.planning.plan_file import Plan  # re-exported: `planner.plan` returns one, callers import it from here
from hxtrain.planning.predict import Prediction, cross_site_dp, diloco, prediction, simulated
from hxtrain.planning.problem import (DEFAULT_SCHEDULES, Cand, Ctx, PlanError, check_codecs,
                                     make_context, make_options, site_table)
from hxtrain.planning.search import TIE, search
from hxtrain.config.topology import even_split


def plan(topology, model_cfg, *, global_batch: int | None = None, seq: int | None = None,
         schedules=DEFAULT_SCHEDULES, codecs=CODEC_NAMES, microbatch_choices=None,
         efficiency: float | None = None, assumptions: cm.Assumptions | None = None,
         profiles: dict | None = None, hardware: dict | None = None, exhaustive: bool = False,
         time_budget_s: float = 1.0, model_name: str | None = None, capability=None,
         keep_shapes: bool = False, latency_aware: bool = True, reorder: bool = True) -> Plan:
    """Plan a run of `model_cfg` (GPTConfig-like) on `topology` (a hxtrain.config.topology.Topology).

    global_batch: sequences per step (default: the topology's run.batch_size); seq: tokens per sequence (default
    model_cfg.seq_len); microbatch_choices: microbatch counts to try (default: divisors of the batch);
    profiles: {site name: SiteProfile} measured block times; hardware: {site name: Hardware} overrides of the
    capability table; capability: device_kind -> Capability (default hxtrain.backends.capability_for);
    keep_shapes: every site keeps its topology's data x tensor (only the partition and the rest are chosen);
    latency_aware=False: the default schedule list without the latency-aware `1f1b:k` (to show what they bring);
    reorder=False: the sites in the given order only (see PIPELINE ORDER).
    Raises PlanError when nothing fits or the inputs are inconsistent.
    """
    t0 = time.perf_counter()
    a = assumptions or cm.Assumptions()
    if efficiency is not None:
        a = cm.Assumptions(**{**a.__dict__, "efficiency": efficiency})
    codecs = check_codecs(codecs)

    def placed(topo, k: int, n: int):
        """The best candidate for the sites in `topo`'s order, searched in the k-th of n shares of the budget."""
        c = replace(make_context(topo, model_cfg, global_batch, seq, a, profiles or {}, hardware or {},
                                 capability), keep_shapes=keep_shapes)
        opts = make_options(c, schedules, microbatch_choices, latency_aware)
        start, share = t0 + 0.7 * time_budget_s * k / n, time_budget_s / n  # climb, then relax codecs
        return c, opts, search(c, opts, codecs, exhaustive=exhaustive, climb_until=start + 0.5 * share,
                               relax_until=start + 0.7 * share)

    orders = (topology, _reversed(topology)) if reorder and topology.n_sites > 1 else (topology,)
    ctx, options, best = placed(topology, 0, len(orders))
    if best is None:
        raise _no_fit_error(ctx, options, model_name)
    even, even_best = _even(ctx, options, codecs, t0 + 0.85 * time_budget_s)
    if even_best is not None and even_best.step < best.step:  # the search's estimate missed it: never worse
        best = even_best
    chosen = ctx
    if len(orders) == 2:
        rctx, _, rbest = placed(orders[1], 1, 2)
        if rbest is not None and rbest.step < best.step * (1 - TIE):  # the given order unless clearly slower
            chosen, best = rctx, rbest
    planned = prediction("planned", chosen, best)
    from hxtrain.config.topology import Diloco

    def alone(i: int, memory: bool) -> Prediction | None:
        """Site i's own plan for the whole model at this batch (memory aside unless `memory`); None: no fit."""
        s, h, pr = topology.sites[i], ctx.hw[i], ctx.profiles[i]
        try:
            return plan(topology.only([s.name], "sites"), model_cfg, global_batch=ctx.batch, seq=ctx.seq,
                        schedules=schedules, codecs=codecs, assumptions=a, profiles={s.name: pr} if pr else None,
                        capability=capability, hardware={s.name: h if memory else replace(h, memory_bytes=math.inf)},
                        time_budget_s=time_budget_s / (2 * topology.n_sites), model_name=model_name).predicted
        except PlanError:
            if not memory:
                raise
            return None

    fitting = [alone(i, True) for i in range(topology.n_sites)] if topology.n_sites > 1 else []
    replicas = fitting if fitting and all(fitting) else None  # else the estimate that says what does not fit
    dp = cross_site_dp(ctx, replicas)
    low_comm = diloco(ctx, topology.diloco or Diloco(), replicas) if topology.n_sites > 1 else None
    if topology.n_sites == 1:
        ideal = bound = planned.tokens_per_s
    else:  # IDEAL (module doc): each site alone, within its memory where it can be
        unbounded = [alone(i, False).tokens_per_s for i in range(topology.n_sites)]
        bound = sum(unbounded)
        ideal = sum(u if f is None else f.tokens_per_s for f, u in zip(fitting, unbounded))
    warnings = _warnings(chosen, best, planned, dp, ideal)
    fix = lambda p: p and p.with_ideal(ideal)  # noqa: E731
    return Plan(topology=chosen.topo, model=model_name, global_batch=ctx.batch, seq=ctx.seq, predicted=fix(planned),
                even=fix(even), cross_site_dp=fix(dp), ideal_tokens_per_s=ideal, warnings=tuple(warnings),
                assumptions=a, planning_s=time.perf_counter() - t0, diloco=fix(low_comm),
                reversed_order=chosen is not ctx, compute_bound_tokens_per_s=bound)


def _reversed(topology):
    """The sites last to first; a [diloco] table's replicas spelled out, so its shares keep their sites."""
    d = topology.diloco
    if d is not None and d.replicas is None:
        d = replace(d, replicas=tuple((s.name,) for s in topology.sites))
    return replace(topology, sites=topology.sites[::-1], diloco=d)


def _even(ctx: Ctx, options, codecs, deadline) -> tuple[Prediction | None, Cand | None]:
    """The even split's prediction, and its candidate when it fits (the plan may not be slower)."""
    layers = even_split(ctx.shape.n_layers, ctx.S)
    best = search(ctx, options, codecs, exhaustive=False, climb_until=0, relax_until=deadline, fixed=layers)
    if best is not None:
        return prediction("even split", ctx, best), best
    best = search(ctx, options, codecs, exhaustive=False, climb_until=0, relax_until=deadline, fixed=layers,
                  enforce_memory=False)
    if best is None:  # e.g. interleaving with fewer layers than chunks: nothing to show
        return None, None
    p = prediction("even split", ctx, best, fits=False)
    over = [f"{s.name} needs {s.memory_gib:.1f} GiB per device (has {s.memory_limit_gib:.0f})"
            for s, cap in zip(p.sites, ctx.caps) if s.memory_gib * 2**30 > cap]
    return replace(p, notes=p.notes + (f"does not fit in memory: {'; '.join(over)}",)), None


# --- diagnostics ---------------------------------------------------------------------------------------------


def _warnings(ctx: Ctx, best: Cand, planned: Prediction, dp: Prediction | None, ideal: float) -> list[str]:
    out = []
    for s, h in zip(ctx.topo.sites, ctx.hw):
        if not h.known:
            out.append(f"site {s.name!r}: device kind {s.device_kind or s.backend!r} is not in the capability "
                       f"table; assumed {h.peak_flops / 1e12:g} TFLOP/s and {h.memory_bytes / 2**30:g} GiB per "
                       "device: set peak_tflops and memory_gib in the topology for a real plan")
    free = simulated(ctx, best, free_links=True)  # the same plan with instantaneous links: compute-bound step
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
    if dp is not None and dp.fits and dp.step_s < planned.step_s * (1 - TIE):
        out.append(f"cross-site data parallelism predicts {dp.step_s:.3g} s per step vs {planned.step_s:.3g} s for "
                   f"the pipeline ({planned.step_s / dp.step_s:.2f}x faster): it sends gradients, not "
                   "activations, across sites; hxtrain's pipeline plan is written, but consider data parallelism")
    return out


def _no_fit_error(ctx: Ctx, options, model_name) -> PlanError:
    """The smallest per-device memory any plan needs (min over options of the memory-balanced split)."""
    need, where = math.inf, ""
    for opt in options:
        tables = [site_table(ctx, opt, i, enforce_memory=False) for i in range(ctx.S)]
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
