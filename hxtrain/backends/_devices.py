"""Devices of a backend for placement, and the backend survey behind `hxtrain info`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import jax

from hxtrain.backends._capabilities import capability_for
from hxtrain.backends._plugins import ENV_VAR, PluginSource, check_plugin_library, find_plugin, parse_pjrt_env
from hxtrain.backends._registry import BACKENDS, BackendError, PluginNotInstalledError


def _jax_devices(src: PluginSource, env: Mapping[str, str]) -> list[jax.Device]:
    """`jax.devices(platform)`, with JAX's failure wrapped in a BackendError naming the backend."""
    try:
        return list(jax.devices(src.platform))
    except Exception as e:  # RuntimeError for unknown/failed backends; plugins may raise anything
        hint = ""
        platforms = env.get("JAX_PLATFORMS", "")
        if platforms and src.platform not in platforms.split(","):
            hint = (f"; JAX_PLATFORMS={platforms!r} leaves it out: add {src.platform!r} "
                    "to JAX_PLATFORMS before JAX starts")
        raise BackendError(f"backend {src.backend!r} is installed ({src.how}: {src.where}) but failed "
                           f"to initialise: {type(e).__name__}: {e}{hint}") from e


def devices_for(backend: str, count: int, offset: int = 0, *, site: str | None = None,
                plugin: str | None = None, env: Mapping[str, str] | None = None,
                providers: frozenset[str] | None = None) -> list[jax.Device]:
    """`count` devices of `backend` starting at index `offset` of `jax.devices(platform)`.

    `backend` is a name, alias or `plugin:/path`; `plugin` is a site's `plugin = "..."` library (it
    must already be registered, see `register_plugin_library`); `site` only names the asker in errors.
    `env`/`providers` default to the process's environment and installed packages (tests pass their own).
    Returns a list of length `count`. BackendError when the backend is unknown, not installed, fails to
    initialise, or has fewer than `offset + count` devices.
    """
    who = f"site {site!r}" if site is not None else "placement"
    for field, value, low in (("count", count, 1), ("offset", offset, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise BackendError(f"{who}: {field} must be an int >= {low}, got {value!r}")
    env = os.environ if env is None else env
    src = find_plugin(backend, plugin=plugin, env=env, providers=providers)
    devices = _jax_devices(src, env)
    if offset + count > len(devices):
        start = f" starting at offset {offset}" if offset else ""
        client = f" on client {src.platform!r}" if src.platform != src.backend else ""
        hint = ""
        if src.platform == "cpu":
            hint = (f"; for fake CPU devices set XLA_FLAGS=--xla_force_host_platform_device_count="
                    f"{offset + count} before JAX starts")
        elif src.how == "library":
            hint = ("; a plugin's device count is its own (XLA's CPU plugin takes plugin_options = "
                    f"{{ cpu_device_count = {offset + count} }} in the site table)")
        raise BackendError(f"{who} asks for {count} devices of backend {src.backend!r}{client}{start}, "
                           f"which has {len(devices)}{hint}")
    return devices[offset:offset + count]


def describe(*, env: Mapping[str, str] | None = None,
             providers: frozenset[str] | None = None) -> list[dict]:
    """One row per known backend (plus plugins named only in PJRT_NAMES_AND_LIBRARY_PATHS).

    Row keys: backend, installed (bool), provider (str), initialised (bool, None if not installed),
    devices (int), device_kind (str | None), capability (one-line summary, "" if no devices),
    note (install hint or initialisation error, "" if none). Initialises JAX's backends.
    """
    env = os.environ if env is None else env
    rows = [_row(name, lambda n=name: find_plugin(n, env=env, providers=providers), env)
            for name in BACKENDS]
    try:
        from_env = parse_pjrt_env(env.get(ENV_VAR, ""))
    except BackendError:
        from_env = {}  # the malformed variable is reported on the rows of the backends it would serve
    claimed = {n for info in BACKENDS.values() for n in info.env_names}
    for name, path in from_env.items():
        if name not in claimed:  # a plugin JAX registers under its own name, unknown to hxtrain
            def src(name=name, path=path):
                where = check_plugin_library(path, what=f"{ENV_VAR} entry {name!r}")
                return PluginSource(name, name, "env", str(where))
            rows.append(_row(name, src, env))
    return rows


def _row(name: str, locate: Callable[[], PluginSource], env: Mapping[str, str]) -> dict:
    """One `describe()` row: locate the plugin, then try to start it."""
    row = dict(backend=name, installed=False, provider="", initialised=None, devices=0,
               device_kind=None, capability="", note="")
    try:
        src = locate()
    except PluginNotInstalledError:
        row["note"] = BACKENDS[name].install_hint()
        return row
    except BackendError as e:  # e.g. a malformed PJRT_NAMES_AND_LIBRARY_PATHS or a missing .so
        row["note"] = str(e)
        return row
    row.update(installed=True, provider=f"{src.how}: {src.where}")
    try:
        devices = _jax_devices(src, env)
    except BackendError as e:
        row.update(initialised=False, note=str(e))
    else:
        kind = devices[0].device_kind if devices else None
        row.update(initialised=True, devices=len(devices), device_kind=kind,
                   capability=capability_for(kind).summary() if kind else "")
    return row


def format_table(rows: list[dict]) -> str:
    """A plain-text table of `describe()` rows, one line per backend, notes indented underneath."""
    yes_no = lambda v: "-" if v is None else ("yes" if v else "no")  # noqa: E731
    head = ("backend", "installed", "initialised", "devices", "device kind", "capability")
    body = [(r["backend"], yes_no(r["installed"]), yes_no(r["initialised"]), str(r["devices"]),
             r["device_kind"] or "-", r["capability"] or "-") for r in rows]
    lines = columns(head, body)
    out = lines[:2]
    for r, line in zip(rows, lines[2:]):
        out.append(line)
        if r["note"]:
            out.append(f"    note: {r['note']}")
    return "\n".join(out)


def columns(head: tuple[str, ...], body: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned text columns: the head, a rule of dashes, then one line per row of `body`."""
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
    return [fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, body)]
