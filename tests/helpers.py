"""Shared test helpers: leaf-by-leaf comparison that names the pytree path of the first leaf that differs."""

import jax
import numpy as np
from flax import nnx


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
