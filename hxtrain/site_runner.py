"""One site as its own OS process: `hxtrain site --mesh FILE --site NAME`.

The process builds only its own stages (stage s lives on site s % n_sites), links to its neighbours in pipeline
order over TCP (`hxtrain.net`: site i listens on its address for site i-1 and connects to site i+1), and walks its
own task order from `schedule.site_orders`, blocking on `recv` for inputs. Every site reads the same seeded data
stream: site 0 uses the inputs, the last site the targets. The loss exists on the last site only.

Each step ends with the optimizer, as in `hxtrain.optim` but with the per-stage squared gradient norms exchanged
as CONTROL frames (global-norm clipping across processes). With the same topology, model, seed and batch, the
per-step losses equal those of the in-process `Trainer` (fp32, <= 1e-5 relative).

Failure: a peer that dies, stalls or sends a bad frame raises `PeerError` naming it within `timeout` seconds; the
process prints the error and exits non-zero, closing its own links so that its other neighbours stop too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from pathlib import Path

MIN_SECRET_BYTES = 16
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_PROVISIONAL_MAX_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class SiteConfig:
    """What one site process runs. None fields come from the topology's [run] table."""

    mesh: str
    site: str
    model: str | None = None
    schedule: str | None = None
    microbatches: int | None = None
    steps: int | None = None
    batch_size: int | None = None
    partition: tuple[int, ...] | None = None
    learning_rate: float = 3e-3
    seed: int = 0
    data: str | None = None
    out: str | None = None
    timeout: float = 30.0  # seconds a peer may stay silent before this site stops, naming it
    connect_timeout: float = 60.0  # seconds to wait for neighbours to come up
    secret_env: str = "HXTRAIN_SECRET"
    addresses: tuple[tuple[str, str], ...] = ()  # (site, "host:port") overrides of the topology's `address`
    connect: tuple[tuple[str, str], ...] = ()  # (site, "host:port") to dial instead of its address (proxy, tunnel)


class SiteError(RuntimeError):
    """A site cannot start or stopped; the message names the site."""


def set_cpu_device_count(n: int, env=os.environ) -> None:
    """Make XLA's host platform expose `n` devices; only effective before JAX initialises its backends."""
    flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={n}"])


def read_secret(env_name: str, env=os.environ) -> bytes:
    value = env.get(env_name)
    if not value or len(value.encode()) < MIN_SECRET_BYTES:
        got = "is not set" if not value else f"has {len(value.encode())} bytes"
        raise SiteError(f"--secret-env: environment variable {env_name} {got}; every site needs the same random "
                        f"secret of >= {MIN_SECRET_BYTES} bytes there (`hxtrain launch` sets one), e.g. "
                        f"export {env_name}=$(python -c 'import secrets; print(secrets.token_hex(32))')")
    return value.encode()


def parse_addresses(text: str) -> tuple[tuple[str, str], ...]:
    """'a=127.0.0.1:5000,b=10.0.0.2:5001' -> (('a', '127.0.0.1:5000'), ('b', '10.0.0.2:5001'))."""
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, addr = item.partition("=")
        if not eq or not name or _split_address(addr) is None:
            raise ValueError(f"--addresses: expected site=host:port[,site=host:port...], got {item!r}")
        out.append((name, addr))
    return tuple(out)


def _split_address(addr: str) -> tuple[str, int] | None:
    host, colon, port = addr.rpartition(":")
    return (host, int(port)) if colon and host and port.isdigit() and 0 < int(port) < 65536 else None


def site_address(topology, name: str, overrides: tuple[tuple[str, str], ...]) -> tuple[str, int]:
    """(host, port) where site `name` listens for its predecessor: --addresses first, then the topology."""
    addr = dict(overrides).get(name) or topology.site(name).address
    if addr is None:
        raise SiteError(f"site {name!r} has no address: set `address = \"host:port\"` for it in "
                        f"{topology.source} or pass --addresses {name}=host:port (`hxtrain launch` picks free ports)")
    parsed = _split_address(addr)
    if parsed is None:
        raise SiteError(f"site {name!r}: address {addr!r} is not host:port with 0 < port < 65536")
    return parsed


