"""Cost of a second PJRT client: the same 2-site pipeline with site b on jaxlib's CPU vs on XLA's CPU plugin.

    python benchmarks/two_clients.py [--model tiny] [--schedule 1f1b] [--microbatches 4] [--batch 16] [--rounds 9]

`meshes/local-2client.toml` (site b on the `fastatomstruct-xla-cpu` plugin, its own client) against the same
topology with site b on the built-in client's devices 4-7: same shapes, same programs, same bytes. Between two
clients an activation goes device -> host -> device (`jax.device_put` across clients); within one client it is a
device-to-device copy. Steps (loss + grads, no optimizer) alternate A, B, A, B, ... in one process, so machine load
hits both alike; the median ratio is printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import hxtrain  # noqa: E402

TWO = hxtrain.load_topology("local-2client")
hxtrain.register_plugins(TWO)  # before the first array

import jax  # noqa: E402
import numpy as np  # noqa: E402

from hxtrain.training.trainer import build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--schedule", default="1f1b")
    ap.add_argument("--microbatches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    one = TWO.replace_site("b", plugin=None, plugin_options=None)  # site b on the built-in client (devices 4-7)
    model = build_model(args.model)
    tokens = np.random.default_rng(0).integers(0, 256, (args.batch, model.cfg.seq_len + 1)).astype(np.int32)
    pipes = {name: hxtrain.Pipeline(model, topo, schedule=args.schedule, microbatches=args.microbatches)
             for name, topo in (("one client", one), ("two clients", TWO))}
    clients = {name: [s.role.mesh.devices.flat[0].client.platform_version.split()[0] for s in p.stages]
               for name, p in pipes.items()}
    times: dict[str, list[float]] = {name: [] for name in pipes}
    losses = {}
    for name, p in pipes.items():  # compile
        losses[name] = float(jax.block_until_ready(p.grads(tokens))[0])
    for _ in range(args.rounds):
        for name, p in pipes.items():
            t0 = time.perf_counter()
            jax.block_until_ready(p.grads(tokens))
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    ratios = [b / a for a, b in zip(times["one client"], times["two clients"])]
    print(f"model {args.model}, {args.schedule}, M={args.microbatches}, batch {args.batch}, {args.rounds} rounds, "
          f"load {os.getloadavg()[0]:.1f}; bytes per step {pipes['two clients'].transport.total_bytes()} "
          f"(both: {pipes['one client'].transport.total_bytes()})")
    for name in pipes:
        print(f"  {name:11s}: {med[name]:8.1f} ms/step, loss {losses[name]:.6f}, client versions {clients[name]}")
    print(f"two/one per round: {', '.join(f'{r:.2f}' for r in ratios)}; median {statistics.median(ratios):.2f}")
    assert abs(losses["two clients"] - losses["one client"]) <= 1e-5 * abs(losses["one client"])


if __name__ == "__main__":
    main()
