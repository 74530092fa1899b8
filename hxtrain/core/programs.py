"""Per-site stage programs: one jitted, shard_mapped program per (stage role, mesh, shapes).

Inside a site, `data` is a manual shard_map axis and `tensor` is left to GSPMD (partial-manual shard_map): the
model is ordinary NNX code with logical axes, its weights are sharded over `tensor` by the placement rules, and
XLA inserts the tensor-parallel collectives. Data parallelism is explicit: every program computes *local*
gradients (parameters are `pcast` to varying over `data`, so JAX does not insert a psum on their cotangent) and
adds them into an accumulator with a leading `data` axis. One `reduce` per step sums that axis: one gradient
reduction over `data` per step, not one per microbatch.

Memory discipline: forward programs return only the stage output; backward programs get the stage *input* and
recompute the forward inside (`jax.vjp`), so a site holds one input per in-flight microbatch. Accumulators are
donated, so they are updated in place. Zero-bubble schedules split the backward in two programs
(`backward_input` / `last_input` = "B", `backward_weight` / `last_weight` = "W"), each recomputing from the input.

Dtypes: params stay float32 (the master weights the optimizer updates); `StageRole.compute_dtype` (the site's
`dtype_policy`) is what the stage computes in. The cast of params and floating stage inputs to it happens *inside*
the differentiated function, so its transpose brings gradients back in float32 (into the float32 `gacc`) and the
input cotangent dx back in the dtype of the input that was received. The loss is float32 (the head's output is
cast before scaling). With compute_dtype float32 no cast is inserted: the programs are the plain fp32 ones.

Shapes: mb = microbatch size, T = sequence length, D = model width, d = data-parallel size of the site; c = the
compute dtype, c_in = the dtype of the received activation (the previous stage's compute dtype).
    tokens/targets [mb, T] int32, sharded P('data');  x [mb, T, D] c_in;  h, dh [mb, T, D] c;  dx like x
    gacc: the stage's parameter tree with a leading [d] axis, float32, P('data', ...);  lacc [d] float32, P('data')
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain.core import parts as _parts
from hxtrain.core.placement import DATA


@dataclasses.dataclass(frozen=True, unsafe_hash=False)
class StageRole:
    """What a stage computes: embedding on the first, head + loss on the last, its blocks in between.

    Hashable (graph definitions, a mesh and a dtype name, no arrays), so compiled programs are shared by every
    pipeline with the same model structure, mesh and compute dtype.
    """

    embed_def: Any
    block_def: Any
    head_def: Any
    first: bool
    last: bool
    mesh: Mesh
    compute_dtype: str = "float32"  # the site's `dtype_policy(...).compute_dtype`; params stay float32

    def __hash__(self):
        # Every program call hashes its role (a static argument); hashing the graph definitions costs ~30 us, so
        # the hash is computed once per role.
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash((self.embed_def, self.block_def, self.head_def, self.first, self.last, self.mesh,
                      self.compute_dtype))
            object.__setattr__(self, "_hash", h)
        return h


def to_compute(dtype, tree):
    """Floating leaves -> `dtype` (a compute dtype). Integer leaves (tokens) and leaves already in it are returned
    as they are, so float32 adds no op at all. The one cast rule: generation's stage programs use it too."""
    dtype = jnp.dtype(dtype)
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype else a, tree)


def _forward(role: StageRole, params: dict, x):
    """Stage input (tokens [mb, T] or [mb, T, D]) -> stage output [mb, T, D] in the compute dtype (non-last)."""
    params, x = to_compute(role.compute_dtype, params), to_compute(role.compute_dtype, x)
    h = _parts.apply_embed(role.embed_def, params["embed"], x) if role.first else x
    # A block may widen internally (softmax in fp32); what leaves the stage is in the compute dtype.
    return to_compute(role.compute_dtype, _parts.apply_blocks(role.block_def, params["blocks"], h))


def _loss(role: StageRole, params: dict, x, targets):
    """Scalar float32 mean loss of the microbatch, computed in the compute dtype up to the head's output."""
    params = to_compute(role.compute_dtype, params)
    loss = _parts.apply_head(role.head_def, params["head"], _forward(role, params, x), targets)
    return loss if loss.dtype == jnp.float32 else loss.astype(jnp.float32)