def check_supported(topology, name: str, schedule) -> int:
    """The site's index; SiteError for what this runner cannot do yet."""
    site = topology.site(name)
    if site.processes > 1:
        raise SiteError(f"site {name!r} spans {site.processes} processes: multi-host sites (jax.distributed inside "
                        "the site) are not wired into `hxtrain site` yet (init_site_cluster joins the processes; the "
                        "per-site loop still assumes one process); give the site processes = 1")
    from hxtrain.site_step import check_schedule  # imports JAX, but does not initialise a backend

    try:
        check_schedule(schedule)
    except ValueError as e:
        raise SiteError(str(e)) from None
    if getattr(schedule, "virtual", 1) > 1 and topology.n_sites > 2:
        raise SiteError(f"schedule {schedule.name!r} sends from the last site back to the first, but sites are "
                        f"linked in a chain ({topology.n_sites} sites); use it with 2 sites or use 1f1b / gpipe")
    return [s.name for s in topology.sites].index(name)


def init_site_cluster(coordinator: str, num_processes: int, process_id: int, *, timeout: float = 60.0) -> None:
    """Join this process to its site's `jax.distributed` cluster (a site spanning several hosts); call before JAX
    initialises. Afterwards `jax.devices()` lists every process's devices and collectives span them. On CPU the
    cross-process collectives need the gloo implementation, selected here where this JAX has the option."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # newer JAX: gloo is the default or the option is gone
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout))


def _connect(topology, index: int, cfg: SiteConfig, secret: bytes, max_bytes: int) -> dict:
    """Endpoints to the neighbours of site `index`: connect to the successor, accept the predecessor."""
    from hxtrain.net import Listener
    from hxtrain.net import Endpoint

    names = [s.name for s in topology.sites]
    me = names[index]
    endpoints = {}
    listener = None
    try:
        if index > 0:
            host, port = site_address(topology, me, cfg.addresses)
            listener = Listener(host, port)
        if index + 1 < len(names):
            host, port = site_address(topology, names[index + 1], cfg.addresses + cfg.connect)
            ep = Endpoint.connect(me, names[index + 1], host, port, secret=secret, timeout=cfg.connect_timeout,
                                  max_bytes=max_bytes)
            ep.timeout = cfg.timeout  # the long wait was for start-up; from now on a silent peer is a failure
            endpoints[index + 1] = ep
        if listener is not None:
            ep = listener.accept(me, names[index - 1], secret=secret, timeout=cfg.connect_timeout,
                                 max_bytes=max_bytes)
            ep.timeout = cfg.timeout
            endpoints[index - 1] = ep
    except BaseException:
        for ep in endpoints.values():
            ep.close()
        raise
    finally:
        if listener is not None:
            listener.close()
    return endpoints


def run_site(cfg: SiteConfig, log=print) -> list[dict]:
    """Run one site to the end; returns its per-step metric rows (loss only on the last site).

    JAX must not have initialised yet if the fake CPU device count has to change (the CLI makes sure of that).
    """
    from hxtrain import schedules as _schedules
    from hxtrain.topology import load_topology

    topo = load_topology(cfg.mesh)
    run = topo.run
    cfg = dataclasses.replace(
        cfg, model=cfg.model or run.model, schedule=cfg.schedule or run.schedule,
        microbatches=cfg.microbatches or run.microbatches, batch_size=cfg.batch_size or run.batch_size,
        steps=cfg.steps or run.steps)
    schedule = _schedules.get_schedule(cfg.schedule)
    index = check_supported(topo, cfg.site, schedule)
    secret = read_secret(cfg.secret_env)
    site = topo.sites[index]
    if site.backend == "cpu":
        set_cpu_device_count(site.devices_per_process)

    from hxtrain import site_program as _prog  # imports JAX: after the device count is set

    # Link first, so that a wrong secret, a version mismatch or a missing peer shows in seconds, before the model
    # is built. The frame bound is provisional until the model's width is known; tightening it later can only
    # leave a looser bound on the read that is already waiting, never refuse a good frame.
    endpoints = _connect(topo, index, cfg, secret, _PROVISIONAL_MAX_BYTES)
    try:
        log(f"site {site.name!r}: linked to {sorted(ep.peer for ep in endpoints.values())}")
        local = _prog.LocalSite.build(topo, index, cfg)
        log(local.describe())
        for ep in endpoints.values():
            ep.max_bytes = local.max_frame_bytes()
        transport = local.transport(endpoints)
        t0 = time.perf_counter()
        local.warm_up()  # compile every program first: afterwards, silence longer than `timeout` is a failure
        transport.barrier(cfg.connect_timeout)
        log(f"site {site.name!r}: compiled in {time.perf_counter() - t0:.1f} s; all sites ready")
        return _loop(local, transport, cfg, log)
    finally:
        for ep in endpoints.values():
            ep.close()


def _loop(local, transport, cfg: SiteConfig, log) -> list[dict]:
    name = local.site.name
    out = None
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        out = open(Path(cfg.out) / f"metrics-{name}.jsonl", "a")
    history = []
    try:
        for step in range(1, cfg.steps + 1):
            tokens = local.next_batch()
            t0 = time.perf_counter()
            transport.reset_stats()
            transport.step = step
            loss, norm = local.train_step(tokens, transport)
            row = {"step": step, "site": name, "loss": None if loss is None else float(loss),
                   "grad_norm": float(norm), "step_s": time.perf_counter() - t0,
                   "bytes_per_link": transport.bytes_per_link(),
                   "payload_bytes_per_link": transport.payload_bytes_per_link(),
                   "control_bytes": transport.control_bytes}
            if row["loss"] is not None and not math.isfinite(row["loss"]):
                raise SiteError(f"site {name!r}: step {step}: loss is {row['loss']}; stopping")
            history.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            loss_txt = "" if row["loss"] is None else f" loss {row['loss']:.6f}"
            sent = " ".join(f"{k} {v} B" for k, v in row["bytes_per_link"].items())
            log(f"step {step}{loss_txt} grad_norm {row['grad_norm']:.4f} step_s {row['step_s']:.3f} "
                f"sent {sent or '-'} control {row['control_bytes']} B")
    finally:
        if out:
            out.close()
    return history


# ---- command line ------------------------------------------------------------------------------------------------


def add_run_arguments(p) -> None:
    """Arguments shared by `hxtrain site` and `hxtrain launch`."""
    p.add_argument("--mesh", default="local", help="topology TOML file or shipped name (default: local)")
    p.add_argument("--model", help="model preset (default: the topology's [run] model)")
    p.add_argument("--schedule", help="gpipe, 1f1b or interleaved (default: the topology's)")
    p.add_argument("--microbatches", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="global batch in sequences")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", help="a text file or folder (default: this Python's standard library sources)")
    p.add_argument("--out", help="folder for metrics-<site>.jsonl")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a peer may stay silent before this site stops and names it (default 30)")
    p.add_argument("--secret-env", default="HXTRAIN_SECRET",
                   help="environment variable holding the shared secret (default HXTRAIN_SECRET)")


def config_from_args(args, site: str, addresses=()) -> SiteConfig:
    partition = tuple(int(x) for x in args.partition.split(",")) if getattr(args, "partition", None) else None
    return SiteConfig(mesh=args.mesh, site=site, model=args.model, schedule=args.schedule,
                      microbatches=args.microbatches, steps=args.steps, batch_size=args.batch_size,
                      partition=partition, learning_rate=args.lr, seed=args.seed, data=args.data, out=args.out,
                      timeout=args.timeout, connect_timeout=max(60.0, args.timeout), secret_env=args.secret_env,
                      addresses=addresses)


def _cmd_site(args) -> int:
    from hxtrain.net import PeerError

    try:
        addresses = parse_addresses(args.addresses or "")
        cfg = dataclasses.replace(config_from_args(args, args.site, addresses),
                                  connect=parse_addresses(args.connect or ""))
    except ValueError as e:
        print(f"hxtrain site: error: {e}", file=sys.stderr)
        return 2
    log = lambda msg: print(f"{msg}", flush=True)  # noqa: E731
    try:
        run_site(cfg, log=log)
    except PeerError as e:
        print(f"hxtrain site {args.site!r}: error: lost a peer: {e}", file=sys.stderr, flush=True)
        return 3
    except SiteError as e:
        print(f"hxtrain site {args.site!r}: error: {e}", file=sys.stderr, flush=True)
        return 2
    log(f"site {args.site!r}: done")
    return 0


def register(subparsers) -> None:
    """Add the `site` command to hxtrain's argparse subparsers."""
    p = subparsers.add_parser("site", help="run one site of a topology as this process (links over TCP)")
    add_run_arguments(p)
    p.add_argument("--site", required=True, help="the site of the topology this process runs")
    p.add_argument("--addresses", help="site=host:port,... where sites listen (default: the topology's address)")
    p.add_argument("--connect", help="site=host:port,... to dial instead of a site's address (a proxy or tunnel)")
    p.add_argument("--partition", help="blocks per stage, e.g. 5,3 (default: the topology's or even)")
    p.set_defaults(func=_cmd_site)
