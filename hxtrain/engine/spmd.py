"""The SPMD fast path: the whole GPipe pipeline compiled as ONE program on a global mesh ('site', 'data', 'tensor').

Only possible when every site has the same backend, device kind and (data, tensor) shape in one process (tests,
one multi-slice cluster): the sites' device grids are stacked into one `Mesh`. This module holds the pipeline
(`SpmdPipeline`), its optimizer (`SpmdOptimizer`) and the placement of the stacked params; the compiled step
program (the per-tick `shard_map` loop, its masking, casts and backward) is `hxtrain.engine.spmd_program`.

Dtypes: every site computes in one dtype, its `compute_dtype` policy (`placement.site_compute_dtype`: float32 on
CPU by default); sites that differ are refused (the MPMD executor runs them).

Every site holds a slot of the same shape for everything (SPMD): a `[S, ...]` embedding and head (real on site 0
and site S-1, zeros elsewhere) and `[S, L, ...]` blocks, L = the largest stage, padded with zero layers.

Shapes: S sites, M microbatches, mb microbatch size, d = data per site, T sequence, D width, L = max(blocks).
    params   {'embed': [S, ...], 'blocks': [S, L, ...], 'head': [S, ...]}, sharded P('site', ...)
    tokens   [M, mb, T+1] int32, P(None, 'data');   activations per site [mb/d, T, D]
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain.core import parts as _parts
from hxtrain.core import placement as _placement
from hxtrain.schedules import tables as _schedules
from hxtrain.core import stages as _stages
from hxtrain.core.optim import SiteOptimizer
from hxtrain.core.placement import DATA, SITE, TENSOR
from hxtrain.config.topology import Topology, load_topology
from hxtrain.engine.spmd_program import _Program, _step

_SCHEDULES = ("gpipe",)


@dataclasses.dataclass(frozen=True)
class SpmdStage:
    """The whole pipeline as one 'stage' of the optimizer's view: stacked params on the global mesh."""

    params: dict
    shardings: dict
    mesh: Mesh

    def with_params(self, params: dict) -> "SpmdStage":
        return dataclasses.replace(self, params=params)


class _PpermuteTraffic:
    """Bytes the compiled step moves between neighbouring sites, in the `InProcessTransport` report format.

    Not counted at run time (there is no host in the loop): every tick ppermutes one [mb, T, D] activation
    forward and, in the backward, one cotangent back, bubbles included: (M + S - 1) of each per link per step."""

    def __init__(self):
        self._per_link: dict[str, int] = {}

    def record(self, sites: int, ticks: int, nbytes: int) -> None:
        for i in range(sites - 1):
            for link in (f"{i}->{i + 1}", f"{i + 1}->{i}"):
                self._per_link[link] = self._per_link.get(link, 0) + ticks * nbytes

    def bytes_per_link(self) -> dict[str, int]:
        return dict(self._per_link)

    def total_bytes(self) -> int:
        return sum(self._per_link.values())

    def reset_stats(self) -> None:
        self._per_link.clear()


class SpmdOptimizer(SiteOptimizer):
    """`SiteOptimizer` for the stacked params: the same per-stage AdamW update, `vmap`ped over the site axis.

    Each site's slice {'embed', 'blocks' [L, ...], 'head'} looks exactly like an MPMD stage's tree, so the
    weight-decay mask and every elementwise update are the same; padded layers and dummy slots have zero grads
    and zero values and stay zero. Clipping uses the global norm over every site (padding adds 0)."""

    over_sites = True

    def global_norm(self, stages: list[SpmdStage], sqs: list) -> list[jax.Array]:
        # one program holds every site: the per-site squared norms [S] are already on one mesh
        total = sum(jnp.sum(sq) for sq in sqs)
        return [total] * len(stages)


def _one_compute_dtype(topology: Topology, meshes) -> str:
    """The compute dtype every site shares (`placement.site_compute_dtype`); ValueError naming the first site
    whose policy differs from sites[0]'s: one program cannot compute in two dtypes."""
    dtypes = [_placement.site_compute_dtype(s, m) for s, m in zip(topology.sites, meshes)]
    ref = topology.sites[0]
    for i, (site, got) in enumerate(zip(topology.sites, dtypes)):
        if got != dtypes[0]:
            raise ValueError(
                f"{topology.source}: sites[{i}] ({site.name!r}) compute_dtype: the SPMD executor compiles one "
                f"program over every site, so every site computes in one dtype; expected {dtypes[0]!r} like "
                f"sites[0] ({ref.name!r}), got {got!r}; set the same compute_dtype on every site or use "
                "--executor mpmd (per-site dtypes)")
    return dtypes[0]


