"""The compiled SPMD step: the one program `hxtrain.engine.spmd.SpmdPipeline` runs, and the helpers it traces.

`jax.shard_map` is manual over `site` and `data` (`tensor` stays with GSPMD, as in the per-site stage programs).
Each tick of a `scan` over M + S - 1 ticks, site s applies its stage to microbatch t - s and `ppermute`s the result
to site s + 1; `jax.value_and_grad` through the loop gives the backward (the transposed scan sends cotangents back
with the inverse `ppermute`). Stages are `jax.checkpoint`ed, so a site keeps only its stage input per tick (GPipe: M).

Dtypes: as in `hxtrain.core.programs`, the float32 params are cast inside the differentiated function, so gradients
come back in float32; activations, the loop carry and what `ppermute` sends are in the compute dtype; the loss is
float32. A float32 run has no cast at all.

Unowned slots and padded layers are replaced by zeros with `jnp.where` before any arithmetic (a NaN parameter times
a zero cotangent is still NaN, so masking only the outputs would not do); per-device `lax.cond`s skip the embedding
and head off their sites and all work on bubble ticks (only the taken branch is differentiated). Nothing in those
slots can reach the loss or a gradient; `poison=True` fills them (and the loop carry, and what bubbles send) with
NaN to prove it.

Gradients never cross a site: parameters are sharded over `site`, and `pcast` to varying over `data` once, so the
gradient reduction over `data` happens once per step, inside each site. The loss (a scalar) and the optimizer's
squared norms are the only other things that cross.

Shapes (S, M, mb, d, T, D, L) and the stacked params layout: see `hxtrain.engine.spmd`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec as P

from hxtrain.core import parts as _parts
from hxtrain.core.placement import DATA, SITE


@dataclasses.dataclass(frozen=True)
class _Program:
    """The static key of the compiled step (hashable: graph definitions, a mesh, ints)."""

    embed_def: Any
    block_def: Any
    head_def: Any
    mesh: Mesh
    counts: tuple[int, ...]  # blocks per site: S and L = max(counts) (which slots are live is a traced input)
    microbatches: int
    width: int  # D, the activation width
    dtype: Any  # activation (compute) dtype; float32 params are cast to it inside the step

    @property
    def sites(self) -> int:
        return len(self.counts)

    @property
    def depth(self) -> int:
        return max(self.counts)


def _mask(cond, tree):
    """Where `cond` is False, zeros instead of the tree's values (and zero gradients for them)."""
    return jax.tree.map(lambda a: jnp.where(cond, a, jnp.zeros((), a.dtype)), tree)


def _cast(dtype, tree):
    """Floating leaves -> `dtype`; other leaves and leaves already in it unchanged (no op in a float32 run)."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype
                        else a, tree)


def _blocks(block_def, stacked: dict, live, h):
    """Apply L stacked blocks; padded ones (live False) leave h unchanged. stacked leaves [L, ...], h [b, T, D]."""

    def body(h, xs):
        p, on = xs
        return jnp.where(on, _cast(h.dtype, nnx.merge(block_def, p)(h)), h), None

    return jax.lax.scan(body, h, (stacked, live))[0]


def _site_loss(prog: _Program, params: dict, tokens, counts, poison):
    """One site's view (inside shard_map). params leaves [1, ...]; tokens [M, mb/d, T+1]; counts int32 [S] (live
    blocks per site); poison: bool scalar (NaN in the initial carry and in what bubbles send). Returns the loss.
    counts and poison are traced, so a poisoned run uses the very program a normal one does."""
    S, M, L = prog.sites, prog.microbatches, prog.depth
    s = jax.lax.axis_index(SITE)
    first, last = s == 0, s == S - 1
    params = jax.tree.map(lambda a: a[0], params)
    # Parameters the site must not use become zeros *before* any arithmetic, so NaN cannot leak through them.
    live = jnp.arange(L) < counts[s]  # [L]
    blocks = jax.tree.map(lambda a: jnp.where(live.reshape((L,) + (1,) * (a.ndim - 1)), a, 0), params["blocks"])
    embed, head = _mask(first, params["embed"]), _mask(last, params["head"])
    # Varying over `data` once here: per-tick gradients stay local and the one psum over `data` is this pcast's
    # transpose, at the end of the backward, not once per tick.
    embed, blocks, head = jax.lax.pcast((embed, blocks, head), DATA, to="varying")
    # float32 masters -> the compute dtype here, inside the differentiated function: gradients return in float32.
    embed, blocks, head = _cast(prog.dtype, (embed, blocks, head))
    scale = jnp.float32(1.0 / (M * prog.mesh.shape[DATA]))

    @jax.checkpoint  # keep only the stage input per tick; the backward recomputes the stage
    def stage(embed, blocks, head, recv, tok, valid):
        # Per-device conditionals: a site runs the embedding / head only if it owns them, and a bubble tick runs
        # nothing (its output is zeros; the received value is never read). Only the taken branch is
        # differentiated, and the where-masked parameters above keep even a wrong branch choice finite.
        h = jax.lax.cond(first, lambda: _cast(prog.dtype, _parts.apply_embed(prog.embed_def, embed, tok[:, :-1])),
                         lambda: recv)
        h = jax.lax.cond(valid, lambda h: _blocks(prog.block_def, blocks, live, h), jnp.zeros_like, h)
        loss = jax.lax.cond(valid & last, lambda h: _cast(jnp.float32, _parts.apply_head(prog.head_def, head, h,
                                                                                         tok[:, 1:])) * scale,
                            lambda h: jax.lax.pcast(jnp.float32(0.0), (SITE, DATA), to="varying"), h)
        return h, loss

    def tick(carry, t):
        recv, lacc = carry
        i = t - s  # this site's microbatch at tick t
        valid = (i >= 0) & (i < M)
        tok = jax.lax.dynamic_index_in_dim(tokens, jnp.clip(i, 0, M - 1), 0, keepdims=False)
        h, loss = stage(embed, blocks, head, recv, tok, valid)
        lacc = lacc + jnp.where(valid & last, loss, 0.0)
        # Under poison, what a bubble sends is NaN: the receiver must never use it.
        h = jnp.where(valid | jnp.logical_not(poison), h, jnp.full((), jnp.nan, h.dtype))
        if S > 1:
            h = jax.lax.ppermute(h, SITE, [(k, k + 1) for k in range(S - 1)])
        return (h, lacc), None

    shape = (tokens.shape[1], tokens.shape[2] - 1, prog.width)
    recv0 = jnp.full(shape, jnp.where(poison, jnp.nan, 0.0), prog.dtype)
    carry = jax.lax.pcast((recv0, jnp.float32(0.0)), (SITE, DATA), to="varying")
    _, lacc = jax.lax.scan(tick, carry, jnp.arange(M + S - 1))[0]
    return jax.lax.psum(lacc, (SITE, DATA))


@functools.partial(jax.jit, static_argnums=0)
def _step(prog: _Program, params: dict, tokens, counts, poison):
    """(loss, grads shaped like params, squared gradient norm per site [S])."""
    run = jax.shard_map(functools.partial(_site_loss, prog), mesh=prog.mesh,
                        in_specs=(P(SITE), P(None, DATA), P(), P()), out_specs=P(), axis_names=frozenset({SITE, DATA}))
    loss, grads = jax.value_and_grad(run)(params, tokens, counts, poison)
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
             for g in jax.tree.leaves(grads))
    return loss, grads, sq
