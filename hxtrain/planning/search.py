"""Planner, the search over candidate plans (steps 1-4 of the method in `hxtrain.planning.planner`).

`search` takes the options and codecs, finds per option the min-max partition by water-filling (or every
partition when exhaustive), ranks every (candidate, codec set) analytically, simulates the best few, hill-climbs
the winner's partition with the simulator and relaxes each link's codec to the least lossy one within 1%.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time

import numpy as np

from hxtrain.links.codecs import CODEC_NAMES
from hxtrain.planning.predict import simulated
from hxtrain.planning.problem import (PlanError, Cand, Ctx, Table, all_fit, codec_allowed, codec_sets,
                                     link_list, occupancy, site_table, work_of)

TIE = 1e-3  # a lossier codec or a later schedule must be faster by more than this fraction to be chosen
_CODEC_TIE = 0.01  # a less lossy codec is kept if it costs at most 1% of step time (precision is worth that)
_SIMULATE_TOP = 4  # candidates simulated after the analytic ranking
_CLIMB_FROM = 6  # schedules whose best simulated candidate is hill-climbed
_MAX_EXHAUSTIVE = 200_000  # simulations an exhaustive search may run


# --- partitions ----------------------------------------------------------------------------------------------


def _greedy(tables: tuple[Table, ...], n_layers: int, least: int) -> tuple[int, ...] | None:
    """Min-max split: `least` layers per site, then each next layer where the work grows least."""
    S = len(tables)
    layers = [least] * S
    if any(not np.isfinite(t.work[least - 1]) for t in tables) or least * S > n_layers:
        return None
    heap = [(work_of(t, least + 1), i) for i, t in enumerate(tables)]
    heapq.heapify(heap)
    for _ in range(n_layers - least * S):
        w, i = heapq.heappop(heap)
        if not np.isfinite(w):
            return None
        layers[i] += 1
        heapq.heappush(heap, (work_of(tables[i], layers[i] + 1), i))
    return tuple(layers)


def _compositions(n: int, parts: int, least: int):
    """Every way to write n as `parts` ordered integers >= least."""
    for cuts in itertools.combinations(range(1, n - parts * (least - 1)), parts - 1):
        bounds = (0, *cuts, n - parts * (least - 1))
        yield tuple(b - a + least - 1 for a, b in zip(bounds, bounds[1:]))


# --- evaluation ----------------------------------------------------------------------------------------------


def _estimate(ctx: Ctx, c: Cand) -> float:
    """Analytic step time, for ranking only: fill/drain + steady state + link crossings + exposed sync.

    1F1B-like schedules keep only S microbatches in flight, so the steady-state period is also bounded by one
    round trip through every site and link divided by S.
    """
    M, v, S = c.opt.microbatches, c.opt.v, ctx.S
    works = [work_of(t, L) for t, L in zip(c.tables, c.layers)]
    trip, bound = sum(works), 0.0
    for (i, j, ln), codec in zip(link_list(ctx, c.opt), c.codecs):
        occ = occupancy(ctx, c.opt, ln, codec)
        trip += 2 * (occ + ln.latency_ms * 1e-3)
        bound = max(bound, M * v * occ)
    # Fill and drain: the bottleneck's work once, the rest in 1/v_eff slices (v chunks interleaved; ZB-H1's
    # W tasks fill about 2/3 of 1F1B's bubble, as if v = 3); exact for uniform stages and v = 1.
    v_eff = 3 if c.opt.split else v
    period = max(works) if c.opt.schedule == "gpipe" else max(max(works), trip / (S * v))
    est = (M - 1) * period + max(works) + (trip - max(works)) / v_eff
    return max(est, bound) + max(float(t.exposed[L - 1]) for t, L in zip(c.tables, c.layers))


def _better(a: Cand, b: Cand | None) -> bool:
    """a beats b: faster by more than the tie margin, or tied and simpler (no recompute, earlier codecs), then the
    latency-aware 1F1B with the most microbatches in flight (1f1b:k, largest k: the most slack if a link is slower
    or the compute faster than modelled; `benchmarks/transport.py` measured 1f1b:1 12% slower than 1f1b:4 where the
    profile-fed simulator tied them), then fewer stage inputs held over the sites, then the earlier schedule."""
    if b is None:
        return True
    if a.step < b.step * (1 - TIE):
        return True
    if a.step > b.step * (1 + TIE):
        return False
    rank = lambda c: (c.opt.recompute, sum(_CODEC_RANK[x] for x in c.codecs),  # noqa: E731
                      -getattr(c.opt.sched, "extra", 0), sum(c.opt.live), c.opt.rank, c.step)
    return rank(a) < rank(b)


_CODEC_RANK = {c: k for k, c in enumerate(CODEC_NAMES)}  # least lossy first: ties go to the earlier one


def search(ctx, options, codecs, *, exhaustive, climb_until, relax_until, fixed=None, enforce_memory=True,
           top=_SIMULATE_TOP) -> Cand | None:
    pool = []
    for opt in options:
        tables = tuple(site_table(ctx, opt, i, enforce_memory) for i in range(ctx.S))
        if fixed is not None:
            parts = [fixed] if min(fixed) >= opt.v and all_fit(tables, fixed) else []
        elif exhaustive:
            parts = [p for p in _compositions(ctx.shape.n_layers, ctx.S, opt.v) if all_fit(tables, p)]
        else:
            p = _greedy(tables, ctx.shape.n_layers, opt.v)
            parts = [p] if p else []
        for p in parts:
            pool += [Cand(opt, tables, p, cs) for cs in codec_sets(ctx, opt, codecs)]
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
    best, leaders = None, {}  # leaders: the best simulated candidate of each schedule
    for c in top:
        c = simulated(ctx, c)
        if _better(c, best):
            best = c
        if _better(c, leaders.get(c.opt.schedule)):
            leaders[c.opt.schedule] = c
    if fixed is None and not exhaustive:
        # A climb ends in a local optimum: climb from the leaders of the best few schedules, the deadline shared.
        starts = sorted(leaders.values(), key=lambda c: c.step)[:_CLIMB_FROM]
        now = time.perf_counter()
        for k, c in enumerate(starts):
            c = _hill_climb(ctx, c, now + (climb_until - now) * (k + 1) / len(starts))
            if _better(c, best):
                best = c
    return _relax_codecs(ctx, best, codecs, math.inf if exhaustive else relax_until)


def _hill_climb(ctx: Ctx, best: Cand, deadline: float) -> Cand:
    """Move one layer between two sites while the simulated step improves (all pairs up to 4 sites, else
    neighbours and moves off the busiest site), until no move helps or the deadline passes."""
    seen = {best.layers}
    while time.perf_counter() < deadline:
        S, L = ctx.S, best.layers
        if S <= 4:
            pairs = [(i, j) for i in range(S) for j in range(S) if i != j]
        else:
            busiest = max(range(S), key=lambda i: work_of(best.tables[i], L[i]))
            pairs = {(i, i + 1) for i in range(S - 1)} | {(i + 1, i) for i in range(S - 1)}
            pairs |= {(busiest, j) for j in range(S) if j != busiest}
        improved = None
        for i, j in sorted(pairs):
            new = list(L)
            new[i], new[j] = new[i] - 1, new[j] + 1
            new = tuple(new)
            if new in seen or new[i] < best.opt.v or not all_fit(best.tables, new):
                continue
            seen.add(new)
            c = simulated(ctx, Cand(best.opt, best.tables, new, best.codecs))
            if c.step < (improved or best).step * (1 - 1e-9):
                improved = c
            if time.perf_counter() > deadline:
                break
        if improved is None:
            break
        best = improved
    return best


def _relax_codecs(ctx: Ctx, best: Cand, codecs: tuple[str, ...], deadline: float) -> Cand:
    """Per link, the least lossy codec that costs at most _CODEC_TIE of step time (until `deadline`)."""
    links = link_list(ctx, best.opt)
    for k, (i, j, _) in enumerate(links):
        if time.perf_counter() > deadline:
            break
        for codec in codecs[:codecs.index(best.codecs[k])] if best.codecs[k] in codecs else ():
            if not codec_allowed(ctx, i, j, codec):
                continue
            trial = list(best.codecs)
            trial[k] = codec
            c = simulated(ctx, Cand(best.opt, best.tables, best.layers, tuple(trial)))
            if c.step <= best.step * (1 + _CODEC_TIE):
                best = c
                break
    return best
