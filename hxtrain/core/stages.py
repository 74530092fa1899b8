"""Stages of a pipeline, the same for every way a step runs (in-process `Pipeline`, a site process, SPMD, profile):
which blocks each stage holds, how a batch splits into microbatches, the width of the activations between stages,
and a stage's state on its site.

Stage `i` runs on site `i % n_sites` (interleaved schedules give each site several stages).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from hxtrain.core import parts as _parts
from hxtrain.core import placement as _placement
from hxtrain.core import programs as _stage


@dataclasses.dataclass(frozen=True)
class StageState:
    """One stage on its site: its role (compiled program key), params, their shardings and the site's `data` size.

    Frozen: a step reads it and returns gradients (`executor.run_step`), the optimizer returns new params, and the
    owner of the stages (`Pipeline`, a site's `LocalSite`) swaps them in with `with_params`."""

    index: int
    site: int
    role: _stage.StageRole
    params: dict
    shardings: dict
    data: int

    def with_params(self, params: dict) -> "StageState":
        return dataclasses.replace(self, params=params)


def with_params(stages: list, params: list) -> list:
    """`stages` (`StageState`s, or the SPMD path's one stacked stage) with new params, one tree per stage."""
    if len(params) != len(stages):
        raise ValueError(f"params: expected one tree per stage ({len(stages)}), got {len(params)}")
    return [s.with_params(p) for s, p in zip(stages, params)]


def stage_ranges(topology, n_layers: int, n_stages: int, partition=None) -> tuple[tuple[int, int], ...]:
    """Contiguous block ranges ((lo, hi), ...) per stage: `partition` (blocks per stage) if given, else the
    topology's `layers` shares when every site gives one and there is one stage per site, else an even split."""
    if partition is None and n_stages == topology.n_sites and any(s.layers for s in topology.sites):
        partition = topology.layer_shares(n_layers)
    return _placement.partition(n_layers, n_stages, partition, source=f"{topology.source}: partition")


def check_batch(batch: int, microbatches: int, sites, field: str = "tokens") -> int:
    """The microbatch size of a global batch of `batch` sequences; ValueError naming `field` unless the batch
    splits into `microbatches` equal microbatches that every site's `data` axis divides."""
    M = microbatches
    if batch % M:
        raise ValueError(f"{field}: batch {batch} is not divisible by microbatches={M}; "
                         f"use a batch that is a multiple of {M}")
    mb = batch // M
    for site in sites:
        if mb % site.data:
            raise ValueError(f"{field}: microbatch size {mb} (batch {batch} / {M} microbatches) is not divisible by "
                             f"site {site.name!r} data={site.data}; use a batch that is a multiple of "
                             f"{M * site.data}")
    return mb


def split_batch(tokens, microbatches: int, sites) -> np.ndarray:
    """int32 [M, mb, T+1] from a batch of tokens [batch, T+1] (any integer dtype); ValueError naming `tokens`."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens: expected an integer array [batch, seq+1], got {tokens.dtype} {tokens.shape}")
    mb = check_batch(tokens.shape[0], microbatches, sites)
    return tokens.astype(np.int32).reshape(microbatches, mb, tokens.shape[1])


def embed_output(parts: _parts.ModelParts, seq: int) -> jax.ShapeDtypeStruct:
    """Shape and dtype of the embedding's output for one sequence of `seq` tokens: [1, seq, D]. D is the width of
    every activation and cotangent that crosses a stage boundary."""
    return jax.eval_shape(lambda e, t: _parts.apply_embed(parts.embed_def, e, t), parts.embed,
                          jax.ShapeDtypeStruct((1, seq), np.int32))


def stage_params(parts: _parts.ModelParts, block_range: tuple[int, int], first: bool, last: bool,
                 mesh) -> tuple[dict, dict]:
    """(params, shardings) of a stage holding blocks [lo, hi), plus the embedding if `first` and the head if
    `last`, laid out on `mesh` by the logical-axis rules. Params are the model's host arrays (not yet placed)."""
    lo, hi = block_range
    params: dict = {"blocks": _parts.stack(parts.blocks[lo:hi])}
    shard: dict = {"blocks": _placement.shardings(params["blocks"], parts.block_axes, mesh, stacked=True)}
    if first:
        params["embed"], shard["embed"] = parts.embed, _placement.shardings(parts.embed, parts.embed_axes, mesh)
    if last:
        params["head"], shard["head"] = parts.head, _placement.shardings(parts.head, parts.head_axes, mesh)
    return params, shard


def place_stage(parts: _parts.ModelParts, index: int, block_range: tuple[int, int], n_stages: int, topology,
                mesh, put_tree: Callable) -> StageState:
    """Stage `index` of `n_stages` (blocks `block_range`) on its site's `mesh`, its params placed with
    `put_tree(params, shardings)` and its programs computing in the site's dtype."""
    site_index = index % topology.n_sites
    site = topology.sites[site_index]
    first, last = index == 0, index == n_stages - 1
    params, shard = stage_params(parts, block_range, first, last, mesh)
    role = _stage.StageRole(parts.embed_def, parts.block_def, parts.head_def, first, last, mesh,
                            _placement.site_compute_dtype(site, mesh))
    return StageState(index, site_index, role, put_tree(params, shard), shard, site.data)
