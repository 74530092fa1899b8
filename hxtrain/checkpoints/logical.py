"""The logical layout of a checkpoint: per-stage trees <-> one tree keyed by the model's own parameter paths.

A pipeline keeps each stage's parameters (and optimizer state) on the stage's site, with the stage's blocks
stacked on a leading `layers` axis. A checkpoint must not depend on that split, so it is written in the model's own
terms, the same keys as `nnx.to_pure_dict(nnx.state(model, nnx.Param))` (block indices as strings):

    params/embed/wte              [V, D]
    params/blocks/3/w1            [D, F]        one leaf per block: slice i of its stage's [L, D, F] stack
    params/head/w_out             [D, V]
    opt/0/mu/blocks/3/w1          [D, F]        optax state: each parameter-shaped subtree keyed by param path
    opt/0/count                   []            state that is not per parameter (step counters): one copy

Every leaf stays on the site that holds it (slicing a stage stack is a device op on that site's mesh), so saving
never gathers the model on one host. Restoring goes the other way for *any* placement: targets are built from the
new pipeline's meshes and shardings (`targets`), the restored leaves are stacked per new stage (`to_stages`).
"""

from __future__ import annotations

import functools
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

PARTS = ("embed", "blocks", "head")


def supported(pipeline) -> str | None:
    """None if this layout can map the pipeline's stages, else why not."""
    if all(hasattr(s, "role") and hasattr(s, "shardings") for s in pipeline.stages):
        return None
    return (f"{type(pipeline).__name__} keeps its stages as one padded program (the spmd executor); checkpoints "
            f"support the per-site (mpmd) executor only")


def _name(k) -> str:
    # One path entry -> a key string: dict keys, sequence indices (optax chains) and attributes (NamedTuples).
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _entries(stage, lo: int, hi: int, tree) -> Iterator[tuple[int, list[str], Any, list[str] | None, int | None]]:
    """For each leaf of a stage tree (params or optax state): (flat leaf index, logical keys, leaf, param path
    within the stage tree or None, block slot in the stage stack or None). A stacked block leaf yields one entry
    per block."""
    for n, (path, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree)[0]):
        keys = [_name(k) for k in path]
        at = next((j for j, k in enumerate(path) if isinstance(k, jax.tree_util.DictKey) and k.key in PARTS), None)
        if at is None:  # not per parameter (e.g. adam's count): identical on every stage
            yield n, keys, leaf, None, None
            continue
        prefix, part, rest = keys[:at], keys[at], keys[at + 1:]
        if part == "blocks":
            for i in range(hi - lo):
                yield n, prefix + ["blocks", str(lo + i)] + rest, leaf, [part] + rest, i
        else:
            yield n, prefix + [part] + rest, leaf, [part] + rest, None