def _varying(tree):
    # Mark replicated weights as varying over `data` so their cotangents stay local (no implicit psum).
    # Outside shard_map (a site with data == 1, see `_smap`) there is nothing to mark.
    if DATA not in jax.sharding.get_abstract_mesh().manual_axes:
        return tree
    return jax.tree.map(lambda a: jax.lax.pcast(a, DATA, to="varying"), tree)


def _accumulate(gacc, grads):
    return jax.tree.map(lambda a, g: a + g[None].astype(a.dtype), gacc, grads)


def _smap(role: StageRole, fn, in_specs, out_specs):
    if role.mesh.shape[DATA] == 1:
        # One data shard: the local view is the global view, so the function runs as plain GSPMD code. A
        # shard_map here cost ~1.4x per step on CPU (benchmarks/overhead.py), for nothing.
        return fn
    return jax.shard_map(fn, mesh=role.mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names=frozenset({DATA}))


@functools.partial(jax.jit, static_argnums=0)
def forward(role: StageRole, params, x):
    """[mb, T] tokens or [mb, T, D] activations -> [mb, T, D] activations in `role.compute_dtype`."""
    return _smap(role, functools.partial(_forward, role), (P(), P(DATA)), P(DATA))(params, x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def backward(role: StageRole, params, x, dy, gacc):
    """Recompute the stage from its input and pull dy (compute dtype, like the output) back.
    Returns (dx, in x's dtype, or None on the first stage; gacc)."""

    def local(params, x, dy, gacc):
        params = _varying(params)
        if role.first:  # integer tokens have no cotangent
            _, pull = jax.vjp(lambda p: _forward(role, p, x), params)
            (grads,), dx = pull(dy), None
        else:
            _, pull = jax.vjp(lambda p, h: _forward(role, p, h), params, x)
            grads, dx = pull(dy)
        return dx, _accumulate(gacc, grads)

    out_dx = None if role.first else P(DATA)
    return _smap(role, local, (P(), P(DATA), P(DATA), P(DATA)), (out_dx, P(DATA)))(params, x, dy, gacc)


def _loss_and_grads_local(role, params, x, targets, scale):
    params = _varying(params)
    argnums = (0,) if role.first else (0, 1)
    value, grads = jax.value_and_grad(lambda p, h: _loss(role, p, h, targets) * scale, argnums=argnums)(params, x)
    return value, grads[0], (None if role.first else grads[1])


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4, 5))
def last_step(role: StageRole, params, x, targets, gacc, lacc, scale):
    """Last stage, forward + loss + backward fused. `scale` (scalar) weights this microbatch's mean loss
    (1 / (microbatches * data)). Returns (dx or None when the last stage is also the first, gacc, lacc)."""

    def local(params, x, targets, gacc, lacc, scale):
        value, grads, dx = _loss_and_grads_local(role, params, x, targets, scale)
        return dx, _accumulate(gacc, grads), lacc + value[None]

    out_dx = None if role.first else P(DATA)
    specs = (P(), P(DATA), P(DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, (out_dx, P(DATA), P(DATA)))(params, x, targets, gacc, lacc, scale)


# ---- fused microbatches: g microbatches per program, one at a time inside (a scan) ---------------------------
# The same work as g calls of `forward` / `backward` / `last_step`, in one dispatch: a schedule over M / g units
# trades a longer fill and drain for g times fewer programs, where dispatch, not compute, sets the step. The scan
# is unrolled (g is small; a rolled loop costs a while-loop per microbatch on a CPU); each microbatch's
# activations are dead once its gradient is added, as with separate calls. xs, dys: [g, mb, ...] P(None, 'data').


@functools.partial(jax.jit, static_argnums=0)
def forward_group(role: StageRole, params, xs):
    """[g, mb, T(, D)] -> [g, mb, T, D]: `forward` of each of g microbatches."""
    local = lambda params, xs: jax.lax.scan(lambda c, x: (c, _forward(role, params, x)), None, xs,  # noqa: E731
                                            unroll=True)[1]
    return _smap(role, local, (P(), P(None, DATA)), P(None, DATA))(params, xs)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def backward_group(role: StageRole, params, xs, dys, gacc):
    """`backward` of each of g microbatches in turn, into one gacc (donated). Returns (dxs or None, gacc)."""

    def local(params, xs, dys, gacc):
        params = _varying(params)

        def one(gacc, x_dy):
            x, dy = x_dy
            if role.first:
                _, pull = jax.vjp(lambda p: _forward(role, p, x), params)
                (grads,), dx = pull(dy), None
            else:
                _, pull = jax.vjp(lambda p, h: _forward(role, p, h), params, x)
                grads, dx = pull(dy)
            return _accumulate(gacc, grads), dx

        gacc, dxs = jax.lax.scan(one, gacc, (xs, dys), unroll=True)
        return dxs, gacc

    out_dx = None if role.first else P(None, DATA)
    specs = (P(), P(None, DATA), P(None, DATA), P(DATA))
    return _smap(role, local, specs, (out_dx, P(DATA)))(params, xs, dys, gacc)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4, 5))
