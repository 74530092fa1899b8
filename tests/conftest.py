"""Test harness: 8 fake CPU devices, set before JAX initialises (2 sites x (data 2 x tensor 2)), and one JAX
compilation cache for the whole session.

Most of the suite's time is XLA compiling the same stage programs again: the pipeline matrix compiles the same
stages under many schedules, and every site process of every multi-process test compiles its programs afresh
(13 s for the tiny model's two sites here, 2 s from the cache). The cache is JAX's own persistent compilation
cache (keyed by the program, the compile options, the devices and the jax/XLA versions), in a folder made for this
session by the controller, shared through the environment with the xdist workers and every child process, and
deleted at the end. Nothing is cached between sessions.

Every compiled XLA:CPU kernel holds about three memory maps (code, constants, data), and JAX keeps the executables of
every live jitted function (module-level programs with static arguments live all session: each new stage shape
adds to them), so a worker that runs for 20 minutes approaches the kernel's limit on maps per process
(vm.max_map_count, 65,530 here), where mmap fails and XLA segfaults (reproduced here with the limit lowered to
24,000: tests/test_pipeline.py then crashed compiling a backward program). After any test that leaves the process
past half the limit, the worker clears JAX's caches; programs compiled again come from the persistent cache.

A worker that crashes (a segfault in native code) writes its faulthandler report to a file of this session, and
the controller prints it, with the tests that worker ran last, at the end of the run: xdist alone shows only the
end of a crashed worker's output, where the crashing thread's Python stack is not.
"""

import collections
import faulthandler
import gc
import os
import shutil
import tempfile
from pathlib import Path

_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # None in the controller (or a run without xdist)
_OWNED = "HXTRAIN_TEST_OWNS"  # the folders the controller made for this session, deleted at its end


def _session_folder(env: str, prefix: str) -> None:
    """$env names a folder of this session, shared with the workers and child processes through the environment:
    one the controller makes (and deletes at the end) unless the caller set it."""
    if env not in os.environ and _WORKER is None:
        os.environ[env] = tempfile.mkdtemp(prefix=prefix)
        os.environ[_OWNED] = os.pathsep.join(filter(None, [os.environ.get(_OWNED), os.environ[env]]))


_session_folder("JAX_COMPILATION_CACHE_DIR", "hxtrain-test-jax-cache-")
_FAULTS_ENV = "HXTRAIN_TEST_FAULTS"  # one faulthandler report per worker
_session_folder(_FAULTS_ENV, "hxtrain-test-faults-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # every program, also the fast ones
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# XLA's CPU backend at optimisation level 0: the tests' models are tiny, so compiling is nearly all of their cost
# and running is not (a 4-stage tiny pipeline compiles in 9 s instead of 15 s here). Both sides of every comparison
# compile with the same flags; child processes inherit them.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()

import jax  # noqa: E402  (must come after XLA_FLAGS)
import pytest  # noqa: E402

# This process on jaxlib's CPU only, unless the caller chose. Set in JAX's config rather than the environment, so
# that child processes (site processes, notebooks) are not kept from the plugins a topology names.
if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")

assert jax.device_count() >= 8, "tests/conftest.py must run before anything initialises JAX"


def _map_limit() -> int | None:
    try:
        return int(Path("/proc/sys/vm/max_map_count").read_text())
    except (OSError, ValueError):  # not Linux: no such limit to keep under
        return None


_MAP_LIMIT = _map_limit()


def maps_in_use() -> int:
    with open("/proc/self/maps", "rb") as f:
        return sum(1 for _ in f)


@pytest.hookimpl(trylast=True)  # after the test's fixtures are torn down
def pytest_runtest_teardown(item, nextitem):
    if _MAP_LIMIT and maps_in_use() > _MAP_LIMIT // 2:
        jax.clear_caches()
        gc.collect()


_ran = collections.defaultdict(lambda: collections.deque(maxlen=4))  # controller: worker -> its last tests


def pytest_sessionstart(session):
    if _WORKER and os.environ.get(_FAULTS_ENV):  # after pytest's own faulthandler set-up, which this replaces
        session.config._hxtrain_faults = open(Path(os.environ[_FAULTS_ENV]) / f"{_WORKER}.txt", "w")
        faulthandler.enable(session.config._hxtrain_faults, all_threads=True)


def pytest_runtest_logreport(report):
    worker = getattr(getattr(report, "node", None), "gateway", None)
    if worker is not None and report.when == "setup":
        _ran[worker.id].append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    # Short, and last before pytest's own summary: what is kept of a CI log is its end.
    folder = os.environ.get(_FAULTS_ENV) if _WORKER is None else None
    for path in sorted(Path(folder).glob("*.txt")) if folder else ():
        text = path.read_text()
        if not text.strip():
            continue
        terminalreporter.section(f"worker {path.stem} crashed")
        terminalreporter.write_line("its last tests: " + ", ".join(_ran.get(path.stem, ())))
        current = [b for b in text.split("\n\n") if "Current thread" in b]  # one block per thread
        if not current:  # the crash was in a thread without Python frames (one the runtime started)
            terminalreporter.write_line(text.strip().splitlines()[0] + " (no Python thread is marked current)")
            continue
        frames = [line.replace(str(Path(shutil.__file__).parent), "").strip() for line in current[0].splitlines()]
        frames = [f[f.find("site-packages/") + 14:] if "site-packages/" in f else f for f in frames]
        terminalreporter.write_line("\n".join(frames[:14]))


def pytest_unconfigure(config):
    if _WORKER is None:
        for folder in filter(None, os.environ.get(_OWNED, "").split(os.pathsep)):
            shutil.rmtree(folder, ignore_errors=True)
