"""Backend registry: which PJRT plugin serves a backend, how it is found, what its devices can do.

Backends: `cpu`, `cuda` (`gpu`, `nvidia`), `rocm` (`amd`), `tpu`, `ascend` (`npu`), and any PJRT plugin
by library path or installed package (`plugin:/path/libpjrt_x.so`, `plugin:package:NAME`, or a site's
`plugin = "/path/x.so"` / `plugin = "package:NAME"`). Each site runs on its own PJRT client (`_clients`). Every failure is a
`BackendError` that says what was expected, what was found and how to fix it.
"""

from hxtrain.backends._clients import (SiteClient, client_rows, client_summary, format_clients, place_sites,
                                       register_plugins, site_client, site_offsets)
from hxtrain.backends._capabilities import CAPABILITIES, Capability, capability_for
from hxtrain.backends._devices import describe, devices_for, format_table
from hxtrain.backends._dtypes import COMPUTE_DTYPES, DtypePolicy, dtype_policy, link_wire_dtype
from hxtrain.backends._jax_bridge import register_plugin_library
from hxtrain.backends._plugins import (ENV_VAR, PluginSource, check_plugin_library, find_plugin,
                                       installed_providers, locate_plugin_library, parse_pjrt_env)
from hxtrain.backends._registry import (BACKENDS, BackendError, BackendInfo, PluginNotInstalledError,
                                        canonical_backend, known_backend_names, plugin_client_name,
                                        plugin_platform_name)
from hxtrain.links.codecs import CODEC_NAMES as CODECS  # re-exported; the one list of codec names lives in codecs

__all__ = [
    "BACKENDS", "CAPABILITIES", "CODECS", "COMPUTE_DTYPES", "ENV_VAR",
    "BackendError", "BackendInfo", "Capability", "DtypePolicy", "PluginNotInstalledError", "PluginSource",
    "SiteClient", "canonical_backend", "capability_for", "check_plugin_library", "client_rows", "client_summary", "describe",
    "devices_for", "dtype_policy", "find_plugin", "format_clients", "format_table", "installed_providers",
    "known_backend_names", "link_wire_dtype", "locate_plugin_library", "parse_pjrt_env", "place_sites", "site_offsets",
    "plugin_client_name", "plugin_platform_name", "register_plugin_library", "register_plugins", "site_client",
]