def last_step_group(role: StageRole, params, xs, targets, gacc, lacc, scale):
    """`last_step` of each of g microbatches in turn. Returns (dxs or None, gacc, lacc)."""

    def local(params, xs, targets, gacc, lacc, scale):
        def one(carry, x_t):
            gacc, lacc = carry
            value, grads, dx = _loss_and_grads_local(role, params, x_t[0], x_t[1], scale)
            return (_accumulate(gacc, grads), lacc + value[None]), dx

        (gacc, lacc), dxs = jax.lax.scan(one, (gacc, lacc), (xs, targets), unroll=True)
        return dxs, gacc, lacc

    out_dx = None if role.first else P(None, DATA)
    specs = (P(), P(None, DATA), P(None, DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, (out_dx, P(DATA), P(DATA)))(params, xs, targets, gacc, lacc, scale)


# ---- split backward (zero-bubble schedules): "B" = input gradient only, "W" = weight gradient only ----------
# Both recompute the stage from its held input (only inputs are kept between tasks), so a split backward costs one
# extra forward per microbatch over the fused `backward`; in exchange B, which the previous stage waits for, is
# short and W fills the bubbles. The executor holds x (and dy, or the targets) from F until W.


@functools.partial(jax.jit, static_argnums=0)
def backward_input(role: StageRole, params, x, dy):
    """Middle stage "B": recompute and pull dy back to the input only. [mb, T, D] -> dx [mb, T, D].

    Not for the first stage (integer tokens have no cotangent: its B has nothing to compute)."""
    if role.first:
        raise ValueError("backward_input: the first stage has no input gradient (its input is tokens); "
                         "run only backward_weight for it")

    def local(params, x, dy):
        _, pull = jax.vjp(lambda h: _forward(role, params, h), x)
        return pull(dy)[0]

    return _smap(role, local, (P(), P(DATA), P(DATA)), P(DATA))(params, x, dy)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def backward_weight(role: StageRole, params, x, dy, gacc):
    """Non-last stage "W": recompute and pull dy back to the parameters only; adds them into gacc (donated)."""

    def local(params, x, dy, gacc):
        _, pull = jax.vjp(lambda p: _forward(role, p, x), _varying(params))
        return _accumulate(gacc, pull(dy)[0])

    return _smap(role, local, (P(), P(DATA), P(DATA), P(DATA)), P(DATA))(params, x, dy, gacc)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def last_input(role: StageRole, params, x, targets, lacc, scale):
    """Last stage "B": forward + loss + input gradient; the loss is added into lacc (donated). -> (dx, lacc).

    The last stage's B is what the previous stage waits for, so its weight gradient is left to `last_weight`."""
    if role.first:
        raise ValueError("last_input: a stage that is both first and last has no input gradient; use whole_step")

    def local(params, x, targets, lacc, scale):
        value, dx = jax.value_and_grad(lambda h: _loss(role, params, h, targets) * scale)(x)
        return dx, lacc + value[None]

    specs = (P(), P(DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, (P(DATA), P(DATA)))(params, x, targets, lacc, scale)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def last_weight(role: StageRole, params, x, targets, gacc, scale):
    """Last stage "W": recompute forward + loss, gradient w.r.t. the parameters only, added into gacc (donated)."""

    def local(params, x, targets, gacc, scale):
        grads = jax.grad(lambda p: _loss(role, p, x, targets) * scale)(_varying(params))
        return _accumulate(gacc, grads)

    specs = (P(), P(DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, P(DATA))(params, x, targets, gacc, scale)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3, 4))
def whole_step(role: StageRole, params, tokens, gacc, lacc, scale):
    """One stage holding the whole model: every microbatch in one program (a scan), no Python per microbatch.

    tokens [M, mb, T+1] sharded P(None, 'data')."""

    def local(params, tokens, gacc, lacc, scale):
        def body(carry, mb_tokens):
            gacc, lacc = carry
            value, grads, _ = _loss_and_grads_local(role, params, mb_tokens[:, :-1], mb_tokens[:, 1:], scale)
            return (_accumulate(gacc, grads), lacc + value[None]), None

        return jax.lax.scan(body, (gacc, lacc), tokens)[0]

    specs = (P(), P(None, DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, (P(DATA), P(DATA)))(params, tokens, gacc, lacc, scale)


# ---- forward only (evaluation): no gradient, nothing held ---------------------------------------------------


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(4,))
def last_loss(role: StageRole, params, x, targets, lacc, scale):
    """Last stage of a forward-only pass: the microbatch's mean loss times `scale`, added into lacc (donated)."""

    def local(params, x, targets, lacc, scale):
        return lacc + (_loss(role, params, x, targets) * scale)[None]

    specs = (P(), P(DATA), P(DATA), P(DATA), P())
    return _smap(role, local, specs, P(DATA))(params, x, targets, lacc, scale)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=(3,))
