"""Test harness: 8 fake CPU devices, set before JAX initialises (2 sites x (data 2 x tensor 2))."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

assert jax.device_count() >= 8, "tests/conftest.py must run before anything initialises JAX"
