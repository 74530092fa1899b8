"""Simulator vs measured step time on this machine: local topologies, GPipe / 1F1B, even / uneven splits, M = 4, 8.

For each topology: `hxtrain.planning.profile.profile_sites` times the real stage programs on every site (1- and 2-block
stages -> per-block and fixed cost), then for each (partition, schedule, M) the step is predicted from those
per-task times and measured (median of `--steps` plain steps, each `grads` + `block_until_ready`, no recording;
and one recorded step, `timeline=True`, whose makespan is reported too).

Two predictions, because the sites of a local topology are fake CPU devices sharing the machine's cores:
  parallel  `hxtrain.schedules.simulate.simulate` as the planner uses it: every site is its own machine (transfers free:
            in-process `device_put` of a [mb, T, D] activation is a memcpy);
  shared    the same task orders and dependencies, but running tasks share the machine: with k tasks running
            at once each progresses at speed c_k / k, where c_k (<= k) is the machine's measured concurrency:
            k sites running the same program together take k / c_k times as long as one alone
            (`Probe`, re-timed between the measured steps). On a real multi-site run every c_k = k and the two
            predictions agree;
  exact     "shared" with each task's time measured on the pipeline's own stage program (`StageClock`) instead
            of the profile's line fixed + n x per-block: separates the simulator's error from the profile's.

    python benchmarks/sim_vs_real.py [--model mid|small|tiny] [--rounds 7] [--quick]

Model `mid` (default): GPTConfig(seq_len 64, d_model 256, heads 4, d_ff 1024, 8 layers), 2 sequences per
microbatch: a block's forward is a few ms, far above the ~0.1 ms dispatch cost, so compute dominates.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hxtrain.core import placement  # noqa: E402
from hxtrain.planning import profile
from hxtrain.engine.pipeline import Pipeline  # noqa: E402
from hxtrain.schedules.tables import dependencies, get_schedule  # noqa: E402
from hxtrain.schedules.simulate import makespan, simulate  # noqa: E402
from hxtrain.config.topology import load_topology, uniform  # noqa: E402
from models import gpt  # noqa: E402

MID = gpt.GPTConfig(seq_len=64, d_model=256, n_heads=4, n_layers=8, d_ff=1024)
UNEVEN = {2: (5, 3), 4: (3, 2, 2, 1)}


class Probe:
    """The profiled programs of every distinct site, plus one 1-block backward per site for the concurrency, so
    that both can be re-timed in the same minute as the steps they predict (the machine's load changes).

    profile rounds -> `profile.StageTimes` per site; concurrency rounds -> c_k for k = 1..S: k x (one site's
    1-block backward alone) / (k sites running it at once), c_1 = 1."""

    def __init__(self, model, topo, microbatch: int):
        from hxtrain.core import parts as _parts

        parts = _parts.split_model(model)
        T, D, V = model.cfg.seq_len, model.cfg.d_model, model.cfg.vocab_size
        self.topo, self.microbatch, self.seq = topo, microbatch, T
        self.programs, self.site_key, self.runs = {}, [], []
        for i, (site, mesh) in enumerate(zip(topo.sites, placement.site_meshes(topo))):
            key = (site.backend, site.device_kind, site.data, site.tensor)
            self.site_key.append(key)
            progs = profile._site_programs(parts, mesh, site, microbatch=microbatch, seq=T, width=D, vocab=V,
                                           seed=i)
            self.programs.setdefault(key, progs)
            self.runs.append(progs["bwd1"])  # every site's own, for the concurrency rounds
        for progs in self.programs.values():
            profile._timed_rounds(progs, 1)  # compile and warm
        for run in self.runs:
            jax.block_until_ready(run())
        self.reset()

    def reset(self) -> None:
        self.t = {key: {name: [] for name in progs} for key, progs in self.programs.items()}
        self.ratios = [[] for _ in self.runs]

    def round(self) -> None:
        """One timed call of every program, and one 'alone vs k together' pair per k."""
        for key, progs in self.programs.items():
            for name, times in profile._timed_rounds(progs, 1, warmup=False).items():
                self.t[key][name] += times
        for k in range(2, len(self.runs) + 1):
            t0 = time.perf_counter()
            jax.block_until_ready(self.runs[0]())
            alone = time.perf_counter() - t0
            t0 = time.perf_counter()
            jax.block_until_ready([r() for r in self.runs[:k]])
            self.ratios[k - 1].append(k * alone / (time.perf_counter() - t0))

    def times(self, i: int | None = None) -> list:
        """Per site, the profile from round `i` alone (None: medians over every round)."""
        pick = (lambda v: v) if i is None else (lambda v: v[i:i + 1])  # noqa: E731
        fits = {}
        for key, site in zip(self.site_key, self.topo.sites):
            if key not in fits:
                t = {name: pick(v) for name, v in self.t[key].items()}
                fits[key] = profile._fit(site, t, microbatch=self.microbatch, seq=self.seq, repeats=len(t["fwd1"]))
        return [dataclasses.replace(fits[key], site=site.name) for key, site in zip(self.site_key, self.topo.sites)]

    def capacity(self, i: int | None = None) -> list[float]:
        """c_1..c_S from round `i` (None: medians)."""
        pick = statistics.median if i is None else (lambda r: r[i])  # noqa: E731
        return [1.0] + [min(float(k + 1), pick(r)) for k, r in enumerate(self.ratios) if k > 0]


class StageClock:
    """The pipeline's own stage programs (its exact block counts), timed in the same rounds as the profile: a
    check on the profile's linear per-block model. duration(site, task) = median seconds of that stage's F or B."""

    def __init__(self, pipe, microbatch: int, seq: int, width: int, vocab: int):
        from jax.sharding import NamedSharding, PartitionSpec as P

        from hxtrain.core import programs as _stage

        rng = np.random.default_rng(1)
        self.programs = {}
        for st in pipe.stages:
            put = lambda a, m=st.role.mesh: jax.device_put(a, NamedSharding(m, P("data")))  # noqa: E731
            tokens = put(rng.integers(0, vocab, (microbatch, seq), dtype=np.int32))
            x = tokens if st.role.first else put(rng.standard_normal((microbatch, seq, width), np.float32))
            dy = put(np.full((microbatch, seq, width), 1e-2, np.float32))
            acc = {"g": _stage.zeros_accumulator(st.params, st.shardings, st.data),
                   "l": put(np.zeros((st.data,), np.float32))}
            if st.role.last:
                def b(st=st, x=x, tokens=tokens, acc=acc):
                    dx, acc["g"], acc["l"] = _stage.last_step(st.role, st.params, x, tokens, acc["g"], acc["l"],
                                                              np.float32(1.0))
                    return dx, acc["g"], acc["l"]
            else:
                self.programs[(st.index, "F")] = lambda st=st, x=x: _stage.forward(st.role, st.params, x)

                def b(st=st, x=x, dy=dy, acc=acc):
                    dx, acc["g"] = _stage.backward(st.role, st.params, x, dy, acc["g"])
                    return dx, acc["g"]
            self.programs[(st.index, "B")] = b
        self.last = len(pipe.stages) - 1
        profile._timed_rounds(self.programs, 1)  # compiled already by the pipeline's steps; warm
        self.reset()

    def reset(self) -> None:
        self.t = {k: [] for k in self.programs}

    def round(self) -> None:
        for k, v in profile._timed_rounds(self.programs, 1, warmup=False).items():
            self.t[k] += v

    def durations(self, i: int | None = None):
        """duration(site, task) from round `i` (None: medians)."""
        pick = statistics.median if i is None else (lambda r: r[i])  # noqa: E731

        def duration(site, task) -> float:
            if task.kind == "F" and task.stage == self.last:
                return 0.0  # the last stage's forward is fused into its B
            return pick(self.t[(task.stage, task.kind)])
        return duration


def simulate_shared(orders, sites: int, duration, capacity: list[float]) -> float:
    """Makespan when running tasks share the machine: k running tasks each progress at capacity[k-1] / k
    (at most 1). Same orders and dependencies as `simulate`; transfers free. A fluid (processor-sharing) model."""
    stages = 1 + max(t.stage for o in orders for t in o)
    done, nxt, now = set(), [0] * sites, 0.0
    running: dict[int, list] = {}  # site -> [task, remaining seconds of work at full speed]
    total = sum(len(o) for o in orders)
    while len(done) < total:
        for d in range(sites):
            if d not in running and nxt[d] < len(orders[d]):
                task = orders[d][nxt[d]]
                if all(dep in done for dep in dependencies(task, stages)):
                    running[d] = [task, duration(d, task)]
        if not running:
            raise RuntimeError("simulate_shared: deadlock (no task can start)")
        k = len(running)
        speed = min(1.0, capacity[min(k, len(capacity)) - 1] / k)
        dt = min(r[1] for r in running.values()) / speed
        now += dt
        for d in list(running):
            running[d][1] -= dt * speed
            if running[d][1] <= 1e-12:
                done.add(running.pop(d)[0])
                nxt[d] += 1
    return now


def _durations(times, ranges, sites: int):
    """duration(site, task) from the profile: stage = task.stage, its block count from `ranges`."""
    n_stages = len(ranges)

    def duration(site, task):
        lo, hi = ranges[task.stage]
        t = times[site].task_seconds(task.kind, hi - lo, first=task.stage == 0, last=task.stage == n_stages - 1)
        return max(t, 0.0)  # one noisy round's line can dip below zero; no task takes negative time
    return duration


def measure(pipe, tokens, rounds: int, probes) -> tuple[list[float], float]:
    """(seconds of each of `rounds` plain steps, makespan of one recorded step). After each step, one round of
    every probe: step i and its prediction from round i see the same load (the machine is shared)."""
    for probe in probes:
        probe.reset()
    plain = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(pipe.grads(tokens))
        plain.append(time.perf_counter() - t0)
        for probe in probes:
            probe.round()
    jax.block_until_ready(pipe.grads(tokens, timeline=True))
    return plain, makespan(pipe.last_step_stats.events)


def _predict(orders, S, ranges, probe, clock, i=None) -> tuple[float, float, float]:
    """(parallel, shared, exact) predicted step seconds from round i (None: medians of all rounds)."""
    duration, cap = _durations(probe.times(i), ranges, S), probe.capacity(i)
    return (makespan(simulate(orders, S, duration=duration)), simulate_shared(orders, S, duration, cap),
            simulate_shared(orders, S, clock.durations(i), cap))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mid", help="mid (default), or a preset name (small, tiny)")
    ap.add_argument("--microbatch", type=int, default=2, help="sequences per microbatch (default 2)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds per case: one plain step, then one timed call "
                                                         "of every profiled program (default 7)")
    ap.add_argument("--quick", action="store_true", help="uniform(2,1,1), 1F1B, M=4 only")
    args = ap.parse_args()
    cfg = MID if args.model == "mid" else gpt.PRESETS[args.model]
    model = gpt.build(cfg)
    two = gpt.build(dataclasses.replace(cfg, n_layers=2))
    topos = [uniform(2, 1, 1)] if args.quick else [uniform(2, 1, 1), uniform(4, 1, 1), load_topology("local")]
    print(f"model {args.model}: {cfg}; microbatch {args.microbatch} x {cfg.seq_len} tokens; jax {jax.__version__}, "
          f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    header = (f"{'topology':<16} {'split':<10} {'sched':<6} {'M':>2} {'measured':>9} {'recorded':>9} "
              f"{'parallel':>9} {'err':>6} {'shared':>9} {'err':>6} {'exact':>9} {'err':>6}")
    rows = []
    for topo in topos:
        S = topo.n_sites
        t0 = time.perf_counter()
        probe = Probe(two, topo, args.microbatch)
        print(f"\n{topo.name}: {S} sites; stage programs compiled in {time.perf_counter() - t0:.0f} s")
        print(header)
        verbose = True  # the first case's profile and concurrency, as an example
        for split in (None, UNEVEN[S]):
            for sched_name in ("gpipe", "1f1b"):
                for M in ((4,) if args.quick else (4, 8)):
                    if args.quick and sched_name == "gpipe":
                        continue
                    pipe = Pipeline(model, topo, schedule=sched_name, microbatches=M, partition=split)
                    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (M * args.microbatch,
                                                                                   cfg.seq_len + 1))
                    for _ in range(2):  # compile + warm (before the clock reuses the compiled programs)
                        jax.block_until_ready(pipe.grads(tokens))
                    clock = StageClock(pipe, args.microbatch, cfg.seq_len, cfg.d_model, cfg.vocab_size)
                    steps, recorded = measure(pipe, tokens, args.rounds, (probe, clock))
                    orders = get_schedule(sched_name).site_orders(S, M)
                    par, shared, exact = _predict(orders, S, pipe.ranges, probe, clock)
                    paired = [_predict(orders, S, pipe.ranges, probe, clock, i) for i in range(args.rounds)]
                    # error: median over rounds of (prediction from round i) / (step i) - 1
                    err = [statistics.median(p[k] / st for p, st in zip(paired, steps)) - 1 for k in range(3)]
                    real, times, cap = statistics.median(steps), probe.times(), probe.capacity()
                    label = "even" if split is None else ",".join(map(str, split))
                    row = (topo.name, label, sched_name, M, real, recorded, par, err[0], shared, err[1], exact,
                           err[2])
                    rows.append(row)
                    if verbose:
                        print(profile.format_table(times))
                        print(f"  concurrency c_k = {', '.join(f'{c:.2f}' for c in cap)}")
                        verbose = False
                    print(f"{row[0]:<16} {row[1]:<10} {row[2]:<6} {M:>2} {real * 1e3:>7.1f}ms {recorded * 1e3:>7.1f}ms "
                          f"{par * 1e3:>7.1f}ms {row[7]:>+6.0%} {shared * 1e3:>7.1f}ms {row[9]:>+6.0%} "
                          f"{exact * 1e3:>7.1f}ms {row[11]:>+6.0%}", flush=True)
    for name, k in (("parallel", 7), ("shared", 9), ("shared, exact stages", 11)):
        errs = [abs(r[k]) for r in rows]
        print(f"{name}: median |error| {statistics.median(errs):.1%}, max {max(errs):.1%}, within 15%: "
              f"{sum(e <= 0.15 for e in errs)} of {len(errs)}")


if __name__ == "__main__":
    main()
