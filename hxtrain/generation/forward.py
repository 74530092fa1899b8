"""The forward pass of generation: a model as a chain of stage programs, on one device or across a topology's sites.

    fwd = Stages.local(model)                        # one stage: embed + every block + head, on one device
    fwd = Stages.pipelined(model, topology, [5, 3])  # stage s on site s's mesh: its blocks and their caches
    fwd = Stages.local(model, compute_dtype="bfloat16")  # compute (and cache) in bf16; params stay fp32
    caches = fwd.init_caches(batch, length)          # per stage: {"k", "v"} stacked [L_s, B, length, H, K]
    logits, caches = fwd.step(tokens, start, caches) # tokens [B, t] at positions start.. -> logits [B, V] of the last
    logits = fwd.full(tokens, at)                    # no cache: the whole [B, T] sequence, logits [B, V] at `at`

The sampling loop (`sampling.generate`) calls only these, whichever kind it holds. Stage s keeps its parameters on
site s's mesh (sharded by the logical axes `core.parts.split_model` reads, through `core.placement.shardings`), the
embedding on the first stage and the head on the last. Between stages only the activation h [B, t, D] moves, with
`jax.device_put` onto the next site's mesh: sites may be different PJRT clients, so no program spans two. Each
stage's program is one `jax.jit` of a module-level function whose static arguments are the graph definitions and
the mesh, so it compiles once per shape (prefill, one-token decode) and is reused by every later `Stages` of the
same model shape. The caches are donated to each step.

Dtypes, as training's stage programs (`core.programs`): params stay as they are (float32) and each stage program
casts its floating params and input to the stage's compute dtype with the same `core.programs.to_compute`, so
float32 adds no op. `pipelined` takes each site's compute dtype as training resolves it
(`core.placement.site_compute_dtype`), `local` an explicit one (default float32). A stage's KV cache is held in its
compute dtype, the activation leaves it in that dtype (the next stage casts it to its own), and the last stage's
logits are cast to float32, so sampling (`sampling._pick`) is float32 whatever the stages compute in.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from hxtrain.core import parts as _parts
from hxtrain.core import placement as _placement
from hxtrain.core.programs import to_compute
from hxtrain.core.stages import stage_ranges

# Logical axes of what a stage takes and gives: tokens [B, t], activations [B, t, D], a stacked cache leaf
# [L, B, S, H, K]. Any other rank is replicated.
_TOKENS, _ACTS = ("batch", "seq"), ("batch", "seq", "embed")
_CACHE = ("layers", "batch", "seq", "heads", "head_dim")


def _sharding(mesh: Mesh, axes: tuple, shape) -> NamedSharding:
    return NamedSharding(mesh, _placement.mesh_spec(axes[:len(shape)], shape, mesh))


def _cache_shardings(mesh: Mesh, caches):
    return jax.tree.map(lambda c: _sharding(mesh, _CACHE if c.ndim == len(_CACHE) else (), c.shape), caches)


@dataclasses.dataclass(frozen=True)
class _Defs:
    """A stage's static side: graph definitions (None: the stage has no embedding / head), its mesh and the name
    of its compute dtype."""

    embed: object
    block: object
    head: object
    mesh: Mesh
    dtype: str


def _decode_blocks(block_def, stacked: dict, h, caches, start):
    """h [B, t, D] through a stage's blocks (params stacked [L, ...]) with their caches -> (h, caches)."""
    def body(h, block):
        params, cache = block
        return nnx.merge(block_def, params).decode(h, cache, start)

    # Rolled, unlike the training stack (`core.parts.apply_blocks`): a decode step is compiled for every new
    # prompt shape, and unrolling 8 blocks tripled its compile time (1.7 s -> 5-7 s on TINY, 2-core CPU) for
    # ~0.7 ms less per token.
    return jax.lax.scan(body, h, (stacked, caches))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
