"""The test harness itself (tests/conftest.py): a process past half the kernel's limit on memory maps frees the
programs JAX compiled, so a long-lived worker does not reach the limit, where XLA:CPU segfaults."""

import jax
import jax.numpy as jnp

import conftest


def test_a_process_past_half_the_map_limit_frees_its_compiled_programs(monkeypatch):
    assert conftest._MAP_LIMIT, "Linux gives /proc/sys/vm/max_map_count: the guard must be on in CI"
    x = jnp.ones(8)
    # Kept alive, as module-level programs (static arguments) and cached pipelines keep theirs; ~3 maps each (code,
    # constants, data). A jitted function that dies frees its programs by itself.
    programs = [jax.jit(lambda a, i=i: a * i + 1) for i in range(100)]
    for f in programs:
        f(x).block_until_ready()
    before = conftest.maps_in_use()
    monkeypatch.setattr(conftest, "_MAP_LIMIT", 2 * before + 100)  # under half: kept
    conftest.pytest_runtest_teardown(None, None)
    kept = conftest.maps_in_use()
    assert kept > before - 100
    monkeypatch.setattr(conftest, "_MAP_LIMIT", before)  # past half: cleared
    conftest.pytest_runtest_teardown(None, None)
    assert conftest.maps_in_use() < kept - 200  # the 100 programs' maps are gone
    assert float(programs[7](x)[0]) == 8.0  # and a cleared program compiles again when called