def whole_loss(role: StageRole, params, tokens, lacc, scale):
    """The whole model on one stage, forward only: every microbatch's scaled loss added into lacc (a scan)."""

    def local(params, tokens, lacc, scale):
        def body(lacc, mb_tokens):
            return lacc + (_loss(role, params, mb_tokens[:, :-1], mb_tokens[:, 1:]) * scale)[None], None

        return jax.lax.scan(body, lacc, tokens)[0]

    specs = (P(), P(None, DATA), P(DATA), P())
    return _smap(role, local, specs, P(DATA))(params, tokens, lacc, scale)


def reduce(gacc):
    """The step's one reduction over `data`: (grads, their sum of squares for the global norm, zeros like gacc).

    The zeros, in the donated accumulator's buffers and laid out like it, start the next step (XLA would make a
    replicated constant of a bare zeros_like, and the next step's programs would compile again for it)."""
    return _reduce(tuple(a.sharding for a in jax.tree.leaves(gacc)), gacc)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _reduce(shardings: tuple, gacc):
    grads = jax.tree.map(lambda a: a.sum(0), gacc)
    sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads))
    return grads, sq, _zeros_like(gacc, shardings)


def reduce_loss(lacc):
    """The step's loss (the sum of the last stage's per-shard loss sums) and zeros like `lacc`, in its buffer."""
    return _reduce_loss((lacc.sharding,), lacc)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _reduce_loss(sharding: tuple, lacc):
    return lacc.sum(), _zeros_like(lacc, sharding)


def _zeros_like(tree, shardings: tuple):
    leaves, treedef = jax.tree.flatten(tree)
    zeros = [jax.lax.with_sharding_constraint(jnp.zeros_like(a), s) for a, s in zip(leaves, shardings)]
    return jax.tree.unflatten(treedef, zeros)


@functools.partial(jax.jit, static_argnums=0)
def microbatches(role: StageRole, tokens):
    """The step's tokens int32 [M, mb, T+1] (sharded P(None, 'data')) -> (inputs, targets), each a tuple of M
    [mb, T] arrays sharded P('data'): the first stage's inputs and the last stage's targets (None where the
    stage is not first / last). One program per site per step instead of one transfer per microbatch. Fused
    microbatches: tokens [M / g, g, mb, T+1] (P(None, None, 'data')) -> tuples of [g, mb, T] (P(None, 'data'))."""
    out = NamedSharding(role.mesh, P(*[None] * (tokens.ndim - 3), DATA))
    cut = lambda lo, hi: tuple(jax.lax.with_sharding_constraint(m[..., lo:hi], out) for m in tokens)
    T = tokens.shape[-1] - 1
    return (cut(0, T) if role.first else None), (cut(1, T + 1) if role.last else None)


def zeros_accumulator(params, shardings, data: int):
    """A zero gradient accumulator [data, ...] per leaf, sharded like the params with `data` prepended."""
    leaves, treedef = jax.tree.flatten(params)
    shapes = tuple(jax.ShapeDtypeStruct((data, *p.shape), p.dtype) for p in leaves)
    out = tuple(NamedSharding(s.mesh, P(DATA, *s.spec)) for s in treedef.flatten_up_to(shardings))
    return jax.tree.unflatten(treedef, _zeros_program(shapes, out)())


@functools.lru_cache(maxsize=256)
def _zeros_program(shapes: tuple, out: tuple):
    # Cached: a fresh jit per call would compile again every step (half a second per stage on a CPU).
    return jax.jit(lambda: tuple(jnp.zeros(t.shape, t.dtype) for t in shapes), out_shardings=out)