def _step(defs: _Defs, params: tuple, x, start, caches):
    """One stage of a cached forward: x (tokens [B, t] on the first stage, else h [B, t, D]) at positions
    start.. -> (h [B, t, D] in the stage's dtype, or the last position's logits [B, V] fp32 on the last stage;
    the caches, in the stage's dtype)."""
    (embed, blocks, head), x = to_compute(defs.dtype, params), to_compute(defs.dtype, x)
    h = nnx.merge(defs.embed, embed)(x, start) if defs.embed is not None else x
    h, caches = _decode_blocks(defs.block, blocks, h, caches, start)
    h = to_compute(defs.dtype, h)  # a block may widen internally; what leaves the stage is in its dtype
    caches = jax.lax.with_sharding_constraint(caches, _cache_shardings(defs.mesh, caches))
    if defs.head is None:
        return h, caches
    return _parts.head_logits(nnx.merge(defs.head, head), h[:, -1:])[:, 0].astype(jnp.float32), caches


@functools.partial(jax.jit, static_argnums=0)
def _full(defs: _Defs, params: tuple, x, at):
    """One stage of an uncached forward over the whole sequence (the training forward, `core.parts`): x [B, T]
    or [B, T, D] -> h [B, T, D] in the stage's dtype, or on the last stage the logits [B, V] fp32 at `at`."""
    (embed, blocks, head), x = to_compute(defs.dtype, params), to_compute(defs.dtype, x)
    h = _parts.apply_embed(defs.embed, embed, x) if defs.embed is not None else x
    h = to_compute(defs.dtype, _parts.apply_blocks(defs.block, blocks, h))
    if defs.head is None:
        return h
    h = jax.lax.dynamic_slice_in_dim(h, at, 1, axis=1)  # [B, 1, D]
    return _parts.head_logits(nnx.merge(defs.head, head), h)[:, 0].astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _zeros(block_def, dtype, batch: int, length: int, blocks: dict):
    """Stacked zero caches for a stage's blocks (params stacked [L, ...]): leaves [L, B, length, ...]."""
    return jax.vmap(lambda p: nnx.merge(block_def, p).init_cache(batch, length, dtype))(blocks)


