"""Generation speed with and without the KV cache, side by side: tokens/s of `hxtrain.generation.generate`.

    python benchmarks/sampling.py [--model small] [--prompt 16] [--tokens 112] [--batches 1,8] [--rounds 3]
                                  [--mesh TOPOLOGY]

The same model, prompt and greedy decoding: with the cache (one prefill, then one jitted decode step per token,
caches donated) and without (every token recomputes the whole sequence, padded to prompt + tokens so it compiles
once). Each (batch, mode) runs once to compile, then the rounds alternate cached, uncached, cached, ... so machine
load hits both alike; the medians and their ratio are printed. Tokens/s counts new tokens of the whole batch. The
two modes must give the same tokens; the script checks that. `--mesh` samples pipelined across a topology's sites.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens")
    ap.add_argument("--tokens", type=int, default=112, help="new tokens per sequence")
    ap.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mesh", help="sample pipelined across this topology's sites (default: one device)")
    args = ap.parse_args()

    topology = None
    if args.mesh:
        from hxtrain import backends
        from hxtrain.config.topology import load_topology

        topology = load_topology(args.mesh)
        backends.register_plugins(topology)  # before the first array
    import jax

    from hxtrain.core import model_registry
    from hxtrain.generation import Stages, generate

    model = model_registry.build(args.model)
    forward = Stages.pipelined(model, topology) if topology is not None else Stages.local(model)
    print(f"model {args.model} ({type(model).__name__}, {model.cfg.n_layers} blocks, d_model {model.cfg.d_model}, "
          f"context {model.cfg.seq_len}); prompt {args.prompt} + {args.tokens} new tokens, greedy; "
          f"{jax.devices()[0].platform} {jax.devices()[0].device_kind}, jax {jax.__version__}\n{forward.describe()}")
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = np.random.default_rng(batch).integers(0, model.cfg.vocab_size, (batch, args.prompt))
        times: dict[bool, list[float]] = {True: [], False: []}
        compile_s, got = {}, {}
        for cache in (True, False):
            t0 = time.perf_counter()
            got[cache] = generate(forward, prompt, args.tokens, temperature=0, cache=cache)
            compile_s[cache] = time.perf_counter() - t0
        same = np.array_equal(got[True], got[False])
        for _ in range(args.rounds):
            for cache in (True, False):
                t0 = time.perf_counter()
                generate(forward, prompt, args.tokens, temperature=0, cache=cache)  # returns numpy: synchronised
                times[cache].append(time.perf_counter() - t0)
        rate = {c: batch * args.tokens / statistics.median(t) for c, t in times.items()}
        ratios = [u / c for c, u in zip(times[True], times[False])]
        print(f"batch {batch}: KV cache {rate[True]:8.1f} tok/s ({statistics.median(times[True]) * 1e3:7.1f} ms), "
              f"no cache {rate[False]:8.1f} tok/s ({statistics.median(times[False]) * 1e3:7.1f} ms); "
              f"cache / no cache **{statistics.median(ratios):.2f}x** (rounds {', '.join(f'{r:.2f}' for r in ratios)}); "
              f"first call (compile) {compile_s[True]:.1f} / {compile_s[False]:.1f} s; same tokens: {same}")


if __name__ == "__main__":
    main()
