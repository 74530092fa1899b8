"""SPMD (one program over every site) vs MPMD (host-driven per-site programs) GPipe step time, side by side.

    python benchmarks/spmd_vs_mpmd.py [--models tiny,small] [--mesh local] [--microbatches 8] [--batch 32]

One step = loss and gradients of one batch (no optimizer). Both executors run in the same process on the same
devices; their steps are interleaved (A, B, A, B, ...) so that machine load hits both alike, and the median is
reported. Compile time is measured separately (the first call).
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

from hxtrain import Pipeline, load_topology  # noqa: E402
from hxtrain.spmd import SpmdPipeline  # noqa: E402
from hxtrain.train import build_model  # noqa: E402


def _time(fn, tokens) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(tokens))
    return time.perf_counter() - t0


def compare(model_name: str, mesh: str, microbatches: int, batch: int, repeats: int) -> dict:
    model = build_model(model_name)
    topo = load_topology(mesh)
    tokens = np.random.default_rng(0).integers(0, 256, (batch, model.cfg.seq_len + 1)).astype(np.int32)
    runs = {"mpmd": Pipeline(model, topo, schedule="gpipe", microbatches=microbatches).grads,
            "spmd": SpmdPipeline(model, topo, microbatches=microbatches).grads}
    first = {k: _time(fn, tokens) for k, fn in runs.items()}
    for fn in runs.values():  # one more warm-up each (second-call effects: donation, allocator)
        _time(fn, tokens)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            times[k].append(_time(fn, tokens))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"model": model_name, "first": first, "median": med, "ratio": med["mpmd"] / med["spmd"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="tiny,small")
    ap.add_argument("--mesh", default="local")
    ap.add_argument("--microbatches", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} devices, mesh {args.mesh}, "
          f"GPipe, M={args.microbatches}, batch {args.batch}, median of {args.repeats} interleaved steps")
    print(f"{'model':8} {'mpmd ms':>9} {'spmd ms':>9} {'mpmd/spmd':>10} {'compile mpmd s':>15} {'compile spmd s':>15}")
    for name in args.models.split(","):
        r = compare(name, args.mesh, args.microbatches, args.batch, args.repeats)
        print(f"{name:8} {r['median']['mpmd'] * 1e3:9.1f} {r['median']['spmd'] * 1e3:9.1f} {r['ratio']:10.2f} "
              f"{r['first']['mpmd']:15.1f} {r['first']['spmd']:15.1f}")


if __name__ == "__main__":
    main()
