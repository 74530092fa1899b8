"""Finding PJRT plugins: installed `jax_plugins` providers, `PJRT_NAMES_AND_LIBRARY_PATHS`, library files.

Everything here only *looks*: it never imports a plugin module, never registers anything with JAX,
and loads a library only in `check_plugin_library(..., load=True)`. Functions that read the process
state (environment, installed packages) take it as an optional argument so tests can hand in their own.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from hxtrain.backends._registry import (BACKENDS, PACKAGE_PREFIX, PLUGIN_PREFIX, BackendError,
                                        PluginNotInstalledError, canonical_backend, plugin_client_name)

ENV_VAR = "PJRT_NAMES_AND_LIBRARY_PATHS"
# First bytes of a shared library: ELF (Linux), Mach-O 32/64/fat in both byte orders (macOS), PE (Windows).
_LIBRARY_MAGIC = (b"\x7fELF", b"\xfe\xed\xfa\xce", b"\xfe\xed\xfa\xcf", b"\xce\xfa\xed\xfe",
                  b"\xcf\xfa\xed\xfe", b"\xca\xfe\xba\xbe", b"MZ")


@dataclass(frozen=True)
class PluginSource:
    """Where a backend comes from: `how` is 'builtin', 'jax_plugins', 'libtpu', 'env' or 'library'."""

    backend: str  # canonical hxtrain name ("cuda", "plugin:/x.so", ...)
    platform: str  # the name to pass to jax.devices()
    how: str
    where: str  # module name, or library path, or "jaxlib"


def parse_pjrt_env(value: str, *, sep: str = os.pathsep) -> dict[str, str]:
    """Parse `'name:/path.so,name2:/path2.so'` into `{name: path}`, strictly.

    JAX itself logs a warning and drops an entry it cannot parse, so a typo silently loses a
    backend; here every entry JAX would misread is an error naming the entry.
    """
    if not value:
        return {}
    out: dict[str, str] = {}
    for entry in value.split(","):
        parts = entry.split(sep)
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise BackendError(f"{ENV_VAR}: malformed entry {entry!r} in {value!r}; expected "
                               f"'name{sep}/path/to/plugin.so' entries separated by commas")
        name, path = parts
        if name != name.strip() or path != path.strip():
            raise BackendError(f"{ENV_VAR}: entry {entry!r} has spaces around the name or path, which "
                               "JAX keeps as part of them; remove the spaces")
        if name in out:
            raise BackendError(f"{ENV_VAR}: plugin name {name!r} appears twice in {value!r}")
        out[name] = path
    return out


def installed_providers() -> frozenset[str]:
    """Names of installed plugin providers, without importing them.

    The union of the `jax_plugins` namespace's submodules (`pkgutil.iter_modules`), the names and
    target modules of the `jax_plugins` entry-point group (what JAX itself scans), and `libtpu`.
    """
    names: set[str] = set()
    spec = importlib.util.find_spec("jax_plugins")
    if spec is not None and spec.submodule_search_locations:
        names |= {m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))}
    for ep in importlib.metadata.entry_points(group="jax_plugins"):
        names.add(ep.name)
        names.add(ep.value.split(":")[0].rsplit(".", 1)[-1])
    if importlib.util.find_spec("libtpu") is not None:
        names.add("libtpu")
    return frozenset(names)


def check_plugin_library(path: str | os.PathLike, *, load: bool = False, what: str = "plugin") -> Path:
    """Check that `path` is a PJRT plugin library and return it resolved; BackendError otherwise.

    A `.json` path is read as JAX's plugin config (`{"library_path": ...}`) and its library checked.
    With `load=True` the library is also dlopen-ed and must export `GetPjrtApi`; that runs its static
    initialisers, so callers do it only right before registering.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise BackendError(f"{what}: PJRT plugin library {str(path)!r} does not exist")
    if not p.is_file():
        raise BackendError(f"{what}: PJRT plugin library {str(path)!r} is not a file; "
                           "expected the path of the plugin's .so")
    if p.suffix == ".json":
        try:
            lib = json.loads(p.read_text())["library_path"]
        except (ValueError, KeyError, TypeError) as e:
            raise BackendError(f"{what}: plugin config {str(path)!r} must be JSON with a "
                               f"\"library_path\" field ({type(e).__name__}: {e})") from None
        return check_plugin_library(lib, load=load, what=f"{what} (from {p.name})")
    with p.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_LIBRARY_MAGIC):
        raise BackendError(f"{what}: {str(path)!r} is not a shared library (its first bytes are {head!r}); "
                           "expected a PJRT plugin .so")
    if load:
        try:
            lib = ctypes.CDLL(str(p.resolve()))
        except OSError as e:
            raise BackendError(f"{what}: cannot load PJRT plugin library {str(path)!r}: {e}") from None
        if not hasattr(lib, "GetPjrtApi"):
            raise BackendError(f"{what}: {str(path)!r} loads but does not export GetPjrtApi, "
                               "so it is not a PJRT plugin")
    return p.resolve()


