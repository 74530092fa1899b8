"""Test harness: 8 fake CPU devices, set before JAX initialises (2 sites x (data 2 x tensor 2))."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)

# This process on jaxlib's CPU only, unless the caller chose. Set in JAX's config rather than the environment, so
# that child processes (site processes, notebooks) are not kept from the plugins a topology names.
if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")

assert jax.device_count() >= 8, "tests/conftest.py must run before anything initialises JAX"
