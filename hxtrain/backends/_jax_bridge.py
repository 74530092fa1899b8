"""The one place hxtrain touches JAX's private plugin API (`jax._src.xla_bridge`).

JAX has no public way to register a PJRT plugin by path from Python; `xla_bridge.register_plugin`
is what the official plugin packages call from their `initialize()`. It only works before JAX creates
its backends (the first `jax.devices()`, `jit`, array...), and its home may move between releases,
so both are checked here and turned into a BackendError that says what to do instead.
"""

from __future__ import annotations

import inspect
import os
import re
from types import ModuleType
from typing import Any

from hxtrain.backends._plugins import ENV_VAR, check_plugin_library
from hxtrain.backends._registry import BackendError

_NAME_RE = re.compile(r"[a-z][a-z0-9_]*")
_NEEDED_PARAMS = ("priority", "library_path", "options")


def _bridge() -> ModuleType:
    try:
        from jax._src import xla_bridge
    except ImportError as e:  # the private module moved
        raise BackendError(_moved(f"cannot import jax._src.xla_bridge ({e})")) from None
    return xla_bridge


def _moved(why: str) -> str:
    import jax

    return (f"cannot register PJRT plugins from Python with jax {jax.__version__}: {why}; "
            f"set {ENV_VAR}=name:/path/plugin.so in the environment before starting Python instead")


def _register_api(bridge: Any) -> Any:
    """`bridge.register_plugin` if it still has the signature hxtrain calls, else BackendError."""
    fn = getattr(bridge, "register_plugin", None)
    if not callable(fn):
        raise BackendError(_moved("jax._src.xla_bridge.register_plugin no longer exists"))
    params = inspect.signature(fn).parameters
    missing = [p for p in _NEEDED_PARAMS if p not in params]
    if missing:
        raise BackendError(_moved(f"jax._src.xla_bridge.register_plugin lost parameter(s) {missing}"))
    return fn


def _backends_initialised(bridge: Any) -> bool:
    """Whether JAX already created its backends (after which new plugins are ignored or refused)."""
    fn = getattr(bridge, "backends_are_initialized", None)
    if callable(fn):
        return bool(fn())
    backends = getattr(bridge, "_backends", None)
    if isinstance(backends, dict):
        return bool(backends)
    raise BackendError(_moved("cannot tell whether JAX's backends are initialised "
                              "(no backends_are_initialized() nor _backends)"))


def register_plugin_library(name: str, library_path: str | os.PathLike, *, priority: int = 400,
                            options: dict[str, str | int | float | bool | list[int]] | None = None,
                            _bridge_module: Any = None) -> None:
    """Register the PJRT plugin at `library_path` with JAX under platform `name`.

    Must run before anything initialises JAX's backends. Checks, in order: the name, the file
    (exists, is a file, is a shared library), that the private API is where expected, that backends are
    not initialised, then loads the library (it must export GetPjrtApi) and hands it to JAX.
    Afterwards `jax.devices(name)` reaches the plugin's devices. A `.json` plugin config is accepted for
    its library path only; pass its create options as `options`. `_bridge_module` is for tests.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise BackendError(f"plugin name must be lower-case letters, digits and '_' (e.g. 'ascend'), "
                           f"got {name!r}")
    if not isinstance(priority, int) or isinstance(priority, bool):
        raise BackendError(f"plugin {name!r}: priority must be an int, got {priority!r}")
    what = f"plugin {name!r}"
    check_plugin_library(library_path, what=what)
    bridge = _bridge() if _bridge_module is None else _bridge_module
    register = _register_api(bridge)
    if _backends_initialised(bridge):
        raise BackendError(f"{what}: JAX has already initialised its backends, so {str(library_path)!r} "
                           "can no longer be registered; register plugins before the first jax.devices(), "
                           f"jit or array (e.g. first thing in the script), or set {ENV_VAR}="
                           f"{name}{os.pathsep}{library_path} before starting Python")
    path = check_plugin_library(library_path, load=True, what=what)
    try:
        register(name, priority=priority, library_path=str(path), options=options)
    except Exception as e:  # JAX raises RuntimeError/ValueError/XlaRuntimeError depending on what failed
        raise BackendError(f"{what}: JAX refused to register {str(path)!r}: {type(e).__name__}: {e}") from e


def backends_initialised(_bridge_module: Any = None) -> bool:
    """Whether JAX has created its backends: from then on no plugin can be added to this process."""
    return _backends_initialised(_bridge() if _bridge_module is None else _bridge_module)


def registered_platforms(_bridge_module: Any = None) -> frozenset[str]:
    """Platform names with a backend factory registered so far (builtins, discovered and hxtrain's plugins)."""
    factories = getattr(_bridge() if _bridge_module is None else _bridge_module, "_backend_factories", None)
    if not isinstance(factories, dict):
        raise BackendError(_moved("cannot list JAX's registered backends (no _backend_factories)"))
    return frozenset(factories)


def clients() -> dict[str, Any]:
    """{platform name: PJRT client} of every backend JAX initialised (initialising them if it has not yet)."""
    backends = getattr(_bridge(), "backends", None)
    if not callable(backends):
        raise BackendError(_moved("jax._src.xla_bridge.backends() no longer exists"))
    return dict(backends())