def locate_plugin_library(spec: str | os.PathLike, *, what: str = "plugin") -> Path:
    """The library a plugin spec names, checked: a path, or `package:NAME[/file.so]` inside an installed package.

    A package is found with `importlib.util.find_spec`, which does not run the package's code. Without a file
    part it must hold exactly one `libpjrt*.so` (or, failing that, one `*.so`); otherwise the error lists them.
    """
    text = str(spec)
    if not text.startswith(PACKAGE_PREFIX):
        return check_plugin_library(text, what=what)
    package, _, inner = text[len(PACKAGE_PREFIX):].partition("/")
    if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", package):
        raise BackendError(f"{what}: {text!r}: expected 'package:NAME' or 'package:NAME/path/lib.so' with NAME "
                           "an importable Python package, e.g. 'package:fastatomstruct_xla_cpu'")
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations:
        raise BackendError(f"{what}: {text!r}: no Python package {package!r} is installed in this environment "
                           f"({os.path.dirname(os.path.dirname(os.__file__))}); pip install the package that ships "
                           "the plugin, or give the library's path instead")
    roots = [Path(p) for p in found.submodule_search_locations]
    if inner:
        for root in roots:
            if (root / inner).exists():
                return check_plugin_library(root / inner, what=what)
        raise BackendError(f"{what}: {text!r}: package {package!r} ({roots[0]}) has no file {inner!r}")
    libs = sorted({p for root in roots for p in root.glob("libpjrt*.so*")}) or \
        sorted({p for root in roots for p in root.glob("*.so")})
    if len(libs) != 1:
        have = ", ".join(p.name for p in libs) or "no .so file"
        raise BackendError(f"{what}: {text!r}: expected one PJRT library in package {package!r} ({roots[0]}), "
                           f"found {have}; name it as 'package:{package}/FILE.so'")
    return check_plugin_library(libs[0], what=what)


def find_plugin(backend: str, *, plugin: str | os.PathLike | None = None,
                env: Mapping[str, str] | None = None,
                providers: frozenset[str] | None = None) -> PluginSource:
    """Where `backend` (a name, alias or `plugin:/path`) comes from; BackendError if from nowhere.

    Order: an explicit `plugin` spec (a site's `plugin = "..."`: a path or `package:NAME`), a `plugin:` backend,
    the builtin CPU, an installed provider module, then `PJRT_NAMES_AND_LIBRARY_PATHS`.
    `env` defaults to `os.environ`, `providers` to `installed_providers()`.
    """
    name = canonical_backend(backend)
    if plugin is not None:
        path = locate_plugin_library(plugin, what=f"backend {name!r} plugin")
        # An accelerator's own plugin given by path registers under its usual platform name ("cuda"); a plugin
        # serving the builtin "cpu" backend must get a client of its own, so it is named after its library.
        known = name in BACKENDS and not BACKENDS[name].builtin
        platform = BACKENDS[name].platform if known else plugin_client_name(str(plugin), path)
        return PluginSource(name, platform, "library", str(path))
    if name.startswith(PLUGIN_PREFIX):
        spec = name[len(PLUGIN_PREFIX):]
        path = locate_plugin_library(spec, what=f"backend {name!r}")
        return PluginSource(name, plugin_client_name(spec, path), "library", str(path))
    info = BACKENDS[name]
    if info.builtin:
        return PluginSource(name, info.platform, "builtin", "jaxlib")
    providers = installed_providers() if providers is None else providers
    for pattern in info.provider_patterns:
        for mod in sorted(providers):
            if re.fullmatch(pattern, mod):
                how = "libtpu" if mod == "libtpu" else "jax_plugins"
                return PluginSource(name, info.platform, how, mod)
    env = os.environ if env is None else env
    from_env = parse_pjrt_env(env.get(ENV_VAR, ""))
    for env_name in info.env_names:
        if env_name in from_env:
            path = check_plugin_library(from_env[env_name], what=f"{ENV_VAR} entry {env_name!r}")
            return PluginSource(name, env_name, "env", str(path))
    raise PluginNotInstalledError(f"backend {name!r} is known but no plugin for it is installed: {info.install_hint()}")