class Stages:
    """A generation-protocol model as a chain of stages, one per mesh (see the module doc). Build with `local`
    or `pipelined`; the constructor takes the meshes, the block ranges [(lo, hi), ...] and the compute dtypes
    ("float32", "bfloat16", "float16"; None: float32 everywhere) per stage."""

    def __init__(self, model, meshes: list[Mesh], ranges, *, cache: bool = True, compute_dtypes=None):
        _parts.has_generation(model, cache=cache)
        compute_dtypes = ["float32"] * len(meshes) if compute_dtypes is None else list(compute_dtypes)
        if not len(meshes) == len(ranges) == len(compute_dtypes):
            raise _placement.PlacementError(f"Stages: {len(meshes)} meshes, {len(ranges)} block ranges and "
                                            f"{len(compute_dtypes)} compute dtypes; expected one of each per stage")
        parts = _parts.split_model(model)
        self.context, self.vocab_size = int(model.cfg.seq_len), int(model.cfg.vocab_size)
        self.meshes, self.ranges = list(meshes), tuple(ranges)
        self.compute_dtypes = tuple(jnp.dtype(d).name for d in compute_dtypes)
        self._block_def = parts.block_def
        self._defs, self._params = [], []
        last = len(meshes) - 1
        for s, (mesh, (lo, hi)) in enumerate(zip(meshes, ranges)):
            blocks = _parts.stack(parts.blocks[lo:hi])
            tree = (parts.embed if s == 0 else None, blocks, parts.head if s == last else None)
            axes = (parts.embed_axes if s == 0 else None, parts.block_axes, parts.head_axes if s == last else None)
            where = tuple(None if t is None else _placement.shardings(t, a, mesh, stacked=k == 1)
                          for k, (t, a) in enumerate(zip(tree, axes)))
            self._params.append(jax.device_put(tree, where))
            self._defs.append(_Defs(parts.embed_def if s == 0 else None, parts.block_def,
                                    parts.head_def if s == last else None, mesh, self.compute_dtypes[s]))

    @classmethod
    def local(cls, model, device: jax.Device | None = None, *, cache: bool = True,
              compute_dtype: str = "float32") -> "Stages":
        """The whole model as one stage on `device` (default: JAX's first device), computing in `compute_dtype`
        (checked against the device as a topology site's is, `backends.dtype_policy`). `cache=False`: for
        sampling without a KV cache, which asks less of the model (`core.parts.has_generation`)."""
        from hxtrain.backends import capability_for, dtype_policy

        device = device if device is not None else jax.devices()[0]
        mesh = Mesh(np.array([device]).reshape(1, 1), (_placement.DATA, _placement.TENSOR))
        dtype = dtype_policy(capability_for(device.device_kind), compute_dtype).compute_dtype
        return cls(model, [mesh], [(0, _parts.n_blocks(model))], cache=cache, compute_dtypes=[dtype])

    @classmethod
    def pipelined(cls, model, topology, partition=None, *, cache: bool = True,
                  compute_dtype: str | None = None) -> "Stages":
        """Stage s on site s of `topology` (`core.placement.site_meshes`); `partition` = blocks per site (uneven
        allowed), None for the topology's `layers` shares or an even split. Stage s computes in site s's compute
        dtype as training resolves it (`core.placement.site_compute_dtype`), or in `compute_dtype` on every site
        when one is given (the site's `compute_dtype` replaced by it, and checked against its devices)."""
        meshes = _placement.site_meshes(topology)
        sites = [s if compute_dtype is None else dataclasses.replace(s, compute_dtype=compute_dtype)
                 for s in topology.sites]
        return cls(model, meshes, stage_ranges(topology, _parts.n_blocks(model), len(meshes), partition), cache=cache,
                   compute_dtypes=[_placement.site_compute_dtype(s, m) for s, m in zip(sites, meshes)])

    def describe(self) -> str:
        """One line per stage: its blocks, devices and compute dtype."""
        last, stages = len(self.meshes) - 1, zip(self.meshes, self.ranges, self.compute_dtypes)
        return "\n".join(
            f"stage {s}: {'embed + ' if s == 0 else ''}blocks[{lo}:{hi}]{' + head' if s == last else ''} on "
            f"{mesh.devices.size} {mesh.devices.flat[0].platform} device(s) {[d.id for d in mesh.devices.flat]}, "
            f"compute {dtype}" for s, (mesh, (lo, hi), dtype) in enumerate(stages))

    def place_tokens(self, tokens) -> jax.Array:
        """tokens [B, t] (or [B]) int32 onto the first stage's mesh."""
        tokens = tokens if isinstance(tokens, jax.Array) else np.asarray(tokens, np.int32)
        return jax.device_put(tokens, _sharding(self.meshes[0], _TOKENS, tokens.shape))

    def _into(self, s: int, x) -> jax.Array:
        return self.place_tokens(x) if s == 0 else jax.device_put(x, _sharding(self.meshes[s], _ACTS, x.shape))

    def init_caches(self, batch: int, length: int) -> list:
        """Zero caches for `batch` sequences of `length` positions, each stage's on its mesh in its compute dtype."""
        out = []
        for mesh, params, dtype in zip(self.meshes, self._params, self.compute_dtypes):
            caches = _zeros(self._block_def, jnp.dtype(dtype), int(batch), int(length), params[1])
            out.append(jax.device_put(caches, _cache_shardings(mesh, caches)))
        return out

    def step(self, tokens, start, caches: list) -> tuple[jax.Array, list]:
        """tokens [B, t] int32 at positions start..start+t-1 -> (logits [B, V] fp32 of position start+t-1 on the
        last stage's mesh, the caches with those positions written). `caches` are donated."""
        start, x, new = np.int32(start), tokens, []
        for s, (defs, params, cache) in enumerate(zip(self._defs, self._params, caches)):
            x, cache = _step(defs, params, self._into(s, x), start, cache)
            new.append(cache)
        return x, new

    def full(self, tokens, at) -> jax.Array:
        """tokens [B, T] int32 (positions 0..T-1) -> logits [B, V] fp32 at position `at`, without a cache."""
        x = tokens
        for s, (defs, params) in enumerate(zip(self._defs, self._params)):
            x = _full(defs, params, self._into(s, x), np.int32(at))
        return x
