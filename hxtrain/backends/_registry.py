"""The backends hxtrain knows by name: aliases, which package provides each, and how to install it.

A backend name is what a site's `backend = "..."` field says. It resolves to one canonical name
(`gpu` -> `cuda`, `npu` -> `ascend`), or to `plugin:/path/libfoo.so` for a PJRT plugin given by
library path. No JAX here: this module is pure data plus name resolution.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType


class BackendError(RuntimeError):
    """A backend is unknown, absent, unloadable, failed to start, or cannot serve what a site asks."""


class PluginNotInstalledError(BackendError):
    """A known backend whose plugin is nowhere to be found; the message says what to install."""


@dataclass(frozen=True)
class BackendInfo:
    """What hxtrain knows about one backend before touching JAX.

    `platform` is the name JAX's `jax.devices(...)` takes; `provider_patterns` are regexes matched
    against installed provider names (`jax_plugins` submodules and entry points, plus `libtpu`);
    `env_names` are the names that may serve it in `PJRT_NAMES_AND_LIBRARY_PATHS`.
    """

    name: str
    aliases: tuple[str, ...]
    platform: str
    pip_packages: tuple[str, ...]  # what provides it on PyPI; () = no public package
    extra: str | None  # `pip install 'hxtrain[extra]'`; None = no extra
    provider_patterns: tuple[str, ...]
    env_names: tuple[str, ...]
    builtin: bool = False  # shipped inside jaxlib: always installed

    def install_hint(self) -> str:
        """One sentence telling the user how to get this backend."""
        if self.builtin:
            return "it ships with jaxlib"
        if not self.pip_packages:
            return ("no public JAX PJRT plugin exists for Ascend; point hxtrain at one with "
                    'plugin = "/path/to/libpjrt_ascend.so" in the site table or '
                    "PJRT_NAMES_AND_LIBRARY_PATHS=ascend:/path.so")
        how = f"pip install 'hxtrain[{self.extra}]'" if self.extra else f"pip install {self.pip_packages[0]}"
        pkgs = " or ".join(self.pip_packages)
        return (f"install it with `{how}` (provides {pkgs}), or point PJRT_NAMES_AND_LIBRARY_PATHS="
                f"{self.platform}:/path/to/plugin.so at a plugin library")


# Package names checked against PyPI in 2026: the CUDA plugin is split into a Python part
# (`jax-cuda12-plugin`, module `jax_plugins.xla_cuda12`) and the PJRT library (`jax-cuda12-pjrt`);
# ROCm follows the same scheme (`jax-rocm7-plugin` + `jax-rocm7-pjrt`, module `jax_plugins.xla_rocm7`).
# TPU support is `libtpu`, which jaxlib loads itself (no jax_plugins module). Huawei publishes no
# JAX plugin for Ascend; a private one can only come in by library path.
BACKENDS: MappingProxyType[str, BackendInfo] = MappingProxyType({
    b.name: b
    for b in (
        BackendInfo("cpu", (), "cpu", (), None, (), ("cpu",), builtin=True),
        BackendInfo("cuda", ("gpu", "nvidia"), "cuda",
                    ("jax-cuda12-plugin", "jax-cuda13-plugin"), "cuda",
                    (r"xla_cuda\d*",), ("cuda",)),
        BackendInfo("rocm", ("amd",), "rocm", ("jax-rocm7-plugin", "jax-rocm6-plugin"), "rocm",
                    (r"xla_rocm\d*",), ("rocm",)),
        BackendInfo("tpu", (), "tpu", ("libtpu",), "tpu", (r"libtpu",), ("tpu",)),
        BackendInfo("ascend", ("npu",), "ascend", (), None, (r".*(ascend|npu).*",), ("ascend", "npu")),
    )
})

PLUGIN_PREFIX = "plugin:"
# A plugin library shipped inside an installed Python package: `package:NAME` (its one libpjrt*.so) or
# `package:NAME/sub/dir/lib.so`, so a topology names a pip-installed plugin without a machine-specific path.
PACKAGE_PREFIX = "package:"
# Platform names of clients that jaxlib creates itself: a plugin must never be registered under one of them
# (JAX would keep one of the two), so a plugin library whose file is named after one gets a `plugin_` prefix.
BUILTIN_PLATFORMS = ("cpu", "interpreter")
_ALIASES = MappingProxyType({a: b.name for b in BACKENDS.values() for a in (b.name, *b.aliases)})


def known_backend_names() -> tuple[str, ...]:
    """Every name `canonical_backend` accepts (canonical names and aliases), sorted."""
    return tuple(sorted(_ALIASES))


def canonical_backend(name: str) -> str:
    """`'GPU'` -> `'cuda'`, `'npu'` -> `'ascend'`, `'plugin:/x/libfoo.so'` unchanged; else BackendError."""
    if not isinstance(name, str) or not name.strip():
        raise BackendError(f"backend name must be a non-empty string, got {name!r}")
    if name.startswith(PLUGIN_PREFIX):
        path = name[len(PLUGIN_PREFIX):]
        if not path:
            raise BackendError(f"backend {name!r}: expected 'plugin:/path/to/libpjrt_x.so', the path is empty")
        return name
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    close = difflib.get_close_matches(key, _ALIASES, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise BackendError(f"unknown backend {name!r}: known backends are {', '.join(known_backend_names())}, "
                       f"or 'plugin:/path/to/libpjrt_x.so'{hint}")


def plugin_client_name(spec: str, library_path: str | Path) -> str:
    """The JAX platform name hxtrain registers a plugin library under (the name of its client).

    `package:fastatomstruct_xla_cpu` -> `'fastatomstruct_xla_cpu'` (the package's top-level name);
    a path -> `plugin_platform_name(path)`, prefixed `plugin_` when that is a builtin platform
    (`/x/libpjrt_cpu.so` -> `'plugin_cpu'`), so the plugin's client never replaces jaxlib's own.
    """
    if spec.startswith(PACKAGE_PREFIX):
        top = re.split(r"[./]", spec[len(PACKAGE_PREFIX):], maxsplit=1)[0]
        name = re.sub(r"[^a-z0-9_]", "_", top.lower())
    else:
        name = plugin_platform_name(library_path)
    return f"plugin_{name}" if name in BUILTIN_PLATFORMS else name


def plugin_platform_name(library_path: str | Path) -> str:
    """The JAX platform name for a plugin given only by path: `/x/libpjrt_foo_bar.so` -> `'foo_bar'`.

    Strips `lib`, `pjrt_`/`pjrt-`, `_plugin`, `_pjrt` and the extension, and lower-cases, so the
    usual vendor names land on the platform name the plugin itself would register.
    """
    stem = Path(library_path).name.split(".")[0].lower()
    stem = re.sub(r"^lib", "", stem)
    stem = re.sub(r"^pjrt[_-]?", "", stem)
    stem = re.sub(r"[_-](pjrt|plugin)$", "", stem)
    stem = re.sub(r"[^a-z0-9_]", "_", stem)
    if not stem:
        raise BackendError(f"cannot derive a platform name from plugin path {str(library_path)!r}; "
                           "name the file libpjrt_<name>.so or register it with an explicit name")
    return stem
