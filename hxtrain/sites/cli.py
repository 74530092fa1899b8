"""`hxtrain site`'s command line: its flags, its config and its exit codes (0 done, 2 bad input or refused
checkpoint, 3 a lost peer or process of the site, 1 anything else, with its traceback). The site itself runs in
`hxtrain.sites.process.run_site`."""

from __future__ import annotations

import dataclasses
import os
import sys

from hxtrain.sites.process import SiteConfig, SiteError, parse_addresses, run_site
from hxtrain.training.diloco_run import diloco_overrides


def add_run_arguments(p) -> None:
    """Arguments shared by `hxtrain site` and `hxtrain launch`: a run's (as `hxtrain train`), then the sites'."""
    from hxtrain.training.flags import add_run_arguments as add_run

    add_run(p, out_help="folder for metrics-<site>.jsonl and tb/<site>/ (TensorBoard)")
    from hxtrain.training.diloco_run import add_diloco_arguments

    add_diloco_arguments(p)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a peer may stay silent before this site stops and names it (default 30)")
    p.add_argument("--secret-env", default="HXTRAIN_SECRET",
                   help="environment variable holding the shared secret (default HXTRAIN_SECRET)")
    p.add_argument("--sync-sends", action="store_true",
                   help="send synchronously (wait for each frame to leave) instead of overlapping sends with compute")
    p.add_argument("--checkpoint-dir", help="save checkpoints under DIR/<site> (default: none saved)")
    p.add_argument("--save-every", type=int, default=0,
                   help="checkpoint every N steps (default 0: only at the end); needs --checkpoint-dir")
    p.add_argument("--keep", type=int, default=3, help="checkpoints kept per site (default 3)")
    p.add_argument("--elastic", action="store_true",
                   help="when a site is lost, go on without it: launch re-plans the pipeline onto the survivors "
                        "from the newest checkpoint every site sealed (needs --checkpoint-dir and --save-every) "
                        "and restarts the lost site at the next checkpoint; with --strategy diloco the other "
                        "replicas go on without the lost one")
    p.add_argument("--sites", type=_site_names,
                   help="run the topology restricted to these sites, in this order (a,c): how launch --elastic "
                        "continues on the survivors; default: every site")
    p.add_argument("--stop-at", type=int,
                   help="end after this step (the learning-rate schedule still spans --steps); launch --elastic "
                        "stops the survivors at the next checkpoint to bring the lost site back")
    p.add_argument("--continue-step", type=int,
                   help="restore this step of --checkpoint-dir, whichever sites and partition saved it (every "
                        "site reads the whole folder: one machine, or storage all sites share)")
    p.add_argument("--insecure-plaintext", action="store_true",
                   help="link the sites without TLS (loopback only; logged as a warning). Default: mutual TLS 1.3")
    p.add_argument("--resume", choices=("never", "auto", "must"), default="auto",
                   help="continue from the newest step every site has sealed in --checkpoint-dir: never, auto "
                        "(if there is one; default) or must")


def _site_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(","))
    if not all(names) or len(set(names)) != len(names):
        import argparse

        raise argparse.ArgumentTypeError(f"expected distinct site names a,b,..., got {text!r}")
    return names


def config_from_args(args, site: str, addresses=()) -> SiteConfig:
    partition = getattr(args, "partition", None)
    return SiteConfig(mesh=args.mesh, site=site, model=args.model, schedule=args.schedule,
                      microbatches=args.microbatches, steps=args.steps, batch_size=args.batch_size,
                      partition=partition, learning_rate=args.lr, seed=args.seed, data=args.data, out=args.out,
                      timeout=args.timeout, connect_timeout=max(60.0, args.timeout), secret_env=args.secret_env,
                      sync_sends=getattr(args, "sync_sends", False), addresses=addresses,
                      process_id=getattr(args, "process_id", None),
                      coordinator=getattr(args, "coordinator", None), checkpoint_dir=args.checkpoint_dir,
                      save_every=args.save_every, keep=args.keep, resume=args.resume,
                      tls_cert=getattr(args, "tls_cert", None), tls_key=getattr(args, "tls_key", None),
                      tls_ca=getattr(args, "tls_ca", None), insecure_plaintext=args.insecure_plaintext,
                      strategy=args.strategy, diloco=diloco_overrides(args), elastic=args.elastic,
                      sites=() if args.sites is None else args.sites, stop_at=args.stop_at,
                      continue_step=args.continue_step, rejoin=getattr(args, "rejoin", False),
                      eval_every=args.eval_every,
                      eval_batches=args.eval_batches, timeline=args.timeline, timeline_step=args.timeline_step)


