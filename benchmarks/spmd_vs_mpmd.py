"""SPMD (one program over every site) vs MPMD (host-driven per-site programs) GPipe step time, side by side.

    python benchmarks/spmd_vs_mpmd.py [--models tiny,small] [--mesh local] [--microbatches 8] [--batch 32]

One step = loss and gradients of one batch (no optimizer). Both executors run in the same process on the same
devices; their steps are interleaved (A, B, A, B, ...) so that machine load hits both alike, and the median is
reported. Compile time is measured separately (the first call).

Two more columns say where MPMD's time goes:
  bare   the same stage programs and transfers, in the same order, called in a plain loop without the engine
         (no mailboxes, no task table, no accumulator bookkeeping): what the programs themselves cost;
  M=1    the MPMD engine with one microbatch (3 programs per step instead of 3 M): the per-program cost shows as
         the difference.
And `--fuse 2,4` adds the MPMD engine with g microbatches per stage program (`Pipeline(fuse=g)`: the same M
microbatches and memory per microbatch, GPipe over M / g units, g times fewer programs and transfers), each with
its ratio to SPMD.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from hxtrain import Pipeline, load_topology  # noqa: E402
from hxtrain.core import programs  # noqa: E402
from hxtrain.core.placement import DATA  # noqa: E402
from hxtrain.engine.spmd import SpmdPipeline  # noqa: E402
from hxtrain.training.trainer import build_model  # noqa: E402


def _time(fn, tokens) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(tokens))
    return time.perf_counter() - t0


def bare_gpipe(pipe: Pipeline):
    """A two-stage GPipe step as a plain loop over the pipeline's own stage programs (no engine)."""
    first, last = pipe.stages
    if len(pipe.stages) != 2 or not (first.role.first and last.role.last):
        raise SystemExit("bare: a two-site topology (one stage per site)")
    on = lambda st: NamedSharding(st.role.mesh, P(DATA))  # noqa: E731
    scale = jax.device_put(np.float32(1.0 / (pipe.microbatches * last.data)), NamedSharding(last.role.mesh, P()))

    def step(tokens):
        batch = tokens.reshape(pipe.microbatches, -1, tokens.shape[-1])
        xs = [jax.device_put(m[:, :-1], on(first)) for m in batch]
        ys = [jax.device_put(m[:, 1:], on(last)) for m in batch]
        g0 = programs.zeros_accumulator(first.params, first.shardings, first.data)
        g1 = programs.zeros_accumulator(last.params, last.shardings, last.data)
        l1 = jax.device_put(np.zeros((last.data,), np.float32), on(last))
        hs = [jax.device_put(programs.forward(first.role, first.params, x), on(last)) for x in xs]
        dys = []
        for h, y in zip(hs, ys):
            dx, g1, l1 = programs.last_step(last.role, last.params, h, y, g1, l1, scale)
            dys.append(jax.device_put(dx, on(first)))
        for x, dy in zip(xs, dys):
            _, g0 = programs.backward(first.role, first.params, x, dy, g0)
        return programs.reduce(g0)[0], programs.reduce(g1)[0], l1.sum()

    return step


def compare(model_name: str, mesh: str, microbatches: int, batch: int, repeats: int, fuse=()) -> dict:
    model = build_model(model_name)
    topo = load_topology(mesh)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, model.cfg.seq_len + 1)).astype(np.int32)
    mpmd = Pipeline(model, topo, schedule="gpipe", microbatches=microbatches)
    runs = {"mpmd": mpmd.grads, "spmd": SpmdPipeline(model, topo, microbatches=microbatches).grads,
            "bare": bare_gpipe(mpmd), "M=1": Pipeline(model, topo, schedule="gpipe", microbatches=1).grads}
    for g in fuse:
        runs[f"fuse {g}"] = Pipeline(model, topo, schedule="gpipe", microbatches=microbatches, fuse=g).grads
    first = {k: _time(fn, tokens) for k, fn in runs.items()}
    for fn in runs.values():  # one more warm-up each (second-call effects: donation, allocator)
        _time(fn, tokens)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_time(fn, tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "first": first, "median": med, "ratio": med["mpmd"] / med["spmd"],
            "bare_ratio": med["bare"] / med["spmd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--mesh", default="local")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--fuse", default="", help="also the MPMD engine with these microbatches per program, e.g. 2,4")
    args = ap.parse_args()
    fuse = [int(g) for g in args.fuse.split(",") if g]
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, mesh {args.mesh}, "
          f"GPipe, M={args.microbatches}, batch {args.batch}, median of {args.repeats} interleaved steps")
    print(f"{'model':8} {'mpmd ms':>9} {'spmd ms':>9} {'mpmd/spmd':>10} {'bare ms':>9} {'bare/spmd':>10} "
          f"{'M=1 ms':>8} {'compile mpmd s':>15} {'compile spmd s':>15}")
    for name in args.models.split(","):
        r = compare(name, args.mesh, args.microbatches, args.batch, args.repeats, fuse)
        m = r["median"]
        print(f"{name:8} {m['mpmd'] * 1e3:9.1f} {m['spmd'] * 1e3:9.1f} {r['ratio']:10.2f} {m['bare'] * 1e3:9.1f} "
              f"{r['bare_ratio']:10.2f} {m['M=1'] * 1e3:8.1f} {r['first']['mpmd']:15.1f} {r['first']['spmd']:15.1f}")
        for g in fuse:
            print(f"{'':8} fuse {g}: mpmd {m[f'fuse {g}'] * 1e3:.1f} ms, mpmd/spmd {m[f'fuse {g}'] / m['spmd']:.2f}")


if __name__ == "__main__":
    main()
