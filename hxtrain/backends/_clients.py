"""Each site on its own PJRT client: registering the plugins a topology names, and placing sites on devices.

A brand is a client. The CUDA plugin, an Ascend plugin and jaxlib's CPU are separate PJRT clients, and no program,
mesh or collective spans two of them. Two clients can both report `platform == "cpu"` (jaxlib's and XLA's CPU
plugin loaded from a library), so sites are told apart by the client that serves them, named by the JAX platform
name it is registered under ("cpu", "cuda", "fastatomstruct_xla_cpu"), and never by their platform string.

`register_plugins` is the one place where hxtrain hands plugin libraries to JAX; it must run before JAX creates
its backends (the first array, jit or `jax.devices()`). `place_sites` calls it, then gives each site its devices
on its own client, in pipeline order, never two sites on one device unless both ask for it (`share_devices`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from hxtrain.backends._devices import columns, devices_for
from hxtrain.backends._jax_bridge import backends_initialised, register_plugin_library, registered_platforms
from hxtrain.backends._plugins import ENV_VAR, PluginSource, find_plugin, parse_pjrt_env
from hxtrain.backends._registry import BACKENDS, BackendError

# client name -> library path, for the plugins this process registered (JAX's registry is process-wide too)
_REGISTERED: dict[str, str] = {}


@dataclass(frozen=True)
class SiteClient:
    """Which PJRT client serves a site: `name` is what `jax.devices(name)` takes."""

    site: str
    source: PluginSource
    options: tuple[tuple[str, object], ...] = ()  # the plugin's create options (`plugin_options`)

    @property
    def name(self) -> str:
        return self.source.platform

    @property
    def registered_by_hxtrain(self) -> bool:
        """A plugin library (by path or package) that JAX does not discover by itself."""
        return self.source.how == "library"

    def describe(self) -> str:
        """E.g. "client 'fastatomstruct_xla_cpu' (library: /…/libpjrt_cpu.so)"."""
        return f"client {self.name!r} ({self.source.how}: {self.source.where})"


def site_client(site, *, env: Mapping[str, str] | None = None, providers: frozenset[str] | None = None,
                where: str | None = None) -> SiteClient:
    """The client of one topology site (`backend`, `plugin`, `plugin_options`); BackendError if it has none,
    naming the field (`where`.backend, where `where` is the site's path, e.g. "meshes/x.toml: sites[1]"), or else
    the site's name."""
    try:
        src = find_plugin(site.backend, plugin=site.plugin, env=env, providers=providers)
    except BackendError as e:
        if where is None:
            raise BackendError(f"site {site.name!r}: {e}") from None
        raise BackendError(f"{where}.{'plugin' if site.plugin else 'backend'} (site {site.name!r}): {e}") from None
    return SiteClient(site.name, src, tuple(getattr(site, "plugin_options", None) or ()))


def register_plugins(sites, *, env: Mapping[str, str] | None = None) -> list[SiteClient]:
    """Register with JAX every plugin library that `sites` (a Topology or its sites) name, each once, and return
    each site's client. Call it before the first JAX array when a topology names a plugin library:

        topology = hxtrain.load_topology("local-2client")
        hxtrain.register_plugins(topology)   # then build the model

    Idempotent: a plugin this process already registered is not registered again. A plugin JAX discovers itself
    (an installed `jax_plugins` package, `PJRT_NAMES_AND_LIBRARY_PATHS`) is left to JAX. BackendError, naming the
    site and the fix, when JAX's backends are already initialised without a needed plugin, when JAX_PLATFORMS
    leaves it out, or when two sites give one client name different libraries or options.
    """
    env = os.environ if env is None else env
    source = getattr(sites, "source", None)  # a Topology: errors name the field path
    clients = [site_client(s, env=env, where=None if source is None else f"{source}: sites[{i}]")
               for i, s in enumerate(getattr(sites, "sites", sites))]
    wanted: dict[str, SiteClient] = {}
    for c in clients:
        if not c.registered_by_hxtrain:
            continue
        first = wanted.setdefault(c.name, c)
        for field in ("source", "options"):
            if getattr(first, field) != getattr(c, field):
                raise BackendError(f"sites {first.site!r} and {c.site!r} both run on client {c.name!r} but give it "
                                   f"different {'libraries' if field == 'source' else 'plugin_options'} "
                                   f"({getattr(first, field)} vs {getattr(c, field)}); give both the same")
    from_env = parse_pjrt_env(env.get(ENV_VAR, ""))
    for c in wanted.values():
        _register(c, from_env, env)
    return clients


def _register(c: SiteClient, from_env: dict[str, str], env: Mapping[str, str]) -> None:
    path = c.source.where
    if _REGISTERED.get(c.name) == path:
        return
    if c.name in _REGISTERED:
        raise BackendError(f"site {c.site!r}: client {c.name!r} is already registered in this process with "
                           f"{_REGISTERED[c.name]!r}, not {path!r}; one process holds one library per client name")
    if c.name in from_env:
        if os.path.realpath(from_env[c.name]) != os.path.realpath(path):
            raise BackendError(f"site {c.site!r}: {ENV_VAR} registers client {c.name!r} from {from_env[c.name]!r}, "
                               f"but the site names {path!r}; make them agree or drop the entry")
        return  # JAX registers it itself when it starts
    import jax

    platforms = jax.config.jax_platforms
    if platforms and c.name not in platforms.split(","):
        raise BackendError(f"site {c.site!r} runs on client {c.name!r}, but JAX_PLATFORMS={platforms!r} leaves it "
                           f"out; set JAX_PLATFORMS={platforms},{c.name} (or unset it) before JAX starts")
    if backends_initialised():
        if c.name in registered_platforms():
            return  # registered by someone else before JAX started (e.g. the user, by hand)
        raise BackendError(
            f"site {c.site!r} needs PJRT plugin {c.name!r} ({path}), but JAX has already initialised its backends "
            "without it, so this process cannot reach that client; call hxtrain.register_plugins(topology) before "
            "the first JAX array (before building the model; in a notebook, restart the kernel and run it first), "
            f"or set {ENV_VAR}={c.name}{os.pathsep}{path} before starting Python")
    backend = BACKENDS.get(c.source.backend)
    # A second CPU must not become JAX's default device; an accelerator's plugin given by path may, as usual.
    priority = 400 if backend is not None and not backend.builtin else -1
    register_plugin_library(c.name, path, priority=priority, options=dict(c.options) or None)
    _REGISTERED[c.name] = path


def place_sites(sites: Sequence, *, env: Mapping[str, str] | None = None) -> list[list]:
    """Each site's `devices` devices, from its own client, in site order.

    A site starts at its `first_device` if it sets one, else after the devices earlier sites took on the same
    client. PlacementError-style BackendErrors name the site: too few devices on the client (with its count),
    two sites on one device (unless both set `share_devices`), or two client names that are one client.
    """
    clients = register_plugins(sites, env=env)
    owners: dict[tuple[int, int], object] = {}
    client_names: dict[int, str] = {}
    placed = []
    for site, c, offset in zip(sites, clients, _offsets(sites, clients)):
        devs = devices_for(site.backend, site.devices, offset, site=site.name, plugin=site.plugin, env=env)
        client = devs[0].client
        if any(d.client is not client for d in devs):
            raise BackendError(f"site {site.name!r}: the devices of client {c.name!r} belong to several PJRT "
                               "clients; a site must be one client")
        if client_names.setdefault(id(client), c.name) != c.name:
            raise BackendError(f"site {site.name!r}: clients {client_names[id(client)]!r} and {c.name!r} are the "
                               "same PJRT client, so their sites would share devices; name one of them once")
        for d in devs:
            other = owners.setdefault((id(client), d.id), site)
            if other is not site and not (getattr(other, "share_devices", False)
                                          and getattr(site, "share_devices", False)):
                raise BackendError(
                    f"sites {other.name!r} and {site.name!r} are both placed on device {d.id} of client "
                    f"{c.name!r}; give {site.name!r} a first_device past the other's devices, or set "
                    "share_devices = true on both to share them on purpose")
        placed.append(devs)
    return placed


def site_offsets(sites: Sequence, *, env: Mapping[str, str] | None = None) -> list[int]:
    """Where each site's devices start on its own client, as `place_sites` places them: its `first_device`, else
    after the devices earlier sites took on the same client. A group of the sites placed on its own (a replica)
    keeps the devices it has in the whole topology by setting these as its `first_device`s."""
    return _offsets(sites, register_plugins(sites, env=env))


def _offsets(sites: Sequence, clients: Sequence) -> list[int]:
    next_free: dict[str, int] = {}
    out = []
    for site, c in zip(sites, clients):
        first = getattr(site, "first_device", None)
        offset = next_free.get(c.name, 0) if first is None else first
        next_free[c.name] = max(next_free.get(c.name, 0), offset + site.devices)
        out.append(offset)
    return out


def client_summary(client) -> str:
    """One line about a PJRT client, e.g. 'platform cpu, version PJRT C API, 4 x cpu'."""
    devices = client.devices()
    kinds = ", ".join(sorted({d.device_kind for d in devices})) or "-"
    return f"platform {client.platform}, version {_version(client)}, {len(devices)} x {kinds}"


def _version(client) -> str:
    return " ".join(client.platform_version.split())  # some plugins report several lines


def client_rows() -> list[dict]:
    """One row per PJRT client JAX holds (initialising its backends): name, platform, version, kind, count."""
    from hxtrain.backends._jax_bridge import clients

    rows = []
    for name, client in clients().items():
        devices = client.devices()
        kinds = sorted({d.device_kind for d in devices})
        rows.append(dict(client=name, platform=client.platform, version=_version(client),
                         device_kind=", ".join(kinds) or "-", devices=len(devices),
                         library=_REGISTERED.get(name, "")))
    return rows


def format_clients(rows: list[dict]) -> str:
    """A plain-text table of `client_rows()`, one line per client."""
    head = ("client", "platform", "version", "device kind", "devices", "library")
    body = [(r["client"], r["platform"], r["version"], r["device_kind"], str(r["devices"]), r["library"] or "-")
            for r in rows]
    return "\n".join(columns(head, body))