def _cmd_site(args) -> int:
    try:
        addresses = parse_addresses(args.addresses)
        cfg = dataclasses.replace(config_from_args(args, args.site, addresses),
                                  connect=parse_addresses(args.connect, "--connect"))
    except ValueError as e:
        print(f"hxtrain site: error: {e}", file=sys.stderr)
        return 2
    log = lambda msg: print(f"{msg}", flush=True)  # noqa: E731
    code = _run_site_command(cfg, log)
    jax = sys.modules.get("jax")
    if code != 0 and jax is not None and jax.distributed.is_initialized():
        # This process joined its site's cluster: leave now. A normal exit would wait in JAX's shutdown barrier
        # for the other processes of the site, which may be dead or blocked in a collective with this one.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_site_command(cfg: SiteConfig, log) -> int:
    from hxtrain.network.handshake import PeerError
    from hxtrain.network.group import GroupError
    from hxtrain.training.loop import NonFiniteLoss

    who = f"hxtrain site {cfg.site!r}" + (f" process {cfg.process_id}" if cfg.coordinator is not None else "")
    try:
        run_site(cfg, log=log)
    except PeerError as e:
        print(f"{who}: error: lost a peer: {e}", file=sys.stderr, flush=True)
        return 3
    except GroupError as e:  # names the site, the process and the collective
        print(f"{who}: error: lost a process of the site: {e}", file=sys.stderr, flush=True)
        return 3
    except (SiteError, NonFiniteLoss) as e:
        print(f"{who}: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        if _checkpoint_error(e):  # no checkpoint with --resume must, another run's checkpoint, ...
            print(f"{who}: error: {e}", file=sys.stderr, flush=True)
            return 2
        if cfg.coordinator is None:
            raise
        if _lost_process(e):  # a collective inside a stage program, or reading its result, found a peer gone
            print(f"{who}: error: lost a process of the site: {type(e).__name__}: {str(e).splitlines()[0]}",
                  file=sys.stderr, flush=True)
            return 3
        import traceback

        traceback.print_exc()  # e.g. a collective inside a stage program that failed: the exit must not hang
        print(f"{who}: error: failed (traceback above)", file=sys.stderr, flush=True)
        return 1
    log(f"site {cfg.site!r}: done" + (f" (process {cfg.process_id})" if cfg.coordinator is not None else ""))
    return 0


def _checkpoint_error(e: BaseException) -> bool:
    # hxtrain.checkpoints.checkpoint imports orbax, hence JAX: look its errors up only if the run got that far
    mod = sys.modules.get("hxtrain.checkpoints.checkpoint")
    return mod is not None and isinstance(e, (mod.CheckpointError, mod.CheckpointMismatch))


def _lost_process(e: BaseException) -> bool:
    """Whether `e` says that a collective lost one of the site's processes (gloo on CPU; NCCL on GPUs)."""
    text = str(e).lower()
    return any(w in text for w in ("gloo", "nccl", "connection reset", "connection closed", "heartbeat"))


def register(subparsers) -> None:
    """Add the `site` command to hxtrain's argparse subparsers."""
    p = subparsers.add_parser("site", help="run one site of a topology as this process (links over TCP)")
    add_run_arguments(p)
    p.add_argument("--site", required=True, help="the site of the topology this process runs")
    p.add_argument("--rejoin", action="store_true",
                   help="with --strategy diloco --elastic: return to a run under way, taking the global params "
                        "and outer state from the other replica at its next sync")
    p.add_argument("--addresses", help="site=host:port,... where sites listen (default: the topology's address)")
    p.add_argument("--connect", help="site=host:port,... to dial instead of a site's address (a proxy or tunnel)")
    p.add_argument("--tls-cert", help="this site's certificate (PEM), naming the site; with --tls-key and --tls-ca")
    p.add_argument("--tls-key", help="the private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", help="the CA certificate (PEM) that every site's certificate is signed by")
    p.add_argument("--process-id", type=int,
                   help="this process's rank in a site of several processes (0 = the leader, which links to the "
                        "other sites); required when the site has processes > 1")
    p.add_argument("--coordinator", help="host:port of the site's jax.distributed coordinator (on the host of "
                                         "process 0); required when the site has processes > 1")
    p.set_defaults(func=_cmd_site)
