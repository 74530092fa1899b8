"""`hxtrain train --strategy diloco`: its flags, the run's `Diloco` (the topology's [diloco] table with the flags
given, errors naming either), and the run (`hxtrain.training.diloco.DilocoTrainer`)."""

from __future__ import annotations

import dataclasses

_DILOCO_FLAGS = {"replicas": "--replicas", "sync_every": "--sync-every", "outer_lr": "--outer-lr",
                 "outer_momentum": "--outer-momentum", "fragments": "--fragments", "overlap": "--overlap",
                 "mix": "--mix", "codec": "--diloco-codec", "shares": "--shares"}


def _groups(text: str):
    groups = tuple(tuple(n for n in g.split("+") if n) for g in text.split(",") if g)
    if not groups or not all(groups):
        import argparse

        raise argparse.ArgumentTypeError(f"expected replicas like s0+s1,s2+s3 (sites joined by +), got {text!r}")
    return groups


def _shares(text: str):
    import argparse

    if text in ("planned", "measured") or text.startswith("planned:"):
        return text
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one number per replica like 2,1, planned, planned:FILE or "
                                         f"measured, got {text!r}") from None


def add_diloco_arguments(p) -> None:
    """`hxtrain train --strategy diloco` and its settings (default: the topology's [diloco] table, else DiLoCo's)."""
    p.add_argument("--strategy", choices=("pipeline", "diloco"), default="pipeline",
                   help="pipeline: every site a stage of one pipeline (default); diloco: replicas (a site or a "
                        "group of sites pipelining) train apart and sync every --sync-every steps")
    p.add_argument("--replicas", type=_groups, help="diloco replicas, e.g. s0+s1,s2+s3 (default: one per site)")
    p.add_argument("--sync-every", type=int, help="diloco: inner steps per outer step H (default 500)")
    p.add_argument("--outer-lr", type=float, help="diloco: outer Nesterov learning rate (default 0.7)")
    p.add_argument("--outer-momentum", type=float, help="diloco: outer Nesterov momentum (default 0.9)")
    p.add_argument("--fragments", type=int, help="diloco: parameter fragments syncing at staggered steps (1)")
    p.add_argument("--overlap", type=int, help="diloco: inner steps a fragment's exchange overlaps (0)")
    p.add_argument("--mix", type=float, help="diloco: share of local params kept when a late result lands (0)")
    p.add_argument("--diloco-codec", help="diloco: pseudo-gradient codec: none, bf16, int8, fp8 (default none)")
    p.add_argument("--shares", type=_shares, help="diloco: each replica's share of the batch, e.g. 2,1, or "
                                                  "planned: in proportion to the planner's tokens/s, or "
                                                  "planned:FILE: the same from the block times `hxtrain profile "
                                                  "--out FILE` measured, or measured: equal, then at every outer "
                                                  "step in proportion to each replica's rows per second of inner "
                                                  "step (default equal)")


def diloco_overrides(args) -> tuple[tuple[str, object], ...]:
    return tuple((f, getattr(args, flag[2:].replace("-", "_")))
                 for f, flag in _DILOCO_FLAGS.items() if getattr(args, flag[2:].replace("-", "_")) is not None)


def diloco_flag_args(args) -> list[str]:
    """The diloco flags given, as command-line arguments again (`hxtrain launch` passes them to every site)."""
    out = []
    for field, value in diloco_overrides(args):
        if field == "replicas":
            value = ",".join("+".join(g) for g in value)
        elif field == "shares" and not isinstance(value, str):  # numbers; "planned", "measured" pass as they are
            value = ",".join(map(str, value))
        out += [_DILOCO_FLAGS[field], str(value)]
    return out


def resolve_diloco(topology, config):
    """The run's `Diloco`: the topology's [diloco] table (else DiLoCo's defaults) with the flags given; errors name
    the flag or the table field. Refuses what --strategy diloco does not do yet."""
    from hxtrain.config.checks import check_diloco
    from hxtrain.config.topology import Diloco

    get = lambda f: getattr(config, f, None)  # noqa: E731 (RunConfig and the site's SiteConfig)
    for what, bad in (("--executor spmd", get("executor") not in (None, "mpmd")), ("--init-from", get("init_from")),
                      ("--timeline", get("timeline"))):
        if bad:
            raise ValueError(f"--strategy diloco: {what} is not supported with diloco yet; leave it out")
    d = dataclasses.replace(topology.diloco or Diloco(), **dict(config.diloco))
    check_diloco(topology.source, d, [s.name for s in topology.sites],
                 flags={f: _DILOCO_FLAGS[f] for f, _ in config.diloco})
    return d


