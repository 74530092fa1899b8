"""One site as its own OS process: `hxtrain site --mesh FILE --site NAME`.

The process builds only its own stages (stage s lives on site s % n_sites), links to its neighbours in pipeline
order over TCP (`hxtrain.network.tcp`: site i listens on its address for site i-1 and connects to site i+1), and walks its
own task order from `schedule.site_orders`, blocking on `recv` for inputs. Every site reads the same seeded data
stream: site 0 uses the inputs, the last site the targets. The loss exists on the last site only.

Each step ends with the optimizer, as in `hxtrain.core.optim` but with the per-stage squared gradient norms exchanged
as CONTROL frames (global-norm clipping across processes). With the same topology, model, seed and batch, the
per-step losses equal those of the in-process `Trainer` (fp32, <= 1e-5 relative).

A site with `processes = P > 1` in its topology entry runs as P processes (hosts), started as
`hxtrain site --site NAME --process-id K --coordinator host:port` for K = 0 .. P-1 (`hxtrain launch` does this on
one machine). Each process exposes `devices_per_process` devices, joins the site's `jax.distributed` cluster at the
coordinator (process 0 hosts it) before JAX starts, and runs the same programs on a mesh over every process's
devices. Only process 0, the site's leader, links to the neighbouring sites and writes `metrics-<site>.jsonl`;
every process logs its steps. See `hxtrain.network.group`.

Failure: a peer that dies, stalls or sends a bad frame raises `PeerError` naming it within `timeout` seconds; the
process prints the error and exits non-zero, closing its own links so that its other neighbours stop too. Inside a
multi-process site, a process that dies makes the next collective of the others fail at once (exit code 3), or,
if it stalls, the cluster's heartbeat (max(10, timeout) seconds) aborts them all; the leader's exit then stops the
neighbouring sites. A failing process of such a site exits at once (`os._exit`), skipping JAX's shutdown barrier,
which would wait for the dead process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time

MIN_SECRET_BYTES = 32
MIN_SECRET_SYMBOLS = 8  # a token_hex(32) has ~16; 'aaaa...' or 'abab...' is not a secret
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
    sync_sends: bool = False  # True: each send waits until its frame is on the wire (no overlap with compute)
    addresses: tuple[tuple[str, str], ...] = ()  # (site, "host:port") overrides of the topology's `address`
    connect: tuple[tuple[str, str], ...] = ()  # (site, "host:port") to dial instead of its address (proxy, tunnel)
    process_id: int | None = None  # rank within a site of several processes (0: the leader); None = 0 / missing
    coordinator: str | None = None  # "host:port" of the site's jax.distributed coordinator (processes > 1)
    checkpoint_dir: str | None = None  # checkpoints under checkpoint_dir/<site> (None: none saved)
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    keep: int = 3  # checkpoints kept per site
    resume: str = "auto"  # never | auto | must
    tls_cert: str | None = None  # this site's certificate (PEM), naming the site
    tls_key: str | None = None  # its private key
    tls_ca: str | None = None  # the CA certificate every site's certificate is signed by
    insecure_plaintext: bool = False  # links without TLS: loopback only, logged loudly
    strategy: str = "pipeline"  # or "diloco": this site is a replica (hxtrain.sites.diloco)
    elastic: bool = False  # diloco: a lost replica is dropped and this one goes on alone
    diloco: tuple[tuple[str, object], ...] = ()  # (Diloco field, value) given on the command line
    sites: tuple[str, ...] = ()  # run the topology restricted to these sites (an elastic re-plan); () = all
    stop_at: int | None = None  # end after this step; the learning-rate schedule still spans `steps`
    continue_step: int | None = None  # restore this step of checkpoint_dir, whichever topology saved it
    rejoin: bool = False  # diloco: return to a run under way, taking the outer state from the other replica
    eval_every: int = 0  # the held-out loss every N steps and at the end (0: none; the run trains on all the data)
    eval_batches: int = 4  # batches of held-out documents per evaluation (with eval_every)
    timeline: str | None = None  # Chrome trace of one step, written by each site to PATH with -<site> before its suffix
    timeline_step: int | None = None  # which step (default: the last this process runs)


class SiteError(RuntimeError):
    """A site cannot start or stopped; the message names the site."""


def set_cpu_device_count(n: int, env=os.environ) -> None:
    """Make XLA's host platform expose `n` devices; only effective before JAX initialises its backends."""
    flags = re.sub(rf"{_DEVICE_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).split()
    env["XLA_FLAGS"] = " ".join([*flags, f"{_DEVICE_FLAG}={n}"])


def keep_to_site_client(site, env=os.environ) -> str | None:
    """Keep a site process to its own PJRT client when the site runs on a CPU (jaxlib's or a CPU plugin's): JAX
    would otherwise initialise every installed PJRT plugin, and on a GPU host each CUDA client reserves most of the
    GPU's memory, so a CPU site started beside a GPU site would take the GPU site's memory. A plugin site then also
    gets its plugin's client as JAX's default. Sites on an accelerator that JAX discovers itself are left alone.
    Only before JAX initialises its backends; a JAX_PLATFORMS the user set is left alone. Returns the client name
    JAX was restricted to, or None."""
    from hxtrain.backends import BACKENDS, site_client

    backend = BACKENDS.get(site.backend)
    if env.get("JAX_PLATFORMS") or (backend is not None and not backend.builtin and site.plugin is None):
        return None
    import jax

    name = site_client(site, env=env).name
    jax.config.update("jax_platforms", name)
    return name


def read_secret(env_name: str, env=os.environ) -> bytes:
    """The run's shared secret from environment variable `env_name`: >= MIN_SECRET_BYTES bytes, not a repeated
    pattern (fewer than MIN_SECRET_SYMBOLS distinct characters); SiteError naming the flag otherwise."""
    value = env.get(env_name)
    raw = (value or "").encode()
    if len(raw) < MIN_SECRET_BYTES or len(set(raw)) < MIN_SECRET_SYMBOLS:
        got = ("is not set" if not value else f"has {len(raw)} bytes" if len(raw) < MIN_SECRET_BYTES
               else f"has only {len(set(raw))} distinct characters")
        raise SiteError(f"--secret-env: environment variable {env_name} {got}; every site needs the same random "
                        f"secret of >= {MIN_SECRET_BYTES} bytes there (`hxtrain launch` sets one), e.g. "
                        f"export {env_name}=$(python -c 'import secrets; print(secrets.token_hex(32))')")
    return raw


def site_tls(cfg: SiteConfig):
    """The site's `TlsConfig`, or None with --insecure-plaintext; SiteError naming the flag otherwise."""
    from hxtrain.network.tls import TlsError, from_flags

    try:
        return from_flags(cfg.site, cfg.tls_cert, cfg.tls_key, cfg.tls_ca, plaintext=cfg.insecure_plaintext)
    except TlsError as e:
        raise SiteError(str(e)) from None


def parse_addresses(text: str | None, flag: str = "--addresses") -> tuple[tuple[str, str], ...]:
    """'a=127.0.0.1:5000,b=10.0.0.2:5001' -> (('a', '127.0.0.1:5000'), ('b', '10.0.0.2:5001')); None (the flag
    not given) -> (). A bad entry is refused naming `flag`."""
    if text is None:
        return ()
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, eq, addr = item.partition("=")
        if not eq or not name or _split_address(addr) is None:
            raise ValueError(f"{flag}: expected site=host:port[,site=host:port...], got {item!r}")
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


def check_processes(site, process_id: int | None, coordinator: str | None) -> int:
    """This process's rank in the site (0 for a one-process site); SiteError unless `--process-id` and
    `--coordinator` fit the site's `processes`."""
    n = site.processes
    if n == 1:
        if process_id not in (None, 0):
            raise SiteError(f"--process-id {process_id}: site {site.name!r} runs in one process (processes = 1); "
                            "leave --process-id out")
        if coordinator is not None:
            raise SiteError(f"--coordinator {coordinator}: site {site.name!r} runs in one process (processes = 1) "
                            "and has no jax.distributed cluster; leave --coordinator out")
        return 0
    if process_id is None or not 0 <= process_id < n:
        got = "is missing" if process_id is None else f"is {process_id}"
        raise SiteError(f"--process-id {got}: site {site.name!r} spans {n} processes; start one `hxtrain site` per "
                        f"process with --process-id 0 .. {n - 1} (0 is the leader, which links to the other sites)")
    if coordinator is None or _split_address(coordinator) is None:
        got = "is missing" if coordinator is None else f"{coordinator!r} is not host:port"
        raise SiteError(f"--coordinator {got}: site {site.name!r} spans {n} processes, which meet at a "
                        "jax.distributed coordinator; pass the same --coordinator host:port (on the host of "
                        "process 0) to each of them")
    return process_id


def check_schedule(schedule) -> None:
    """ValueError when the per-site loop cannot run `schedule`.

    The loop runs every task kind a valid table holds (F, B and, with split backward, W), so any `Schedule` runs.
    What depends on the topology (interleaved sends from the last site back to the first, so it needs 2 sites) is
    checked by `check_supported`."""
    if not callable(getattr(schedule, "site_orders", None)):
        raise ValueError(f"schedule: expected a Schedule with per-site task orders (site_orders), got "
                         f"{type(schedule).__name__}")


def check_supported(topology, name: str, schedule) -> int:
    """The site's index; SiteError for what this runner cannot do yet."""
    topology.site(name)  # TopologyError naming the known sites

    try:
        check_schedule(schedule)
    except ValueError as e:
        raise SiteError(str(e)) from None
    if getattr(schedule, "virtual", 1) > 1 and topology.n_sites > 2:
        raise SiteError(f"schedule {schedule.name!r} sends from the last site back to the first, but sites are "
                        f"linked in a chain ({topology.n_sites} sites); use it with 2 sites or use 1f1b / gpipe")
    return [s.name for s in topology.sites].index(name)


def connect_peers(topology, index: int, peers, cfg: SiteConfig, secret: bytes, tls, max_bytes: int) -> dict:
    """Endpoints {site index: Endpoint} from site `index` to the sites `peers` (indices into the topology;
    a pipeline site's are its neighbours): it dials every peer after it in the topology's order and accepts every
    peer before it, on its own address, in whatever order they come. `tls`: the site's TlsConfig, or None
    (plaintext, loopback only)."""
    from hxtrain.network.listener import Listener
    from hxtrain.network.tcp import Endpoint

    names = [s.name for s in topology.sites]
    me = names[index]
    endpoints = {}
    listener = None
    before = {names[i]: i for i in sorted(peers) if i < index}
    try:
        if before:
            host, port = site_address(topology, me, cfg.addresses)
            listener = Listener(host, port)
        for i in sorted(i for i in peers if i > index):
            host, port = site_address(topology, names[i], cfg.addresses + cfg.connect)
            ep = Endpoint.connect(me, names[i], host, port, secret=secret, tls=tls,
                                  timeout=cfg.connect_timeout, max_bytes=max_bytes)
            ep.timeout = cfg.timeout  # the long wait was for start-up; from now on a silent peer is a failure
            endpoints[i] = ep
        if before:
            for name, ep in listener.accept_all(me, tuple(before), secret=secret, tls=tls,
                                                timeout=cfg.connect_timeout, max_bytes=max_bytes).items():
                ep.timeout = cfg.timeout
                endpoints[before[name]] = ep
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
    from hxtrain.schedules import tables as _schedules
    from hxtrain.config.topology import load_topology

    from hxtrain.sites.elastic import check_segment
    from hxtrain.training.trainer import resolve_run

    topo = load_topology(cfg.mesh)
    try:
        cfg = resolve_run(topo, cfg)
        check_segment(cfg)
    except ValueError as e:  # bad input: one line and exit 2, also for a process of a multi-process site
        raise SiteError(str(e)) from None
    if cfg.sites:
        try:
            topo = topo.only(cfg.sites, "sites")
        except ValueError as e:  # an unknown site, or survivors with no link between them
            raise SiteError(f"--sites {','.join(cfg.sites)}: {e}") from None
    schedule = _schedules.get_schedule(cfg.schedule)
    index = check_supported(topo, cfg.site, schedule)
    diloco = None
    if cfg.elastic and cfg.strategy != "diloco":
        raise SiteError("--elastic: a pipeline site does not re-plan by itself; `hxtrain launch --elastic` does "
                        "(a site continues on the survivors with --sites, --partition and --continue-step)")
    if cfg.rejoin and not (cfg.elastic and cfg.strategy == "diloco"):
        raise SiteError("--rejoin: only a DiLoCo replica of an elastic run returns by itself (--strategy diloco "
                        "--elastic); a pipeline site comes back through `hxtrain launch --elastic`")
    if cfg.strategy == "diloco":
        from hxtrain.sites import diloco as _replica
        from hxtrain.sites import replicas as _replicas
        from hxtrain.sites.relink import Relink

        diloco = _replicas.check(topo, cfg, SiteError)
    site = topo.sites[index]
    cfg = dataclasses.replace(cfg, process_id=check_processes(site, cfg.process_id, cfg.coordinator))
    secret = read_secret(cfg.secret_env)
    tls = site_tls(cfg) if cfg.process_id == 0 else None  # only the leader links to other sites
    if cfg.process_id == 0 and tls is None:
        log(f"site {site.name!r}: WARNING: links to other sites are NOT encrypted (--insecure-plaintext); they are "
            "refused unless both ends are on loopback")
    if site.backend == "cpu":
        set_cpu_device_count(site.devices_per_process)
    keep_to_site_client(site)
    from hxtrain.backends import register_plugins

    client = register_plugins([site])[0]  # before anything starts JAX's backends (jax.distributed does)
    if site.processes > 1:
        beat = max(10.0, math.ceil(cfg.timeout))  # the coordination service's floor for a stalled process
        from hxtrain.network.group import init_site_cluster

        init_site_cluster(cfg.coordinator, site.processes, cfg.process_id, timeout=cfg.connect_timeout,
                          heartbeat_timeout=beat, shutdown_timeout=beat)
        log(f"site {site.name!r}: process {cfg.process_id} of {site.processes} joined the site's cluster at "
            f"{cfg.coordinator}")

    from hxtrain.sites import program as _prog  # imports JAX: after the device count is set
    from hxtrain.sites.steps import run_loop

    # Link first, so that a wrong secret, a version mismatch or a missing peer shows in seconds, before the model
    # is built. The frame bound is provisional until the model's width is known; tightening it later can only
    # leave a looser bound on the read that is already waiting, never refuse a good frame. Only a site's leader
    # (process 0) links to other sites.
    peers = [i for i in (index - 1, index + 1) if 0 <= i < topo.n_sites] if diloco is None else \
        _replicas.peers(topo, diloco, index)
    endpoints = connect_peers(topo, index, peers, cfg, secret, tls, _PROVISIONAL_MAX_BYTES) \
        if cfg.process_id == 0 else {}
    try:
        if cfg.process_id == 0:
            how = "mutual TLS 1.3" if tls is not None else "plaintext"
            log(f"site {site.name!r}: linked to {sorted(ep.peer for ep in endpoints.values())} ({how})")
        if diloco is not None:
            relink = Relink(topo, index, cfg, secret, tls, log) if cfg.elastic else None
            return _replica.run(topo, index, cfg, diloco, endpoints, log, relink)
        local = _prog.LocalSite.build(topo, index, cfg)
        log(f"site {site.name!r}: {client.describe()}: {local.describe_client()}")
        log(local.describe())
        for ep in endpoints.values():
            ep.max_bytes = local.max_frame_bytes()
        transport = local.transport(endpoints, overlap=not cfg.sync_sends)
        log(f"site {site.name!r}: sends {'synchronous' if cfg.sync_sends else 'overlapped with compute'}")
        t0 = time.perf_counter()
        local.warm_up()  # compile every program first: afterwards, silence longer than `timeout` is a failure
        ckpt = newest = None
        if cfg.checkpoint_dir:
            from hxtrain.checkpoints.site import SiteCheckpoints

            ckpt = SiteCheckpoints(local, cfg.checkpoint_dir, save_every=cfg.save_every, keep=cfg.keep,
                                   resume=cfg.resume, log=log)
            if cfg.continue_step is None:
                newest = ckpt.newest()  # before the barrier: verifying it may take longer than the link timeout
        transport.barrier(cfg.connect_timeout)
        log(f"site {site.name!r}: compiled in {time.perf_counter() - t0:.1f} s; all sites ready")
        start = 0
        if ckpt is not None:  # the same step on every site
            start = ckpt.resume(transport, newest) if cfg.continue_step is None else \
                ckpt.continue_from(cfg.continue_step)
            transport.barrier(cfg.connect_timeout)  # restoring may take longer than the link timeout
        return run_loop(local, transport, cfg, log, start, ckpt)
    finally:
        for ep in endpoints.values():
            ep.close()
