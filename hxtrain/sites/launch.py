"""`hxtrain launch --mesh FILE`: every site of a topology as a local subprocess (tests, notebooks, one machine).

Each site runs `python -m hxtrain site --site NAME ...` with its own fake CPU device count, a port on loopback (its
topology `address`, else a free one), a fresh random secret shared through the environment, and its own certificate
of a CA minted for the run (`hxtrain.network.certs`, in a private temporary folder deleted at the end), so that every
link is mutual TLS 1.3 (`plaintext=True` / `--insecure-plaintext` opts out, on loopback only). Their output is
streamed with a `[site] ` prefix. When a site fails, the others get `grace` seconds to notice (they stop by
themselves within their `--timeout`, naming the lost site), then are killed; the launcher exits non-zero naming
the site that failed first.

A site with `processes = P > 1` is started as P processes `hxtrain site --process-id K --coordinator 127.0.0.1:PORT`
(a free loopback port for the site's jax.distributed coordinator), each with `devices_per_process` fake CPU devices;
their output is prefixed `[site/K] `, and the failure of any one of them counts as the site's failure.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

from hxtrain.sites import cli as _site_cli
from hxtrain.sites import process as _site

MAX_REJOINS = 3  # an elastic DiLoCo replica is started again at most this many times
LOST_PEER = 3  # the exit code of `hxtrain site` when it stopped because a peer site or a process of its site was lost


@dataclasses.dataclass(frozen=True)
class SiteExit:
    """How one site process ended. `returncode` < 0 is the signal that killed it; `killed` = by the launcher."""

    site: str
    returncode: int
    killed: bool = False
    process: int | None = None  # rank within a site of several processes; None for a one-process site

    def describe(self) -> str:
        what = f"site {self.site!r}" + ("" if self.process is None else f" process {self.process}")
        if self.returncode < 0:
            sig = signal.Signals(-self.returncode).name if -self.returncode in signal.Signals._value2member_map_ \
                else str(-self.returncode)
            who = "by the launcher: it did not stop within the grace period" if self.killed else "from outside"
            return f"{what} was killed by {sig} ({who})"
        return f"{what} exited with code {self.returncode}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def site_addresses(topology) -> dict[str, str]:
    """Listening address of each site: its topology `address`, else a free loopback port."""
    return {s.name: s.address or f"127.0.0.1:{free_port()}" for s in topology.sites}


def site_command(mesh: str, site: str, addresses: dict[str, str], site_args: list[str], timeout: float,
                 python: str = sys.executable) -> list[str]:
    addr = ",".join(f"{k}={v}" for k, v in addresses.items())
    return [python, "-m", "hxtrain", "site", "--mesh", str(mesh), "--site", site, "--addresses", addr,
            "--timeout", str(timeout), *site_args]


def _pump(proc, prefix: str, out, lock) -> None:
    for line in iter(proc.stdout.readline, ""):
        with lock:
            out.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
            out.flush()
    proc.stdout.close()


def launch(mesh: str, site_args: list[str] = (), *, timeout: float = 30.0, grace: float | None = None,
           addresses: dict[str, str] | None = None, prefix: dict[str, list[str]] | None = None,
           env: dict[str, str] | None = None, out=None, secret_env: str = "HXTRAIN_SECRET",
           extra: dict[str, list[str]] | None = None, plaintext: bool = False,
           elastic: bool = False, only: tuple[str, ...] | None = None, rejoin: int = 0) -> list[SiteExit]:
    """Run every site of topology `mesh` as a subprocess and wait for all of them.

    site_args: extra `hxtrain site` arguments (--model, --steps, ...). addresses: {site: "host:port"} overrides.
    prefix: {site: argv prefix}, e.g. ["ip", "netns", "exec", "hxa"] to run a site in a network namespace.
    extra: {site: more `hxtrain site` arguments for that site only}, e.g. ["--connect", "b=127.0.0.1:7000"].
    plaintext: link the sites without TLS (loopback only) instead of minting a certificate per site.
    elastic: a failed site does not stop the others (`--elastic`: DiLoCo replicas go on without it); once one has
    finished, the rest get `grace` seconds, then are killed.
    grace: seconds the other sites get to stop by themselves after one fails (default: timeout + 5).
    only: start these sites of the topology only (`site_args` then say `--sites` too: an elastic segment).
    rejoin (elastic DiLoCo): a replica that failed by itself while the others run is started again with --rejoin,
    at most `rejoin` times per site.
    A site with processes > 1 is started as that many processes around a coordinator on a free loopback port.
    Returns one SiteExit per process, the first failure first (all codes 0 when the run succeeded).
    """
    from hxtrain.config.topology import load_topology

    topo = load_topology(mesh)
    out = out or sys.stdout
    grace = timeout + 5.0 if grace is None else grace
    addresses = {**site_addresses(topo), **(addresses or {})}
    base = dict(os.environ if env is None else env)
    base[secret_env] = secrets.token_hex(32)  # fresh per run: a stray process of another run cannot join
    base["PYTHONUNBUFFERED"] = "1"
    lock = threading.Lock()
    procs, pumps = {}, []
    old_term = None
    cert_dir = None if plaintext else tempfile.mkdtemp(prefix="hxtrain-run-certs-")
    if threading.current_thread() is threading.main_thread():
        # a SIGTERM to the launcher must still stop the sites (they run in their own sessions): raise, so that
        # the `finally` below kills them
        old_term = signal.signal(signal.SIGTERM, _terminated)
    try:
        tls_flags = {}
        if cert_dir is not None:
            from hxtrain.network.certs import mint_run_certs

            tls_flags = {name: ["--tls-cert", c.cert, "--tls-key", c.key, "--tls-ca", c.ca]
                         for name, c in mint_run_certs(cert_dir, [s.name for s in topo.sites]).items()}
        def start(s, k: int, coordinator, more=()):
            child = dict(base)
            if s.backend == "cpu":
                _site.set_cpu_device_count(s.devices_per_process, child)
            cmd = (prefix or {}).get(s.name, []) + site_command(mesh, s.name, addresses, list(site_args), timeout)
            cmd += ["--secret-env", secret_env, *tls_flags.get(s.name, ["--insecure-plaintext"]),
                    *(extra or {}).get(s.name, []), *more]
            multi = coordinator is not None
            if multi:
                cmd += ["--process-id", str(k), "--coordinator", coordinator]
            proc = procs[(s.name, k if multi else None)] = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child, start_new_session=True)
            what = f"site {s.name!r}" + (f" process {k} of {s.processes}" if multi else "")
            role = f"listens on {addresses[s.name]}" if k == 0 else "follower"
            role += f", coordinator {coordinator}" if multi else ""
            with lock:
                out.write(f"[launch] {what}: pid {proc.pid}, {role}{' (rejoins)' if more else ''}\n")
                out.flush()
            t = threading.Thread(target=_pump, args=(proc, f"[{s.name + (f'/{k}' if multi else '')}] ", out, lock),
                                 daemon=True)
            t.start()
            pumps.append(t)
            return proc

        for s in topo.sites:
            if only is not None and s.name not in only:
                continue
            coordinator = f"127.0.0.1:{free_port()}" if s.processes > 1 else None
            for k in range(s.processes):
                start(s, k, coordinator)
        again = None
        if rejoin:
            left = {s.name: rejoin for s in topo.sites}

            def again(site: str, code: int):
                if left[site] == 0:
                    return None
                left[site] -= 1
                with lock:
                    out.write(f"[launch] elastic: site {site!r} exited with code {code}; starting it again to "
                              "rejoin the run\n")
                return start(topo.site(site), 0, None, ["--rejoin"])
        exits = _wait(procs, grace, elastic, again)
    finally:
        for p in procs.values():  # nothing outlives the launcher, whatever happened
            if p.poll() is None:
                p.kill()
                p.wait()
        for t in pumps:
            t.join(5)
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if cert_dir is not None:
            shutil.rmtree(cert_dir, ignore_errors=True)
    return exits


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


def _wait(procs: dict, grace: float, elastic: bool = False, again=None) -> list[SiteExit]:
    """Poll until every process exits; after the first failure (elastic: the first success), give the rest
    `grace` s, then kill them. `procs` maps (site, process rank or None) to its Popen. `again(site, code)`: a
    new Popen for a site that failed by itself while no other has finished (elastic rejoin), or None."""
    done: dict[tuple, SiteExit] = {}
    failed_at = None
    order = []
    while len(done) < len(procs):
        for key, p in list(procs.items()):
            if key not in done and p.poll() is not None:
                if again is not None and p.returncode not in (0, LOST_PEER) and failed_at is None and \
                        again(key[0], p.returncode) is not None:
                    continue  # started again (it replaced itself in `procs`)
                done[key] = SiteExit(key[0], p.returncode, process=key[1])
                order.append(key)
                if (p.returncode == 0 if elastic else p.returncode != 0) and failed_at is None:
                    failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for key, p in procs.items():
                if key not in done:
                    p.kill()
                    p.wait()
                    done[key] = SiteExit(key[0], p.returncode, killed=True, process=key[1])
                    order.append(key)
        time.sleep(0.05)
    exits = [done[n] for n in order]
    # The likely cause first: a site that failed by itself; then one the launcher had to kill because it did not
    # stop within the grace period although its peers had (it was stalled: they lost it); then the sites that
    # stopped because they lost a peer (exit code LOST_PEER); within each group in the order they ended (sorted is
    # stable). One poll can see a killed process and the peer that stopped for it in either order.
    return sorted(exits, key=lambda e: (e.returncode == 0, e.returncode == LOST_PEER, not e.killed))


def _cmd_launch(args) -> int:
    site_args = []
    for flag, value in (("--model", args.model), ("--schedule", args.schedule), ("--microbatches", args.microbatches),
                        ("--steps", args.steps), ("--batch-size", args.batch_size), ("--lr", args.lr),
                        ("--seed", args.seed), ("--data", args.data), ("--out", args.out),
                        ("--partition", args.partition), ("--checkpoint-dir", args.checkpoint_dir),
                        ("--save-every", args.save_every), ("--keep", args.keep), ("--resume", args.resume),
                        ("--eval-every", args.eval_every), ("--eval-batches", args.eval_batches),
                        ("--timeline", args.timeline), ("--timeline-step", args.timeline_step)):
        if value is not None:
            site_args += [flag, ",".join(map(str, value)) if flag == "--partition" else str(value)]
    site_args += ["--sync-sends"] if args.sync_sends else []
    from hxtrain.training.diloco_run import diloco_flag_args

    site_args += ["--strategy", args.strategy, *diloco_flag_args(args)]
    if args.elastic and args.strategy == "pipeline":
        return _elastic_pipeline(args, site_args)
    if args.elastic:
        site_args += ["--elastic"]
    for flag in ("sites", "stop_at", "continue_step"):
        if getattr(args, flag) is not None:
            site_args += [f"--{flag.replace('_', '-')}", str(getattr(args, flag)) if flag != "sites"
                          else ",".join(args.sites)]
    exits = launch(args.mesh, site_args, timeout=args.timeout, grace=args.grace, secret_env=args.secret_env,
                   plaintext=args.insecure_plaintext, elastic=args.elastic, only=args.sites,
                   rejoin=MAX_REJOINS if args.elastic and not args.no_rejoin else 0)
    failed = [e for e in exits if e.returncode != 0]
    finished = sorted({e.site for e in exits if e.returncode == 0})
    if args.elastic and failed and finished:
        print(f"[launch] elastic: {'; '.join(e.describe() for e in failed)}; the run finished on "
              f"{', '.join(map(repr, finished))}", flush=True)
        return 0
    if not failed:
        n_sites = len({e.site for e in exits})
        procs = f" ({len(exits)} processes)" if len(exits) != n_sites else ""
        print(f"[launch] all {n_sites} sites finished{procs}")
        return 0
    print(f"hxtrain launch: error: {failed[0].describe()}; " + "; ".join(e.describe() for e in exits[1:]),
          file=sys.stderr, flush=True)
    return 1


def _elastic_pipeline(args, site_args: list[str]) -> int:
    """`launch --elastic` of a pipeline: segments over the sites that are up (`hxtrain.sites.elastic`)."""
    from hxtrain.config.topology import load_topology
    from hxtrain.sites import elastic as _elastic
    from hxtrain.training.trainer import resolve_run

    given = [f"--{f.replace('_', '-')}" for f in ("sites", "stop_at", "continue_step") if getattr(args, f) is not None]
    try:
        if given:
            raise _elastic.ElasticError(f"--elastic chooses {', '.join(given)} itself; leave them out")
        topo = load_topology(args.mesh)
        cfg = resolve_run(topo, _site_cli.config_from_args(args, topo.sites[0].name))
        run = _elastic.Run(model=cfg.model, schedule=cfg.schedule, microbatches=cfg.microbatches,
                           batch_size=cfg.batch_size, steps=cfg.steps, save_every=cfg.save_every,
                           checkpoint_dir=cfg.checkpoint_dir, partition=cfg.partition, resume=cfg.resume,
                           out=cfg.out)
        _elastic.check(topo, run, args.strategy)
        site_args = list(site_args)  # --partition goes per segment
        if "--partition" in site_args:
            at = site_args.index("--partition")
            del site_args[at:at + 2]
        code = _elastic.run_elastic(args.mesh, site_args, run, rejoin=not args.no_rejoin, timeout=args.timeout,
                                    grace=args.grace, secret_env=args.secret_env, plaintext=args.insecure_plaintext)
    except (_elastic.ElasticError, ValueError) as e:
        print(f"hxtrain launch: error: {e}", file=sys.stderr, flush=True)
        return 1
    print("[launch] elastic: the run finished", flush=True)
    return code


def register(subparsers) -> None:
    """Add the `launch` command to hxtrain's argparse subparsers."""
    p = subparsers.add_parser("launch", help="start every site of a topology as a local process (loopback TCP)")
    _site_cli.add_run_arguments(p)
    p.add_argument("--grace", type=float, help="seconds the other sites get after one fails (default timeout+5)")
    p.add_argument("--no-rejoin", action="store_true",
                   help="with --elastic: a lost site is not started again; the survivors finish the run")
    p.set_defaults(func=_cmd_launch)