def _refuse_mixed(topology: Topology) -> None:
    """The SPMD path needs one PJRT client, backend, device kind and (data, tensor) shape on every site."""
    from hxtrain.backends import site_client

    ref = topology.sites[0]
    for i, site in enumerate(topology.sites[1:], start=1):
        for field, want, got in (("backend", ref.backend, site.backend),
                                 ("device_kind", ref.device_kind, site.device_kind),
                                 ("data x tensor", f"{ref.data} x {ref.tensor}", f"{site.data} x {site.tensor}"),
                                 # last: one backend, yet two clients (jaxlib's CPU and a CPU plugin)
                                 ("client", lambda: site_client(ref).name, lambda: site_client(site).name)):
            if callable(want):
                want, got = want(), got()
            if want != got:
                raise ValueError(
                    f"{topology.source}: sites[{i}] ({site.name!r}) {field}: the SPMD executor compiles one "
                    f"program over every site, so it expected {want!r} like sites[0] ({ref.name!r}), got {got!r}; "
                    "use executor 'mpmd' for heterogeneous sites (no program or mesh spans two PJRT clients)")


class SpmdPipeline:
    """GPipe over every site as one SPMD program. Same numbers as `hxtrain.Pipeline(schedule='gpipe')`.

    Args:
      model: an NNX model following the protocol in `hxtrain.core.parts`.
      topology: a `Topology` or a path / shipped name; every site the same backend, device kind, data x tensor.
      schedule: "gpipe" (or a `GPipe` object); anything else is refused.
      microbatches: M; the batch must be a multiple of M * data.
      partition: blocks per stage (uneven allowed; stages are padded to the largest), or None as in `Pipeline`.
    """

    def __init__(self, model, topology: Topology | str | os.PathLike = "local", schedule: Any = "gpipe",
                 microbatches: int = 8, partition=None):
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.schedule = _schedules.get_schedule(schedule)
        if self.schedule.name not in _SCHEDULES or self.schedule.virtual != 1 or self.schedule.split_backward:
            raise ValueError(f"schedule: the SPMD executor runs {list(_SCHEDULES)}, got {self.schedule.name!r}; "
                             "use executor 'mpmd' for other schedules")
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(f"microbatches: expected a whole number >= 1, got {microbatches!r}")
        _refuse_mixed(self.topology)
        self.microbatches = microbatches
        self._model = model
        self.parts = p = _parts.split_model(model)
        S = self.topology.n_sites
        self.ranges = _stages.stage_ranges(self.topology, p.n_layers, S, partition)
        meshes = _placement.site_meshes(self.topology)
        kinds = sorted({d.device_kind for m in meshes for d in m.devices.flat})
        if len(kinds) > 1:
            raise ValueError(f"{self.topology.source}: devices: the SPMD executor needs one device kind, got "
                             f"{kinds}; use executor 'mpmd'")
        compute = jnp.dtype(_one_compute_dtype(self.topology, meshes))
        self.mesh = Mesh(np.stack([m.devices for m in meshes]), (SITE, DATA, TENSOR))
        self.counts = tuple(hi - lo for lo, hi in self.ranges)
        params = self._stack(p.embed, list(p.blocks), p.head)
        shard = self._shardings(params)
        self.stages = [SpmdStage(jax.device_put(params, shard), shard, self.mesh)]
        h = _stages.embed_output(p, 1)
        self._program = _Program(p.embed_def, p.block_def, p.head_def, self.mesh, self.counts, microbatches,
                                 int(h.shape[-1]), h.dtype if compute == jnp.float32 else compute)
        self.transport = _PpermuteTraffic()

    # ---- placement ---------------------------------------------------------------------------------------------

    def _stack(self, embed: dict, blocks: list[dict], head: dict) -> dict:
        """Per-part pure trees (blocks in model order) -> host arrays {'embed': [S, ...], 'blocks': [S, L, ...],
        'head': [S, ...]}, zeros in the padded layers and the dummy slots."""
        S, L = len(self.ranges), max(self.counts)
        zero = lambda tree: jax.tree.map(lambda a: np.zeros(np.shape(a), np.asarray(a).dtype), tree)  # noqa: E731
        stack = lambda *xs: np.stack([np.asarray(x) for x in xs])  # noqa: E731
        per_site = []
        for s, (lo, hi) in enumerate(self.ranges):
            layers = list(blocks[lo:hi]) + [zero(blocks[0])] * (L - (hi - lo))
            per_site.append({"embed": embed if s == 0 else zero(embed), "blocks": jax.tree.map(stack, *layers),
                             "head": head if s == S - 1 else zero(head)})
        return jax.tree.map(stack, *per_site)

    def _shardings(self, params: dict) -> dict:
        p = self.parts
        axes = {"embed": p.embed_axes, "head": p.head_axes,
                "blocks": jax.tree.map(lambda ax: ("layers",) + ax, p.block_axes, is_leaf=_is_axes)}

        def one(a, ax):  # site first, then the logical->mesh rules for the rest ('tensor' only, in practice)
            return NamedSharding(self.mesh, P(SITE, *_placement.mesh_spec(ax, a.shape[1:], self.mesh)))

        return jax.tree.map(one, params, axes, is_leaf=lambda x: _is_axes(x) or isinstance(x, np.ndarray))

    def stack_state(self, state) -> dict:
        """An nnx.State (or pure dict) shaped like nnx.state(model, nnx.Param) -> the stacked layout on the global
        mesh (the inverse of `as_state`): to load params, or to feed grads computed elsewhere to the optimizer."""
        pure = nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
        stack = pure["blocks"]  # a scanned model's blocks are one tree of [L, ...] leaves
        blocks = [jax.tree.map(lambda x, i=i: np.asarray(x)[i], stack) if self.parts.scanned else stack[i]
                  for i in range(self.parts.n_layers)]
        host = self._stack(pure["embed"], blocks, pure["head"])
        return jax.device_put(host, self.stages[0].shardings)

    @property
    def params(self) -> dict:
        return self.stages[0].params

    def set_params(self, params: list[dict]) -> None:
        """Swap in new params, one tree per stage (the optimizer's result, or a restored checkpoint's)."""
        self.stages = _stages.with_params(self.stages, params)

    # ---- one step ----------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens) -> np.ndarray:
        return _stages.split_batch(tokens, self.microbatches, self.topology.sites)

    def grads(self, tokens, *, poison: bool = False, timeline: bool = False):
        """One step's (loss, [grads], [squared norm per site [S]]), as one-element lists (the whole pipeline is
        one program); grads are shaped like `self.params` (zero in padded layers and dummy slots)."""
        if timeline:
            raise ValueError("timeline: the SPMD executor runs the step as one program, so it has no per-task "
                             "events to record; expected timeline=False, got True; use executor 'mpmd'")
        batch = self._check_tokens(tokens)
        prog, params = self._program, self.params
        if poison:
            params = _poison(self.counts, params)
        loss, grads, sq = _step(prog, params, jax.device_put(batch, NamedSharding(self.mesh, P(None, DATA))),
                                np.asarray(self.counts, np.int32), np.bool_(poison))
        M, mb, T1 = batch.shape
        self.transport.record(prog.sites, M + prog.sites - 1, mb * (T1 - 1) * prog.width * prog.dtype.itemsize)
        return loss, [grads], [sq]

    def loss_and_grads(self, tokens, *, poison: bool = False):
        """(loss, grads as an nnx.State shaped like nnx.state(model, nnx.Param)); equals the single-device
        `nnx.value_and_grad(loss)(model, tokens)`. `poison` fills padded layers, dummy slots, the initial loop
        carry and bubble sends with NaN (tests)."""
        loss, (grads,), _ = self.grads(tokens, poison=poison)
        return loss, self.as_state(grads)

    def make_optimizer(self, config) -> SpmdOptimizer:
        return SpmdOptimizer(config, self.stages)

    # ---- views -------------------------------------------------------------------------------------------------

    def as_state(self, tree: dict) -> nnx.State:
        """A stacked tree (params or grads) -> an nnx.State shaped like nnx.state(model, nnx.Param), host arrays."""
        host = jax.device_get(tree)
        blocks = [jax.tree.map(lambda a, s=s, j=j: a[s, j], host["blocks"])
                  for s, n in enumerate(self.counts) for j in range(n)]
        return _parts.as_model_state(self._model, jax.tree.map(lambda a: a[0], host["embed"]), blocks,
                                     jax.tree.map(lambda a: a[-1], host["head"]))

    def params_state(self) -> nnx.State:
        return self.as_state(self.params)

    def trained_model(self, device=None):
        """A model like the one given, holding the current parameters on one device (`core.parts.with_params`)."""
        return _parts.with_params(self._model, self.params_state(), device)

    def describe(self) -> str:
        site = self.topology.sites[0]
        lines = [f"topology {self.topology.name!r} ({self.topology.source}), executor spmd (one program on mesh "
                 f"site {len(self.ranges)} x data {site.data} x tensor {site.tensor}), schedule gpipe, "
                 f"{self.microbatches} microbatches"]
        L = max(self.counts)
        for s, (lo, hi) in enumerate(self.ranges):
            what = (["embed"] if s == 0 else []) + [f"blocks[{lo}:{hi}]"] + (["head"] if s == len(self.ranges) - 1
                                                                               else [])
            pad = f" (+{L - (hi - lo)} padded)" if hi - lo < L else ""
            devs = [d.id for d in self.mesh.devices[s].flat]
            lines.append(f"  stage {s} -> site {self.topology.sites[s].name!r} (devices {devs}): "
                         f"{' + '.join(what)}{pad}")
        return "\n".join(lines)


def _is_axes(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(a, (str, type(None))) for a in x)


@functools.partial(jax.jit, static_argnums=0)
def _poison(counts: tuple[int, ...], params: dict) -> dict:
    """NaN in every slot a site must not use: padded layers, the embedding off site 0, the head off site S-1."""
    S, L = len(counts), max(counts)
    live = np.arange(L)[None, :] < np.asarray(counts)[:, None]  # [S, L]

    def fill(a, keep):
        return jnp.where(keep.reshape(keep.shape + (1,) * (a.ndim - keep.ndim)), a, jnp.nan)

    return {"embed": jax.tree.map(lambda a: fill(a, np.arange(S) == 0), params["embed"]),
            "blocks": jax.tree.map(lambda a: fill(a, live), params["blocks"]),
            "head": jax.tree.map(lambda a: fill(a, np.arange(S) == S - 1), params["head"])}