def _set(tree: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def flat(tree: dict, prefix: str = ""):
    """('embed/wte', leaf), ... of a nested dict (a logical tree), depth first."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _get(tree: dict, keys: list[str]):
    for k in keys:
        tree = tree[k]
    return tree


@functools.partial(jax.jit, static_argnums=0)
def _slices(plan: tuple, leaves: list) -> list:
    # One program per stage: block i of every stacked leaf, and a fresh copy of every other leaf (fresh buffers:
    # the trainer donates params and optimizer state to the next update while an async save may still read them).
    return [leaves[n][i] if i is not None else jnp.copy(leaves[n]) for n, i in plan]


def _split(stage, lo: int, hi: int, tree, out: dict, skip_counters: bool) -> None:
    leaves = jax.tree_util.tree_leaves(tree)
    todo = [(n, keys, i) for n, keys, _, param, i in _entries(stage, lo, hi, tree)
            if not (skip_counters and param is None)]
    for (_, keys, _), x in zip(todo, _slices(tuple((n, i) for n, _, i in todo), leaves)):
        _set(out, keys, x)


def to_logical(pipeline, states=None) -> dict:
    """{"params": ..., "opt": ...} keyed by model paths (see module doc); leaves are fresh device arrays on the
    site that holds them. `states`: per-stage optax states (omit for params only)."""
    out: dict = {"params": {}}
    for s, (lo, hi) in zip(pipeline.stages, pipeline.ranges):
        _split(s, lo, hi, s.params, out["params"], False)
    if states is not None:
        out["opt"] = {}
        for s, (lo, hi), state in zip(pipeline.stages, pipeline.ranges, states):
            _split(s, lo, hi, state, out["opt"], s.index > 0)  # counters: one copy is enough
    return out


def _sharding(stage, param: list[str] | None, block: bool):
    if param is None:
        return NamedSharding(stage.role.mesh, P())
    full = _get(stage.shardings, param)
    return NamedSharding(full.mesh, P(*full.spec[1:])) if block else full


def targets(pipeline, states=None, *, dtype=None) -> dict:
    """Restore targets for the *new* placement: `jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
    new stage mesh, spec))` per logical leaf. `dtype` casts the floating-point parameters (optimizer state keeps
    its saved dtype)."""
    def sds(s, leaf, param, i, cast):
        shape = leaf.shape[1:] if i is not None else leaf.shape
        dt = dtype if (cast and dtype is not None and jnp.issubdtype(leaf.dtype, jnp.floating)) else leaf.dtype
        return jax.ShapeDtypeStruct(shape, dt, sharding=_sharding(s, param, i is not None))

    out: dict = {"params": {}}
    for s, (lo, hi) in zip(pipeline.stages, pipeline.ranges):
        for _, keys, leaf, param, i in _entries(s, lo, hi, s.params):
            _set(out["params"], keys, sds(s, leaf, param, i, True))
    if states is not None:
        out["opt"] = {}
        for s, (lo, hi), state in zip(pipeline.stages, pipeline.ranges, states):
            for _, keys, leaf, param, i in _entries(s, lo, hi, state):
                if param is not None or s.index == 0:
                    _set(out["opt"], keys, sds(s, leaf, param, i, False))
    return out


@functools.partial(jax.jit, static_argnums=0)
def _stacks(plan: tuple, parts: list) -> list:
    # One program per stage: plan[k] = how many consecutive parts leaf k takes (None: one part, not stacked).
    out, at = [], 0
    for count in plan:
        out.append(parts[at] if count is None else jnp.stack(parts[at:at + count]))
        at += 1 if count is None else count
    return out


def to_stages(pipeline, logical: dict, like: list) -> list:
    """Logical tree -> per-stage trees shaped like `like` (the pipeline's stage params, or fresh optax states),
    each leaf placed with its stage sharding; a stage's blocks are stacked back on the leading axis."""
    out = []
    for s, (lo, hi), tree in zip(pipeline.stages, pipeline.ranges, like):
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        slots: dict[int, list] = {}
        for n, keys, _, param, i in _entries(s, lo, hi, tree):
            slots.setdefault(n, []).append((keys, param, i))
        plan, parts, shard = [], [], []
        for n in range(len(leaves)):
            (keys, param, i), *_ = slots[n]
            plan.append(None if i is None else len(slots[n]))
            # Counters come from another site's mesh in the checkpoint tree: place them here first.
            parts += [jax.device_put(_get(logical, k), _sharding(s, param, i is not None)) for k, _, _ in slots[n]]
            shard.append(_get(s.shardings, param) if param is not None else NamedSharding(s.role.mesh, P()))
        built = jax.device_put(_stacks(tuple(plan), parts), shard)
        out.append(jax.tree_util.tree_unflatten(treedef, built))
    return out


def shapes(pipeline) -> dict[str, tuple[tuple[int, ...], str]]:
    """'embed/wte' -> (shape, dtype name) for every logical parameter, in model order (embed, blocks, head)."""
    flat = {}
    for s, (lo, hi) in zip(pipeline.stages, pipeline.ranges):
        for _, keys, leaf, _, i in _entries(s, lo, hi, s.params):
            flat["/".join(keys)] = (tuple(leaf.shape[1:] if i is not None else leaf.shape), str(leaf.dtype))

    def order(k):
        part, *rest = k.split("/")
        return (PARTS.index(part), int(rest[0]) if part == "blocks" else 0, k)

    return {k: flat[k] for k in sorted(flat, key=order)}


def key_shapes(pipeline) -> dict[str, tuple[tuple[int, ...], str]]:
    """'blocks/0/w' -> (shape, dtype name) for every logical parameter, in the order `to_logical` gives them
    (`flat(to_logical(pipeline)["params"])`), with no device work: the stages' params may be abstract
    (`jax.ShapeDtypeStruct` leaves). A DiLoCo site that holds some stages orders the whole model's keys by it."""
    out: dict = {}
    for s, (lo, hi) in zip(pipeline.stages, pipeline.ranges):
        for _, keys, leaf, _, i in _entries(s, lo, hi, s.params):
            _set(out, keys, (tuple(leaf.shape[1:] if i is not None else leaf.shape), str(leaf.dtype)))
    return dict(flat(out))
