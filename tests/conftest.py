"""Test harness: 8 fake CPU devices, set before JAX initialises (2 sites x (data 2 x tensor 2)), and one JAX
compilation cache for the whole session.

Most of the suite's time is XLA compiling the same stage programs again: the pipeline matrix compiles the same
stages under many schedules, and every site process of every multi-process test compiles its programs afresh
(13 s for the tiny model's two sites here, 2 s from the cache). The cache is JAX's own persistent compilation
cache (keyed by the program, the compile options, the devices and the jax/XLA versions), in a folder made for this
session by the controller, shared through the environment with the xdist workers and every child process, and
deleted at the end. Nothing is cached between sessions.
"""

import os
import shutil
import tempfile

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
if _CACHE_ENV not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="hxtrain-test-jax-cache-")
    os.environ["HXTRAIN_TEST_OWNS_CACHE"] = os.environ[_CACHE_ENV]
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program, also the fast ones
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# XLA's CPU backend at optimisation level 0: the tests' models are tiny, so compiling is nearly all of their cost
# and running is not (a 4-stage tiny pipeline compiles in 9 s instead of 15 s here). Both sides of every comparison
# compile with the same flags; child processes inherit them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)

# This process on jaxlib's CPU only, unless the caller chose. Set in JAX's config rather than the environment, so
# that child processes (site processes, notebooks) are not kept from the plugins a topology names.
if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")

assert jax.device_count() >= 8, "tests/conftest.py must run before anything initialises JAX"


def pytest_unconfigure(config):
    owned = os.environ.get("HXTRAIN_TEST_OWNS_CACHE")
    if owned and "PYTEST_XDIST_WORKER" not in os.environ:
        shutil.rmtree(owned, ignore_errors=True)


