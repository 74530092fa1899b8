"""Shared test helpers: leaf-by-leaf comparison that names the pytree path of the first leaf that differs, and the
cached TINY model, batches and single-device reference that the pipeline tests compare against."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import gpt


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def assert_trees_close(actual, expected, rtol=1e-5, what="grads"):
    """Every leaf's relative error (max |a-b| / max |b|) <= rtol; the failure names the leaf's path."""
    if isinstance(actual, nnx.State):
        actual = nnx.to_pure_dict(actual)
    if isinstance(expected, nnx.State):
        expected = nnx.to_pure_dict(expected)
    flat_a = dict(jax.tree_util.tree_leaves_with_path(actual))
    flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
    assert flat_a.keys() == flat_e.keys(), f"{what}: different leaves: {set(flat_a) ^ set(flat_e)}"
    for path, e in flat_e.items():
        a = flat_a[path]
        assert np.shape(a) == np.shape(e), f"{what}{jax.tree_util.keystr(path)}: shape {np.shape(a)} != {np.shape(e)}"
        err = rel_err(a, e)
        assert err <= rtol, f"{what}{jax.tree_util.keystr(path)}: relative error {err:.3g} > {rtol}"


# Cached, and shared by every test file that imports them, so that a session builds one model and one reference per
# batch size (each costs seconds on 2 cores). A test must not donate or mutate them: one that trains (donating the
# stage buffers) builds its own model, as test_spmd's optimizer test does.


@functools.cache
def model():
    """gpt.TINY built with seed 0."""
    return gpt.build(gpt.TINY, seed=0)


@functools.cache
def batch(n: int, seed: int = 0) -> np.ndarray:
    """[n, seq_len + 1] int32 tokens in [0, 256)."""
    return np.random.default_rng(seed).integers(0, 256, (n, gpt.TINY.seq_len + 1)).astype(np.int32)


CHUNK = 4  # sequences per reference program: the tests' microbatch size


@functools.cache
def _value_and_grad(loss):
    return nnx.jit(nnx.value_and_grad(loss))


def chunked_reference(loss, model, tokens: np.ndarray, chunk: int = CHUNK):
    """(loss, grads as a pure dict of float64 arrays): `nnx.value_and_grad(loss)` of `model` on `tokens`, on one
    device. A batch's mean loss is the mean of its equal chunks' mean losses, so one compiled program (per model
    and chunk) serves every batch size: each new size would otherwise compile the model again (seconds here).
    Chunk results are summed in float64; a batch that `chunk` does not divide is one chunk."""
    step, n = _value_and_grad(loss), tokens.shape[0]
    chunk = chunk if n % chunk == 0 else n
    total, grads = 0.0, None
    with jax.default_device(jax.devices()[0]):
        for i in range(0, n, chunk):
            lo, g = step(model, jnp.asarray(tokens[i:i + chunk]))
            g = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(g))
            total, grads = total + float(lo), g if grads is None else jax.tree.map(np.add, grads, g)
    k = n // chunk
    return total / k, jax.tree.map(lambda a: a / k, grads)


@functools.cache
def reference(n: int):
    """(loss, grads) of the plain model loss on batch(n), on one device (`chunked_reference`)."""
    return chunked_reference(gpt.loss, model(), batch(n))


def endpoint_pair(timeout: float = 5.0, max_bytes: int = 1 << 20, secret: bytes = b"test-secret-0123456789abcdef-0123"):
    """(endpoint of site a to b, endpoint of site b to a) over plain loopback TCP (the opt-out; TLS links are
    tests/test_tls.py's): the one place the transport tests build a linked pair."""
    import threading

    from hxtrain.network.listener import Listener
    from hxtrain.network.tcp import Endpoint

    with Listener() as lst:
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("b", lst.accept(
            "b", "a", secret=secret, tls=None, timeout=timeout, max_bytes=max_bytes)))
        th.start()
        a = Endpoint.connect("a", "b", "127.0.0.1", lst.port, secret=secret, tls=None, timeout=timeout,
                             max_bytes=max_bytes)
        th.join()
    return a, box["b"]


def computed_once(tmp_path_factory, name: str, compute):
    """`compute(folder)` (a JSON-able result) run once per test session, also when xdist spreads the tests that
    need it over several workers: the first worker computes it under a file lock, the others read its JSON."""
    import fcntl
    import json
    import os

    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # shared by this session's workers
    path, lock = root / f"{name}.json", root / f"{name}.lock"
    with open(lock, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        if not path.exists():
            folder = root / name
            folder.mkdir(exist_ok=True)
            path.write_text(json.dumps(compute(folder)))
        return json.loads(path.read_text())



def cpu_topology_toml(name: str, sites: str, links, run: dict, diloco: dict) -> str:
    """The text of a topology (`plan_file.topology_toml`): one single-device CPU site per letter of `sites`, a
    10 Gbit/s 1 ms link per pair in `links` (pairs of site names), and its [run] and [diloco] tables."""
    from hxtrain.config.topology import Diloco, Link, RunDefaults, Site, Topology
    from hxtrain.planning.plan_file import topology_toml

    topo = Topology(name, [Site(s, "cpu", devices=1, data=1, tensor=1) for s in sites],
                    [Link((x, y), bandwidth_gbps=10, latency_ms=1) for x, y in links], RunDefaults(**run), "<test>",
                    diloco=Diloco(**diloco))
    return topology_toml(topo, f"test topology {name}")
