"""Topologies: the sites of a run, the links between them and the run's defaults, loaded from TOML.

A topology is plain data. Sites are listed in pipeline order; each is one homogeneous JAX island
(one backend, one device kind, one `Mesh(('data', 'tensor'))` of `data * tensor` devices). Links carry
activations forward and cotangents backward between sites; consecutive sites must be linked.

Validation lives in `Topology.__post_init__`, so a topology built in code (`uniform`, `dataclasses.replace`)
is checked exactly like one read from a file. Every message starts with the source (file or "<code>") and
the field path, e.g. `meshes/local.toml: sites[1].data: ...`. No JAX here: backend names are checked by the
backend registry later.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

import meshes
# TopologyError is defined with the checks and is part of this module's API
from hxtrain.config.checks import TopologyError, int_to_float, is_int, show, validate  # noqa: F401

_BACKEND_ALIASES = {"npu": "ascend", "gpu": "cuda"}


@dataclass(frozen=True)
class Site:
    """One homogeneous island: `devices = data * tensor` devices of one backend and device kind."""

    name: str
    backend: str  # lower-case; "npu" -> "ascend", "gpu" -> "cuda"
    devices: int
    data: int
    tensor: int
    device_kind: str | None = None  # "H100", "Ascend910B", ...; None = whatever the backend has
    layers: int | None = None  # blocks on this site; None = even split
    plugin: str | None = None  # PJRT plugin library: "/path/libpjrt_x.so" or "package:NAME" (a pip-installed one)
    plugin_options: tuple[tuple[str, object], ...] | None = None  # the plugin's create options (a TOML table)
    first_device: int | None = None  # first device index on its client; None = after the earlier sites' devices
    share_devices: bool = False  # True on two sites lets them be placed on the same devices on purpose
    compute_dtype: str | None = None  # one of COMPUTE_DTYPES; None = the backend's policy
    memory_gib: float | None = None  # per-device override for the planner
    peak_tflops: float | None = None  # per-device override for the planner
    address: str | None = None  # "host:port" in multi-process mode; None = loopback
    processes: int = 1  # OS processes (hosts) making up the site

    def __post_init__(self):
        # Normalise only well-typed values; wrong types are reported by Topology with their field path.
        if isinstance(self.backend, str):
            b = self.backend.strip().lower()
            object.__setattr__(self, "backend", _BACKEND_ALIASES.get(b, b))
        for f in ("memory_gib", "peak_tflops"):
            int_to_float(self, f)
        if isinstance(self.plugin_options, dict):  # a tuple of pairs keeps the frozen Site hashable
            object.__setattr__(self, "plugin_options", tuple(sorted(self.plugin_options.items())))

    @property
    def devices_per_process(self) -> int:
        return self.devices // self.processes


@dataclass(frozen=True)
class Link:
    """A link between two sites (either direction); codecs compress what crosses it."""

    sites: tuple[str, str]
    bandwidth_gbps: float  # Gbit/s
    latency_ms: float
    activations: str = "none"  # codec of forward activations, one of CODEC_NAMES
    cotangents: str = "none"  # codec of backward cotangents, one of CODEC_NAMES

    def __post_init__(self):
        if isinstance(self.sites, list):
            object.__setattr__(self, "sites", tuple(self.sites))
        int_to_float(self, "bandwidth_gbps")
        int_to_float(self, "latency_ms")


@dataclass(frozen=True)
class RunDefaults:
    """The default run of a topology (the `[run]` table)."""

    model: str = "small"
    schedule: str = "1f1b"
    microbatches: int = 8
    batch_size: int = 32  # global batch, sequences per step
    steps: int = 300

    def fill(self, config, **defaults):
        """`config` (a dataclass with model, schedule, microbatches, batch_size and steps fields, e.g. `RunConfig`)
        with each field that is None taken from `defaults`, else from this [run] table. An explicit value is kept,
        0 included, and a count that is not a whole number >= 1 is refused naming its flag (`--batch-size`)."""
        changes = {}
        for f in ("model", "schedule", "microbatches", "batch_size", "steps"):
            value = getattr(config, f)
            if value is None:
                value = defaults[f] if defaults.get(f) is not None else getattr(self, f)
            elif f in ("microbatches", "batch_size", "steps") and not (is_int(value) and value >= 1):
                raise TopologyError(f"--{f.replace('_', '-')}: expected a whole number >= 1, got {value!r}")
            changes[f] = value
        return dataclasses.replace(config, **changes)


@dataclass(frozen=True)
class Diloco:
    """Low-communication data parallelism across replicas (the `[diloco]` table; `hxtrain train --strategy diloco`).

    Each replica (a site, or a group of sites that pipeline the model among themselves) trains the whole model on
    its share of the batch; every `sync_every` inner steps the replicas average their pseudo-gradients
    (params at the last sync - params now) and all apply the same outer Nesterov step (DiLoCo, Douillard et al.
    2023). `fragments` > 1: parameter fragments sync at staggered steps (Streaming DiLoCo), each one's result
    applied `overlap` inner steps after its exchange began, keeping a `mix` share of the local params then."""

    replicas: tuple[tuple[str, ...], ...] | None = None  # groups of sites, each in pipeline order; None: one per site
    sync_every: int = 500  # H: inner steps per outer step (the paper's value at scale)
    outer_lr: float = 0.7
    outer_momentum: float = 0.9  # Nesterov; 0 = plain SGD
    fragments: int = 1
    overlap: int = 0  # tau: inner steps between a fragment's exchange and the use of its result
    mix: float = 0.0  # alpha: share of the local params kept when a late result is applied (0: take the global)
    codec: str = "none"  # pseudo-gradients on the link: none, bf16, int8 or fp8 (hxtrain.links.codecs)
    shares: tuple[float, ...] | str | None = None  # each replica's share of the global batch; None = equal;
    # "planned": in proportion to the tokens/s the planner predicts for each replica (`training.diloco.replica_shares`);
    # "planned:FILE": the same from the block times measured by `hxtrain profile --out FILE`; "measured": equal,
    # then at every outer step (each H steps) in proportion to each replica's rows per second of inner step

    def __post_init__(self):
        if isinstance(self.replicas, list):
            object.__setattr__(self, "replicas", tuple(tuple(g) if isinstance(g, list) else g
                                                       for g in self.replicas))
        if isinstance(self.shares, list):
            object.__setattr__(self, "shares", tuple(self.shares))
        for f in ("outer_lr", "outer_momentum", "mix"):
            int_to_float(self, f)

    def groups(self, topology) -> tuple[tuple[str, ...], ...]:
        """The replicas as groups of site names (one site each when `replicas` is None)."""
        return self.replicas if self.replicas is not None else tuple((s.name,) for s in topology.sites)


@dataclass(frozen=True)
class Topology:
    """Sites in pipeline order, their links and the default run; validated on construction."""

    name: str
    sites: tuple[Site, ...]
    links: tuple[Link, ...]
    run: RunDefaults
    source: str  # the file it came from, or "<code>"
    description: str = ""
    diloco: Diloco | None = None  # the [diloco] table: how `--strategy diloco` groups and syncs the sites

    def __post_init__(self):
        object.__setattr__(self, "sites", tuple(self.sites))
        object.__setattr__(self, "links", tuple(self.links))
        validate(self)

    @property
    def n_sites(self) -> int:
        return len(self.sites)

    @property
    def total_devices(self) -> int:
        return sum(s.devices for s in self.sites)

    def site(self, name: str) -> Site:
        for s in self.sites:
            if s.name == name:
                return s
        known = ", ".join(repr(s.name) for s in self.sites)
        raise TopologyError(f"{self.source}: no site named {name!r}; sites: {known}")

    def link(self, a: str, b: str) -> Link:
        """The link between sites `a` and `b`, in either order."""
        self.site(a), self.site(b)
        for ln in self.links:
            if set(ln.sites) == {a, b}:
                return ln
        have = ", ".join(f"{x}-{y}" for x, y in (ln.sites for ln in self.links)) or "none"
        raise TopologyError(f"{self.source}: no link between {a!r} and {b!r}; links: {have}")

    def neighbours(self) -> list[tuple[Site, Site]]:
        """Consecutive (sender, receiver) pairs in pipeline order: n_sites - 1 of them."""
        return list(zip(self.sites[:-1], self.sites[1:]))

    def layer_shares(self, n_layers: int) -> tuple[int, ...]:
        """Blocks per site, shape (n_sites,), summing to `n_layers`.

        From `Site.layers` when the file gives them, else an even split with the remainder going to the
        first sites (8 on 3 sites -> (3, 3, 2)).
        """
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise TopologyError(f"{self.source}: n_layers: expected a positive integer, got {show(n_layers)}")
        if self.n_sites > n_layers:
            raise TopologyError(
                f"{self.source}: {self.n_sites} sites need at least one block each, but the model has "
                f"{n_layers} layers; use a topology with at most {n_layers} sites or a deeper model"
            )
        if self.sites[0].layers is not None:
            shares = tuple(s.layers for s in self.sites)
            if sum(shares) != n_layers:
                raise TopologyError(
                    f"{self.source}: sites[*].layers = {list(shares)} sum to {sum(shares)}, but the model has "
                    f"{n_layers} layers; make the shares sum to {n_layers} or remove them for an even split"
                )
            return shares
        return even_split(n_layers, self.n_sites)

    def only(self, names, what: str = "sites") -> Topology:
        """The sites `names`, in that order, as a topology of their own, with the links among them and no `layers`
        shares (they would not sum to the model); `what` names the part in its name and source, e.g. "survivors".
        TopologyError naming an unknown site."""
        names = list(dict.fromkeys(names))
        if not names:
            raise TopologyError(f"{self.source}: {what}: expected at least one site, got none")
        sites = tuple(dataclasses.replace(self.site(n), layers=None) for n in names)
        keep = set(names)
        links = tuple(ln for ln in self.links if set(ln.sites) <= keep)
        label = "+".join(s.name for s in sites)
        return dataclasses.replace(self, name=f"{self.name}[{label}]", sites=sites, links=links,
                                   source=f"{self.source} ({what} {label})", diloco=None)

    def replace_sites(self, **changes) -> Topology:
        """A copy with `changes` applied to every site, e.g. `replace_sites(backend="cpu", device_kind=None)`."""
        return dataclasses.replace(self, sites=tuple(dataclasses.replace(s, **changes) for s in self.sites))

    def replace_site(self, name: str, **changes) -> Topology:
        """A copy with `changes` applied to the site called `name`."""
        self.site(name)
        sites = tuple(dataclasses.replace(s, **changes) if s.name == name else s for s in self.sites)
        return dataclasses.replace(self, sites=sites)

    def summary(self) -> str:
        """A few human-readable lines: what this topology resolves to."""
        plural = "s" if self.n_sites != 1 else ""
        lines = [f"topology {self.name!r} ({self.source}): {self.n_sites} site{plural}, {self.total_devices} devices"]
        for s in self.sites:
            kind = f" {s.device_kind}" if s.device_kind else ""
            extra = "".join(f", {f} {getattr(s, f)}" for f in ("plugin", "layers", "compute_dtype", "address")
                            if getattr(s, f) is not None)
            procs = f", {s.processes} processes" if s.processes > 1 else ""
            lines.append(f"  {s.name}: {s.backend}{kind} x {s.devices} = data {s.data} x tensor {s.tensor}"
                         f"{procs}{extra}")
        for ln in self.links:
            lines.append(f"  {ln.sites[0]} <-> {ln.sites[1]}: {ln.bandwidth_gbps:g} Gbit/s, {ln.latency_ms:g} ms, "
                         f"activations {ln.activations}, cotangents {ln.cotangents}")
        r = self.run
        lines.append(f"  run: model {r.model}, schedule {r.schedule}, {r.microbatches} microbatches, "
                     f"batch {r.batch_size}, {r.steps} steps")
        return "\n".join(lines)


def even_split(n: int, k: int) -> tuple[int, ...]:
    """`n` items in `k` contiguous parts, shape (k,), sizes differing by at most one, the remainder on the first
    parts: 8 on 3 -> (3, 3, 2). The one even split of blocks over stages or sites (placement, planner, topology)."""
    q, r = divmod(n, k)
    return tuple(q + (i < r) for i in range(k))


def uniform(n_sites: int, data: int = 1, tensor: int = 1, backend: str = "cpu", layers=None,
            bandwidth_gbps: float = 100.0, latency_ms: float = 1.0) -> Topology:
    """`n_sites` identical sites "s0", "s1", ... of `data * tensor` devices, linked in a chain.

    `layers` is None (even split), one int for every site, or a sequence of one int per site.
    """
    if isinstance(n_sites, bool) or not isinstance(n_sites, int) or n_sites < 1:
        raise TopologyError(f"<code>: n_sites: expected a positive integer, got {show(n_sites)}")
    if layers is None or isinstance(layers, int):
        layers = [layers] * n_sites
    layers = list(layers)
    if len(layers) != n_sites:
        raise TopologyError(f"<code>: layers: expected one share per site ({n_sites}), got {len(layers)}")
    d = data * tensor if is_int(data) and is_int(tensor) else data
    sites = tuple(Site(f"s{i}", backend, d, data, tensor, layers=layers[i]) for i in range(n_sites))
    links = tuple(Link((f"s{i}", f"s{i + 1}"), bandwidth_gbps, latency_ms) for i in range(n_sites - 1))
    return Topology(f"uniform-{n_sites}x{data}x{tensor}", sites, links, RunDefaults(), "<code>",
                    f"{n_sites} {backend} sites x (data {data} x tensor {tensor})")


def shipped() -> list[Path]:
    """Every topology file shipped in the `meshes` package, sorted by name."""
    return sorted(meshes.DIR.glob("*.toml"))


def load_topology(path: str | os.PathLike) -> Topology:
    """Read and validate a topology file; a bare name ("local", "local.toml") is looked up in `meshes/`."""
    p = _find(path)
    src = str(p)
    try:
        raw = tomllib.loads(p.read_bytes().decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TopologyError(f"{src}: invalid TOML: {e}") from e
    except OSError as e:
        raise TopologyError(f"{src}: cannot read: {e}") from e

    _check_keys(src, "", raw, {"name", "description", "sites", "links", "run", "diloco"}, set())
    sites = [_build(src, f"sites[{i}]", t, Site, {"name", "backend", "devices", "data", "tensor"})
             for i, t in enumerate(_tables(src, "sites", raw.get("sites", [])))]
    links = [_build(src, f"links[{i}]", t, Link, {"sites", "bandwidth_gbps", "latency_ms"}, {"sites": "between"})
             for i, t in enumerate(_tables(src, "links", raw.get("links", [])))]
    run = raw.get("run", {})
    if not isinstance(run, dict):
        raise TopologyError(f"{src}: run: expected a table [run], got {show(run)}")
    run = _build(src, "run", run, RunDefaults, set())
    diloco = raw.get("diloco")
    if diloco is not None:
        if not isinstance(diloco, dict):
            raise TopologyError(f"{src}: diloco: expected a table [diloco], got {show(diloco)}")
        diloco = _build(src, "diloco", diloco, Diloco, set())
    return Topology(raw.get("name", p.stem), tuple(sites), tuple(links), run, src, raw.get("description", ""),
                    diloco)


# --- loading helpers --------------------------------------------------------------------------------------


def _find(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir():
        raise TopologyError(f"{path}: is a folder; expected a topology .toml file or a shipped name such as 'local'")
    if p.parent == Path("."):  # a bare name: look in the shipped files
        cand = meshes.DIR / (p.name if p.suffix == ".toml" else p.name + ".toml")
        if cand.is_file():
            return cand
    names = [f.stem for f in shipped()]
    close = difflib.get_close_matches(p.stem, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise TopologyError(f"{path}: no such topology file{hint}; shipped topologies: {', '.join(names)} "
                        f"(in {meshes.DIR})")


def _tables(src: str, where: str, value) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise TopologyError(f"{src}: {where}: expected an array of tables [[{where}]], got {show(value)}")
    return value


def _check_keys(src: str, where: str, table: dict, allowed: set[str], required: set[str]) -> None:
    prefix = f"{where}." if where else ""
    for key in table:
        if key not in allowed:
            close = difflib.get_close_matches(key, sorted(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise TopologyError(f"{src}: {prefix}{key}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}")
    missing = sorted(required - table.keys())
    if missing:
        raise TopologyError(f"{src}: {prefix}{missing[0]}: missing required key "
                            f"(required: {', '.join(sorted(required))})")


def _build(src: str, where: str, table: dict, cls, required: set[str], spelled: dict[str, str] | None = None):
    """`cls(**table)` after checking keys; `spelled` maps a field to its name in the file (Link.sites: between)."""
    spelled = spelled or {}
    fields = {spelled.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}
    _check_keys(src, where, table, set(fields), {spelled.get(k, k) for k in required})
    return cls(**{fields[k]: v for k, v in table.items()})