def from_plan(config):
    """(topology, config) of `hxtrain train --plan FILE --strategy diloco`: the plan's DiLoCo row (each site a
    replica at the data x tensor it chose, the batch split by the sites' predicted speed unless --shares or the
    topology's [diloco] says otherwise), its model, global batch and microbatches."""
    from hxtrain.planning.planner import Plan

    taken = [f for f in ("model", "microbatches", "batch_size", "partition") if getattr(config, f)]
    if taken:
        raise ValueError(f"--plan {config.plan}: the plan fixes {', '.join(taken)}; drop those options (or edit "
                         "the plan's topology file)")
    plan = Plan.load(config.plan)
    topo = plan.diloco_topology()
    d = topo.diloco
    if d.shares == tuple(plan.diloco.shares):  # the row's speeds: in whole rows each replica's devices split
        from hxtrain.training.diloco import replica_batches

        units = [topo.run.microbatches * s.data for s in topo.sites]
        rows = replica_batches(topo.run.batch_size, d.shares, units)
        topo = dataclasses.replace(topo, diloco=dataclasses.replace(d, shares=tuple(float(r) for r in rows)))
    return topo, dataclasses.replace(config, mesh=topo.source, model=topo.run.model,
                                     microbatches=topo.run.microbatches, batch_size=topo.run.batch_size)


def train_diloco(config, *, progress: bool = True):
    """`hxtrain train --strategy diloco`: resolve, build a DilocoTrainer, fit, print a summary."""
    from hxtrain.backends import register_plugins
    from hxtrain.config.topology import load_topology
    from hxtrain.core.optim import OptimizerConfig
    from hxtrain.training.diloco import DilocoTrainer
    from hxtrain.training.trainer import build_model, resolve_run

    if config.plan is not None:
        topo, config = from_plan(config)
    else:
        topo = load_topology(config.mesh)
    register_plugins(topo)
    d = resolve_diloco(topo, config)
    resolved = resolve_run(topo, config)
    print(f"hxtrain train: mesh={topo.source} strategy=diloco model={resolved.model} schedule={resolved.schedule} "
          f"microbatches={resolved.microbatches} batch={resolved.batch_size} steps={resolved.steps} "
          f"data={resolved.data or 'stdlib'} out={resolved.out or '-'}")
    model = build_model(resolved.model, seed=resolved.seed)
    run = DilocoTrainer(model, topo, diloco=d, schedule=resolved.schedule, microbatches=resolved.microbatches,
                        partition=resolved.partition, batch_size=resolved.batch_size,
                        optimizer=OptimizerConfig.for_steps(resolved.steps, resolved.learning_rate),
                        data=resolved.data, seed=resolved.seed, out=resolved.out, save_every=resolved.save_every,
                        keep=resolved.keep, resume=resolved.resume,
                        eval_batches=resolved.eval_batches if resolved.eval_every else 0)
    print(run.describe())
    if run.resumed_from is not None:
        print(f"resuming from {resolved.out}/checkpoints at step {run.resumed_from} "
              f"({max(resolved.steps - run.step, 0)} of {resolved.steps} steps left)")
        if run.step >= resolved.steps:
            print(f"done: already at step {run.step} of {resolved.steps}; nothing to train")
            return run, []
    if d.sync_every > resolved.steps:
        print(f"warning: --sync-every {d.sync_every} is more than --steps {resolved.steps}: the replicas never sync")
    history = run.fit(resolved.steps - run.step, out=resolved.out, progress=progress,
                      eval_every=resolved.eval_every)
    first, last = history[0]["loss"], history[-1]["loss"]
    sent = sum(r["sync_bytes"] for r in history)
    held_out = f", held-out loss {history[-1]['eval_loss']:.4f}" if "eval_loss" in history[-1] else ""
    print(f"done: {len(history)} inner steps, {run.outer_steps} outer steps, loss {first:.4f} -> {last:.4f}{held_out}, "
          f"pseudo-gradient bytes sent {sent} ({d.codec}), tokens per replica {history[-1]['replica_tokens']}")
    return run, history
