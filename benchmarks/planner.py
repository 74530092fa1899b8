"""Planner benchmark: planned vs even split vs cross-site data parallelism vs DiLoCo (one replica per site, H 500;
another optimisation, see benchmarks/diloco.py) on the shipped realistic topologies.

    python benchmarks/planner.py

For every non-CPU topology in `meshes/` (and the same topology with 10x and 100x faster links, to separate what
the links cost from what the placement costs), prints predicted tokens/s and the fraction of the ideal (the sum of
what each site would do alone with the whole model at its own best configuration that fits its memory: see
`hxtrain.planning.planner`) for the plan, an even split and cross-site data parallelism, and the plan's fraction of
the compute bound (the same sum with memory set aside, which no row can pass); then a
synthetic pair of sites that differ 2x in speed at three global batch sizes, and the planning wall time of the
largest case (a synthetic 8-site, 100,000-device topology). Every figure is a *prediction* (cost model + simulator).
"""

from __future__ import annotations

import dataclasses
import time

from hxtrain.planning import planner
from hxtrain.config.topology import Link, RunDefaults, Site, Topology, load_topology, shipped
from models.gpt import PRESETS

MODELS = {"two-dc-nvidia-ascend": "7b", "two-dc-nvidia-amd": "7b", "three-site-longhaul": "13b"}


def _faster_links(topo: Topology, factor: float) -> Topology:
    links = tuple(dataclasses.replace(ln, bandwidth_gbps=ln.bandwidth_gbps * factor) for ln in topo.links)
    return dataclasses.replace(topo, links=links, name=f"{topo.name} (links x{factor:g})")


def _two_x() -> Topology:
    """512 H100 + 512 devices at half the H100's peak, 3.2 Tbit/s apart: balance is the only question."""
    sites = (Site("fast", "cuda", 512, 64, 8, device_kind="H100"),
             Site("slow", "cuda", 512, 64, 8, device_kind="H100", peak_tflops=989 / 2))
    return Topology("synthetic 2x speed", sites, (Link(("fast", "slow"), 3200.0, 2.0),),
                    RunDefaults(batch_size=1024, microbatches=16), "<code>")


def _big() -> Topology:
    kinds = [("cuda", "H100"), ("cuda", "A100"), ("rocm", "MI300X"), ("ascend", "Ascend910B")] * 2
    sites = tuple(Site(f"s{i}", b, 12500, 3125, 4, device_kind=k) for i, (b, k) in enumerate(kinds))
    links = tuple(Link((f"s{i}", f"s{i + 1}"), 6400.0, 5.0) for i in range(7))
    return Topology("synthetic 8 sites x 12500", sites, links, RunDefaults(batch_size=3125 * 32, microbatches=32),
                    "<code>")


def _row(topo: Topology, model: str, batch: int | None = None) -> tuple[str, planner.Plan]:
    p = planner.plan(topo, PRESETS[model], model_name=model, global_batch=batch)
    name = topo.name if batch is None else f"{topo.name}, batch {batch}"
    cells = [f"{name:<36} {model:>4}"]
    for pred in (p.predicted, p.even, p.cross_site_dp, p.diloco):
        mark = "" if pred.fits else "*"
        cells.append(f"{pred.tokens_per_s / 1e6:>8.3f}M {pred.fraction_of_ideal:>6.1%}{mark:1}")
    cells.append(f"{p.predicted.tokens_per_s / p.compute_bound_tokens_per_s:>6.1%}")
    cells.append(f"{p.predicted.tokens_per_s / p.even.tokens_per_s:>6.2f}x")
    order = "<" if p.reversed_order else " "  # the sites run last to first
    cells.append(f"{p.schedule:>11} M={p.microbatches:<3} {order}{'/'.join(map(str, p.layers)):<10} "
                 f"{'/'.join(ln.activations for ln in p.predicted.links):<10} {p.planning_s:5.2f}s")
    return "  ".join(cells), p


def main() -> None:
    planner.plan(load_topology("local"), PRESETS["tiny"])  # warm imports before timing anything
    head = (f"{'topology':<36} {'model':>5}  {'planned':>16}  {'even split':>16}  {'cross-site DP':>16}  "
            f"{'diloco H=500':>16}  {'bound':>6}  "
            f"{'vs even':>7}  {'schedule':>11} {'M':<5} {'layers':<11} {'codecs':<10} {'plan':>6}")
    print(head)
    print("-" * len(head))
    link_bound = []
    for path in shipped():
        topo = load_topology(path)
        if all(s.backend == "cpu" for s in topo.sites):
            continue
        model = MODELS.get(topo.name, "7b")
        for factor in (1, 10, 100):
            t = topo if factor == 1 else _faster_links(topo, factor)
            line, p = _row(t, model)
            print(line)
            if any("limits the pipeline" in w for w in p.warnings):
                link_bound.append(t.name)
    print()
    # Fixed per-step costs (in-site gradient all-reduce, fill and drain) dilute the balance gain at small batches.
    for model in ("7b", "13b"):
        for batch in (1024, 4096, 16384):
            print(_row(_two_x(), model, batch)[0])
    print()
    t0 = time.perf_counter()
    line, p = _row(_big(), "70b")
    print(line)
    print(f"\nplanning wall time, 8 sites / {p.topology.total_devices} devices / 70b: {time.perf_counter() - t0:.2f} s")
    print("(* = does not fit in memory; fraction = predicted tokens/s / ideal: the sum of what each site would do "
          "alone with the whole model at its own best configuration that fits its memory; bound = the plan / the "
          "same sum with memory aside; < = the plan runs the sites last to first, layers in that order)")
    print(f"link-bound (the planner warns that pipelining across the link cannot pay): {', '.join(link_bound)}")


if __name__ == "__main__":
    main()
