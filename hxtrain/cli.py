"""`hxtrain` command line: `train`, `info` (and the commands other modules register).

The default of every command is the embedded local topology (`meshes/local.toml`: 2 sites x (data 2 x tensor 2)
on 8 fake CPU devices). Local CPU runs need the fake devices before JAX starts, so `main` sets XLA_FLAGS first.
"""

from __future__ import annotations

import argparse
import os
import sys


def _ensure_cpu_devices(n: int = 8) -> None:
    # Must happen before JAX initialises its backends; harmless when a real accelerator serves the sites.
    flag = f"--xla_force_host_platform_device_count={n}"
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def _cpu_devices(args) -> int:
    """Fake CPU devices for this command: 8, except `hxtrain profile`, which times the stage programs as the sites
    will run them, so it exposes only the CPU devices its topology's sites use (XLA:CPU programs run measurably
    slower beside idle fake devices: a 2-block backward 18.5 ms with 8 devices vs 14.8 ms with 2, one core)."""
    if args.command != "profile":
        return 8
    from hxtrain.config.topology import TopologyError, load_topology

    try:
        topo = load_topology(args.mesh)
    except (TopologyError, ValueError, OSError):
        return 8  # the command itself reports the bad topology
    return max(1, sum(s.devices for s in topo.sites if s.backend == "cpu" and not s.plugin))


def _cmd_train(args) -> int:
    from hxtrain.training.diloco_run import diloco_overrides
    from hxtrain.training.trainer import RunConfig, train

    cfg = RunConfig(mesh=args.mesh, model=args.model, schedule=args.schedule, microbatches=args.microbatches,
                    batch_size=args.batch_size, steps=args.steps, data=args.data, out=args.out,
                    partition=args.partition, learning_rate=args.lr, seed=args.seed, executor=args.executor,
                    timeline=args.timeline, timeline_step=args.timeline_step,
                    save_every=args.save_every, keep=args.keep, resume=args.resume, init_from=args.init_from,
                    plan=args.plan, strategy=args.strategy, diloco=diloco_overrides(args),
                    eval_every=args.eval_every, eval_batches=args.eval_batches, sample_tokens=args.sample_tokens)
    train(cfg, progress=not args.no_progress)
    return 0


def _cmd_info(args) -> int:
    import jax

    from hxtrain import backends
    from hxtrain.engine.pipeline import Pipeline
    from hxtrain.config.topology import load_topology
    from hxtrain.training.trainer import build_model

    topo = load_topology(args.mesh)
    backends.register_plugins(topo)  # before JAX starts its backends, so its plugins are among them
    print(f"jax {jax.__version__}; default backend {jax.default_backend()}; {jax.device_count()} devices")
    for d in jax.devices():
        print(f"  {d.id}: {d.platform} {d.device_kind}")
    print("\nbackends:")
    print(backends.format_table(backends.describe()))
    print("\nclients (each its own PJRT client; no program or mesh spans two):")
    print(backends.format_clients(backends.client_rows()))
    print(f"\ntopology:\n{topo.summary()}")
    pipe = Pipeline(build_model(args.model or topo.run.model), topo, schedule=topo.run.schedule,
                    microbatches=topo.run.microbatches)
    print(f"\nplacement:\n{pipe.describe()}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hxtrain", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from hxtrain.training.flags import add_run_arguments

    t = sub.add_parser("train", help="train a model on a topology (default: meshes/local.toml, model small)")
    add_run_arguments(t, out_help="run folder: metrics.jsonl, tb/ (TensorBoard), checkpoints/")
    t.add_argument("--executor", choices=("mpmd", "spmd"), default="mpmd",
                   help="mpmd: per-site programs driven by the host (default); spmd: the whole pipeline as "
                        "one program (GPipe, same backend and shape on every site)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    t.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps into OUT/checkpoints (default 0: only at the end; needs --out)")
    t.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    t.add_argument("--resume", choices=("never", "auto", "must"), default="auto",
                   help="continue from the newest intact checkpoint in OUT: auto (if any, the default), must, never")
    t.add_argument("--init-from", help="start from the parameters of an `hxtrain export` folder (or a run folder)")
    t.add_argument("--plan", metavar="FILE", help="run a plan written by `hxtrain plan` (its topology, model, "
                                                  "schedule, microbatches and global batch)")
    t.add_argument("--sample-tokens", type=int, metavar="N",
                   help="print N tokens generated by the trained model at the end (default: up to 48, as the "
                        "model's context allows; 0: none)")
    from hxtrain.training.diloco_run import add_diloco_arguments

    add_diloco_arguments(t)
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("info", help="devices and backends JAX sees, and the topology as it will be placed")
    i.add_argument("--mesh", default="local")
    i.add_argument("--model", help="model preset to place (default: the topology's [run] model)")
    i.set_defaults(func=_cmd_info)

    from hxtrain.checkpoints import export
    from hxtrain.data import cli as data_cli
    from hxtrain.generation import cli as sample_cli
    from hxtrain.planning import cli as plan_cli, profile
    from hxtrain.sites import cli as site_cli, launch

    # commands that live in their own modules
    for module in (plan_cli, site_cli, launch, export, profile, data_cli, sample_cli):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ensure_cpu_devices(_cpu_devices(args))
    try:
        return int(args.func(args) or 0)
    except (ValueError, RuntimeError, FileNotFoundError, FloatingPointError) as e:  # FloatingPointError: NaN stop
        # Clear input errors end the command with their message, not a traceback.
        print(f"hxtrain {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
