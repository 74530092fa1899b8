"""`hxtrain plan`: choose a placement for a model on a topology, print the prediction, write the plan.

    hxtrain plan --mesh two-dc-nvidia-ascend --model 7b [--global-batch 6144 --seq 4096 --out plan.toml]

Prints the plan next to an even split and cross-site data parallelism (step time, tokens/s, fraction of the
ideal, per-site utilisation, bubble, memory per device, link bandwidth needed vs available), the warnings, and
writes `plan.toml` plus the topology it runs (`plan.topology.toml`).
"""

from __future__ import annotations

import sys

from hxtrain.planning import costmodel as cm
from hxtrain.planning import planner
from hxtrain.planning.problem import PlanError


def register(subparsers) -> None:
    """Add the `plan` command to hxtrain's argparse subparsers."""
    p = subparsers.add_parser("plan", help="choose layers, data x tensor, schedule and codecs for a topology; "
                                           "predict the step")
    p.add_argument("--mesh", default="local", help="topology TOML file or shipped name (default: local)")
    p.add_argument("--model", required=True, help="model preset, e.g. 7b, 13b, 70b, small (models.gpt.PRESETS)")
    p.add_argument("--global-batch", type=int, help="sequences per step (default: the topology's run.batch_size)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default: the model's seq_len)")
    p.add_argument("--out", default="plan.toml", help="plan file to write (default: plan.toml); '-' writes none")
    p.add_argument("--exhaustive", action="store_true", help="simulate every layer partition (small cases only)")
    p.add_argument("--efficiency", type=float, help="fraction of peak FLOP/s reached (default 0.4)")
    p.add_argument("--profile", metavar="FILE", help="measured per-block times from `hxtrain profile --out FILE` "
                                                     "(replace the FLOP estimate for the profiled sites)")
    p.set_defaults(func=run)


def run(args, out=None) -> int:
    """Run `hxtrain plan` with parsed `args`; prints to `out` (default stdout). 0 on success, 2 on bad input."""
    out = out or sys.stdout
    from hxtrain.config.topology import TopologyError, load_topology

    try:
        topo = load_topology(args.mesh)
        cfg = _model(args.model)
        profiles = None
        if getattr(args, "profile", None):
            from hxtrain.planning.profile import load_site_profiles

            profiles = load_site_profiles(args.profile, topo)
        plan = planner.plan(topo, cfg, global_batch=args.global_batch, seq=args.seq, model_name=args.model,
                            exhaustive=args.exhaustive, efficiency=args.efficiency, profiles=profiles)
    except (TopologyError, PlanError, ValueError) as e:
        print(f"hxtrain plan: error: {e}", file=sys.stderr)
        return 2
    print(format_report(plan, cfg), file=out)
    if any(ln.latency_ms > 0 for ln in topo.links) and topo.n_sites > 1:
        plain = planner.plan(topo, cfg, global_batch=args.global_batch, seq=args.seq, model_name=args.model,
                             exhaustive=args.exhaustive, efficiency=args.efficiency, profiles=profiles,
                             latency_aware=False).predicted
        p = plan.predicted
        print(f"  latency-aware schedules (1f1b:k and zb-h1:k, more microbatches in flight per link): with them "
              f"{p.step_s:.4g} s/step ({p.schedule}), without {plain.step_s:.4g} s/step ({plain.schedule}, "
              f"M={plain.microbatches}): {plain.step_s / p.step_s:.3f}x", file=out)
    if profiles:
        print(f"  block times measured ({args.profile}) on sites {', '.join(profiles)}; the rest estimated",
              file=out)
    if args.out and args.out != "-":
        paths = plan.to_toml(args.out)
        print(f"wrote {paths[0]} (plan) and {paths[1]} (its topology: `hxtrain train --plan {paths[0]}`)", file=out)
    return 0


def _model(name: str):
    from hxtrain.core import model_registry

    return model_registry.preset(name)


def format_report(plan: planner.Plan, cfg=None) -> str:
    """A readable report: the chosen placement, the three rows, notes and warnings."""
    p, topo = plan.predicted, plan.topology
    params = f" ({cm.ModelShape.of(cfg).params / 1e9:.2f}B parameters)" if cfg is not None else ""
    micro = plan.global_batch // p.microbatches
    lines = [f"plan: model {plan.model}{params} on {topo.name} ({len(topo.sites)} sites, "
             f"{sum(s.devices for s in topo.sites)} devices); global batch {plan.global_batch} x {plan.seq} tokens",
             f"chosen: schedule {p.schedule}, {p.microbatches} microbatches of {micro} sequences, recompute "
             f"{'on' if p.recompute else 'off'} (planned in {plan.planning_s:.2f} s)",
             f"pipeline order: {' -> '.join(s.name for s in topo.sites)}"
             + (" (the topology's sites last to first: the first stage's gradient all-reduce ends the step)"
                if plan.reversed_order else ""),
             f"  {'site':<10} {'layers':>6} {'data x tensor':>14} {'busy':>6} {'memory/device':>18}"]
    for s in p.sites:
        lines.append(f"  {s.name:<10} {s.layers:>6} {f'{s.data} x {s.tensor}':>14} {s.utilisation:>6.0%} "
                     f"{f'{s.memory_gib:.1f} / {s.memory_limit_gib:.0f} GiB':>18}")
    for ln in p.links:
        lines.append(f"  link {ln.sites[0]}-{ln.sites[1]}: {ln.activations}, {ln.bytes_per_step / 1e9:.3g} GB each "
                     f"way per step, needs {ln.needed_gbps:.3g} of {ln.available_gbps:g} Gbit/s")
    lines += ["", f"  {'':<14} {'step s':>9} {'tokens/s':>10} {'of ideal':>8} {'bubble':>7}  "
                  f"{'site busy':<20} {'GiB/device':<18} link Gbit/s need/have"]
    for row in plan.ranked():
        busy = " ".join(f"{s.utilisation:.0%}" for s in row.sites)
        mem = " ".join(f"{s.memory_gib:.1f}" for s in row.sites)
        links = " ".join(f"{ln.needed_gbps:.3g}/{ln.available_gbps:g}" for ln in row.links) or "-"
        flag = "" if row.fits else "  (does not fit)"
        lines.append(f"  {row.label:<14} {row.step_s:>9.4g} {row.tokens_per_s:>10.4g} {row.fraction_of_ideal:>8.1%} "
                     f"{row.bubble:>7.1%}  {busy:<20} {mem:<18} {links}{flag}")
    lines.append(f"  ideal (the sum of what each site would do alone with the whole model, at its own best "
                 f"configuration that fits its memory): {plan.ideal_tokens_per_s:.4g} tokens/s; memory aside: "
                 f"{plan.compute_bound_tokens_per_s:.4g}")
    if plan.diloco is not None:
        lines.append("  (rows fastest first; diloco runs with `hxtrain train --strategy diloco`, and it is not the "
                     "same optimisation as synchronous training)")
    for row in plan.ranked():
        for note in row.notes:
            lines.append(f"  note ({row.label}): {note}")
    if plan.warnings:
        lines += ["", "warnings:"] + [f"  - {w}" for w in plan.warnings]
    return "\n".join(lines)
