"""Placement: one real `Mesh(('data', 'tensor'))` per site, logical-axis rules, and the stage partition.

The `site` axis of hxtrain's logical mesh is never a JAX mesh axis: a site is an island with its own devices of one
backend, and the only thing that knows about several sites is the executor. This module is the only place (with
`meshes/`) where mesh axis names appear.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain.config.topology import even_split

# The mesh axis names: this module owns them (everything else imports these). `site` is never an axis of a real
# per-site mesh, only of the SPMD fast path's global mesh (spmd.py), which stacks the site meshes along it.
DATA, TENSOR, SITE = "data", "tensor", "site"

# Logical axis -> site mesh axis. `batch` is data-parallel; the wide dimensions of the weights are tensor-parallel
# (column-parallel in, row-parallel out; XLA inserts the all-reduce after row-parallel matmuls).
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", DATA),
    ("vocab", TENSOR),
    ("heads", TENSOR),
    ("kv_heads", TENSOR),  # grouped-query attention: each kv head is split with its (contiguous) query group
    ("mlp", TENSOR),
    ("embed", None),
    ("head_dim", None),
    ("layers", None),
    ("seq", None),
)


class PlacementError(ValueError):
    """A model, partition or topology that cannot be placed, with what was expected and what arrived."""


def site_meshes(topology) -> list[Mesh]:
    """Each site's `Mesh(('data', 'tensor'))` over its own devices, on its own PJRT client (`backends.place_sites`:
    plugins registered first, device ranges that never overlap by accident)."""
    from hxtrain.backends import place_sites

    return [site_mesh(site, devs) for site, devs in zip(topology.sites, place_sites(topology.sites))]


def sub_topology(topology, names, what: str = "replica", *, own_devices: bool = False):
    """The sites `names` of `topology` (in that order) as a topology of their own, with the links among them and
    each site's `layers` share: a replica of `--strategy diloco`. In one process each site keeps the devices it has
    in the whole topology (its `first_device` set); `own_devices` (a site process, which sees only its own
    devices) leaves that unset."""
    import dataclasses

    from hxtrain.backends import site_offsets

    offsets = dict(zip((s.name for s in topology.sites), site_offsets(topology.sites)))
    part = topology.only(names, what)
    first = lambda s: s.first_device if own_devices else offsets[s.name]  # noqa: E731
    return dataclasses.replace(part, sites=tuple(dataclasses.replace(s, first_device=first(s),
                                                                     layers=topology.site(s.name).layers)
                                                 for s in part.sites))


def site_mesh(site, devices: Sequence[jax.Device]) -> Mesh:
    """`devices` (`site.devices` of them, in order) as the site's Mesh(('data', 'tensor'))."""
    return Mesh(np.array(devices).reshape(site.data, site.tensor), (DATA, TENSOR))


def site_compute_dtype(site, mesh: Mesh | None = None) -> str:
    """The dtype `site`'s stage programs compute in ("float32", "bfloat16", "float16"): its `compute_dtype` if the
    topology sets one (checked against the device), else the default of its devices (`backends.dtype_policy`:
    float32 on CPU, the fastest 16-bit float elsewhere). The device kind is read from `mesh`, the devices that
    actually run the site; without one (a site of another process), from the topology: `device_kind`, else the
    backend, as the cost model does (an unknown kind gets the conservative float32)."""
    from hxtrain.backends import capability_for, dtype_policy

    kind = mesh.devices.flat[0].device_kind if mesh is not None else (site.device_kind or site.backend)
    return dtype_policy(capability_for(kind), site.compute_dtype).compute_dtype


def mesh_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
              rules=DEFAULT_RULES) -> P:
    """Logical axis names of one array -> a PartitionSpec on `mesh`.

    A dimension that the mesh axis does not divide stays replicated (correct, only less sharded), and a mesh axis
    is used at most once per array.
    """
    table = dict(rules)
    out, taken = [], set()
    for name, size in zip(tuple(axes) + (None,) * (len(shape) - len(axes)), shape):
        axis = table.get(name) if name is not None else None
        if axis is None or axis in taken or axis not in mesh.shape or size % mesh.shape[axis]:
            out.append(None)
        else:
            out.append(axis)
            taken.add(axis)
    return P(*out)


def shardings(params: dict, axes: dict, mesh: Mesh, *, stacked: bool = False) -> dict:
    """NamedShardings for a pure param tree from its logical axes; `stacked` prepends the `layers` axis."""

    def one(p, ax):
        ax = (("layers",) + tuple(ax)) if stacked else tuple(ax)
        return NamedSharding(mesh, mesh_spec(ax, p.shape, mesh))

    return jax.tree.map(one, params, axes, is_leaf=lambda x: isinstance(x, tuple) and all(
        isinstance(a, (str, type(None))) for a in x))


def partition(n_layers: int, n_stages: int, blocks: Sequence[int] | None = None,
              source: str = "partition") -> tuple[tuple[int, int], ...]:
    """Contiguous block ranges [(lo, hi), ...] per stage. `blocks` = blocks per stage (uneven allowed), or None
    for an even split with the remainder on the first stages ([3, 3, 2] for 8 on 3)."""
    if n_stages > n_layers:
        raise PlacementError(
            f"{source}: {n_stages} pipeline stages but the model has {n_layers} blocks; "
            "each stage needs at least one block (use fewer sites or a deeper model)")
    if blocks is None:
        blocks = even_split(n_layers, n_stages)
    blocks = list(blocks)
    if len(blocks) != n_stages:
        raise PlacementError(f"{source}: expected {n_stages} entries (one per stage), got {len(blocks)}: {blocks}")
    if any((not isinstance(b, (int, np.integer))) or isinstance(b, bool) or b < 1 for b in blocks):
        raise PlacementError(f"{source}: every stage needs a whole number >= 1 of blocks, got {blocks}")
    if sum(blocks) != n_layers:
        raise PlacementError(
            f"{source}: {blocks} adds up to {sum(blocks)} blocks but the model has {n_layers}")
    bounds = np.cumsum([0] + blocks)
    return tuple((int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]))
