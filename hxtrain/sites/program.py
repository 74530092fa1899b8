"""The JAX side of one site process: its mesh, its stages, its optimizer and its per-site schedule loop.

Imported by `hxtrain.sites.process` only after the process's device count is set. Uses the same per-stage programs
as the in-process executor (`hxtrain.core.programs`) and the same optimizer update (`hxtrain.core.optim`), so a site process
computes bit-for-bit what the same stages compute in one process.

A site whose topology entry has `processes > 1` runs one LocalSite per process over one `jax.distributed` cluster
(`hxtrain.network.group`): its mesh spans every process's devices, host data is placed with `put_global`
(`jax.make_array_from_callback`: each process fills its own shards), and only process 0 talks TCP.

Shapes: M microbatches, mb = batch / M, T sequence length, D model width.
    tokens [M, mb, T+1] int32 on the host; activations / cotangents [mb, T, D], P('data') on the site, in the
    compute dtype of the stage that produced them (`placement.site_compute_dtype`; float32 on CPU by default).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain import backends as _backends
from hxtrain.data import loader as _data
from hxtrain.engine import executor as _executor
from hxtrain.core import parts as _parts
from hxtrain.core import placement as _placement
from hxtrain.schedules import tables as _schedules
from hxtrain.schedules.forward import ForwardOnly
from hxtrain.network import group as _group
from hxtrain.core import programs as _stage
from hxtrain.core import stages as _stages
from hxtrain.core.stages import StageState
from hxtrain.engine.executor import put_data as _put, run_step, warm_up_split
from hxtrain.network.transport import NetTransport
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from hxtrain.engine.transport import link_codecs


def site_mesh(site) -> Mesh:
    """The site's Mesh(('data', 'tensor')) over the first `devices` devices of its backend: this process's, or,
    for a site of several processes, the whole cluster's (`jax.devices()` lists them process by process)."""
    mesh = _placement.site_mesh(site, _backends.place_sites([site])[0])
    if site.processes > 1:
        _group.check_mesh(mesh, site)
    return mesh


def _device_put_tree(tree, shardings):
    return jax.device_put(tree, shardings)


def rows_read(mesh: Mesh, stages: dict, microbatches: int, batch_size: int) -> tuple[int, ...]:
    """The rows of each batch [B, T+1] that this process places on its devices: those of its own shards of the
    token batch [M, mb, T+1] laid out P(None, 'data') (all of them unless the site spans several processes), or
    none when no stage here embeds or takes the loss."""
    if not any(s.role.first or s.role.last for s in stages.values()):
        return ()
    mb = batch_size // microbatches
    shards = NamedSharding(mesh, P(None, _placement.DATA)).addressable_devices_indices_map((microbatches, mb, 1))
    return tuple(sorted({m * mb + j for index in shards.values()
                         for m in range(microbatches)[index[0]] for j in range(mb)[index[1]]}))


class _NetOptimizer(SiteOptimizer):
    """`SiteOptimizer` whose global norm comes from every site: per-stage squared norms travel as CONTROL frames."""

    def __init__(self, config, stages, transport, n_stages: int, put_tree=_device_put_tree):
        super().__init__(config, stages)
        self.transport, self.n_stages, self.put_tree = transport, n_stages, put_tree

    def global_norm(self, stages, sqs):
        # float() of a replicated scalar works on every process, also when the site spans several
        vec = self.transport.exchange_norms({s.index: float(sq) for s, sq in zip(stages, sqs)}, self.n_stages)
        total = functools.reduce(np.add, vec[1:], vec[0])  # stage order, float32: as the in-process sum
        return [self.put_tree(np.float32(total), NamedSharding(s.role.mesh, P())) for s in stages]


def model_keys(parts, ranges) -> dict:
    """Every stage's logical parameter keys -> (shape, dtype), in the order `logical.to_logical` of the whole
    pipeline gives them (abstract: nothing is stacked or placed)."""
    import types

    from hxtrain.checkpoints import logical as _logical

    spec = lambda n: lambda a: jax.ShapeDtypeStruct((n, *a.shape), a.dtype)  # noqa: E731
    stages = []
    for i, (lo, hi) in enumerate(ranges):
        params = {"blocks": jax.tree.map(spec(hi - lo), parts.blocks[0])}
        if i == 0:
            params["embed"] = parts.embed
        if i == len(ranges) - 1:
            params["head"] = parts.head
        stages.append(types.SimpleNamespace(params=params))
    return _logical.key_shapes(types.SimpleNamespace(stages=stages, ranges=list(ranges)))


@dataclasses.dataclass
class LocalSite:
    """This process's site: its stages (index -> StageState), their task order and the shared data stream."""

    topology: Any
    index: int
    site: Any
    mesh: Mesh
    stages: dict[int, StageState]
    n_stages: int
    order: tuple
    microbatches: int
    batch_size: int
    seq: int
    width: int
    optimizer_config: OptimizerConfig
    batches: Any
    optimizer: _NetOptimizer | None = None
    put: Any = _put  # put(host, stage, spec): host data onto a stage's site (`executor.run_step`'s `put`)
    put_tree: Any = _device_put_tree  # put_tree(values, shardings): the same for a tree or one value
    # what a checkpoint's meta records (`hxtrain.checkpoints.site`)
    ranges: tuple = ()  # (lo, hi) blocks of every stage, of all sites
    seed: int = 0
    schedule_name: str = ""
    model_name: str = ""
    model_config: Any = None
    rows: tuple = ()  # the rows of each batch this process reads: its own devices' shards (none: no stage needs them)
    eval_set: tuple = ()  # the fixed held-out batches of every evaluation, int32 [B, T+1] each (none: no eval)
    eval_order: tuple = ()  # this site's tasks of the forward-only table
    model_keys: dict | None = None  # the whole model's logical keys -> (shape, dtype), in `to_logical`'s order
    _zeros: dict | None = None  # the last step's accumulators, zeroed, for the next one

    @property
    def processes(self) -> int:
        return self.site.processes

    @classmethod
    def build(cls, topology, index: int, cfg) -> LocalSite:
        from hxtrain.training.trainer import build_model

        site = topology.sites[index]
        schedule = _schedules.get_schedule(cfg.schedule)
        n_sites = topology.n_sites
        n_stages = n_sites * getattr(schedule, "virtual", 1)
        model = build_model(cfg.model, seed=cfg.seed)  # every site builds the same initial model from the seed
        parts = _parts.split_model(model)
        ranges = _stages.stage_ranges(topology, parts.n_layers, n_stages, cfg.partition)
        mesh = site_mesh(site)
        multi = site.processes > 1
        put, put_tree = (_group.put_stage, _group.put_tree) if multi else (_put, _device_put_tree)
        stages = {i: _stages.place_stage(parts, i, ranges[i], n_stages, topology, mesh, put_tree)
                  for i in range(index, n_stages, n_sites)}
        seq = model.cfg.seq_len
        M, B = cfg.microbatches, cfg.batch_size
        _stages.check_batch(B, M, topology.sites, field="--batch-size")
        width = int(_stages.embed_output(parts, seq).shape[-1])
        opt = OptimizerConfig.for_steps(cfg.steps, cfg.learning_rate)  # as `hxtrain train` derives it
        corpus, held_out = _data.load_split(cfg.data, hold_out=cfg.eval_every > 0, max_bytes=8_000_000,
                                            model_vocab=model.cfg.vocab_size)  # the Trainer's corpus cap
        rows = rows_read(mesh, stages, M, B)
        batches = _data.batches(corpus, seq=seq, batch_size=B, seed=cfg.seed, rows=rows)
        order = schedule.site_orders(n_sites, M)[index]
        eval_set = () if held_out is None else \
            tuple(_data.eval_batches(held_out, seq=seq, batch_size=B, count=cfg.eval_batches))
        eval_order = ForwardOnly(virtual=getattr(schedule, "virtual", 1)).site_orders(n_sites, M)[index]
        return cls(topology, index, site, mesh, stages, n_stages, order, M, B, seq, width, opt, batches,
                   put=put, put_tree=put_tree, ranges=tuple(ranges), seed=cfg.seed, schedule_name=schedule.name,
                   model_name=type(model).__name__, model_config=model.cfg, rows=rows, eval_set=eval_set,
                   eval_order=eval_order if eval_set else (), model_keys=model_keys(parts, ranges))

    def describe(self) -> str:
        dev = self.mesh.devices.flat[0]
        cap = _backends.capability_for(dev.device_kind)
        policy = _backends.dtype_policy(cap, self.site.compute_dtype)
        stages = ", ".join(f"stage {i}" + (" (embed)" if s.role.first else "") + (" (head)" if s.role.last else "")
                           for i, s in self.stages.items())
        procs = f", process {jax.process_index()} of {self.processes}" if self.processes > 1 else ""
        return (f"site {self.site.name!r}: {self.site.backend} {dev.device_kind} x {self.mesh.devices.size} "
                f"(data {self.site.data} x tensor {self.site.tensor}{procs}), pid {__import__('os').getpid()}; "
                f"dtype policy: params {policy.param_dtype}, compute {policy.compute_dtype}, "
                f"wire {policy.wire_dtype}; runs {stages}; reads {len(self.rows)} of {self.batch_size} rows per step")

    def describe_client(self) -> str:
        """The PJRT client the site's devices belong to, e.g. 'platform cpu, version PJRT C API, 4 x cpu'."""
        return _backends.client_summary(self.mesh.devices.flat[0].client)

    def max_frame_bytes(self) -> int:
        """Largest frame body this site accepts: one fp32 activation [mb, T, D] with room to spare."""
        mb = self.batch_size // self.microbatches
        return 2 * mb * self.seq * self.width * 4 + (1 << 16)

    def transport(self, endpoints, overlap: bool = True):
        """The site's transport: a NetTransport over `endpoints`; for a site of several processes a
        `GroupTransport` around it on process 0 (the only one with endpoints) and around nothing elsewhere.
        overlap=False makes sends synchronous (for side-by-side measurement; see `NetTransport`)."""
        names = [s.name for s in self.topology.sites]
        multi = self.processes > 1
        t = None
        if not multi or jax.process_index() == 0:
            mesh = _group.leader_mesh(self.mesh) if multi else self.mesh
            t = NetTransport(self.index, self.topology.n_sites, mesh, endpoints, codecs=link_codecs(self.topology),
                             names=names, overlap=overlap, expect=self.expected)
        elif endpoints:
            raise ValueError(f"site {self.site.name!r} process {jax.process_index()}: only process 0 links to "
                             f"other sites, got endpoints to {sorted(endpoints)}")
        if multi:
            t = _group.GroupTransport(t, self.index, self.site.name, self.mesh, self.arrival)
        self.optimizer = _NetOptimizer(self.optimizer_config, list(self.stages.values()), t, self.n_stages,
                                       self.put_tree)
        return t

    def stage_dtype(self, stage: int) -> np.dtype:
        """The compute dtype of stage `stage` (of any site): the dtype of the activations it sends."""
        site = self.topology.sites[stage % self.topology.n_sites]
        return np.dtype(_placement.site_compute_dtype(site, self.mesh if site is self.site else None))

    def arrival(self, key: tuple) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of what arrives under `key` = (kind, stage, microbatch): activations come in the
        previous stage's compute dtype, cotangents in this stage's (the dtype of the output they belong to)."""
        kind, stage, _ = key
        shape = (self.batch_size // self.microbatches, self.seq, self.width)
        return shape, self.stage_dtype(stage - 1 if kind == "act" else stage)

    def expected(self, key: tuple) -> tuple[tuple[int, ...], tuple[np.dtype, ...]]:
        """(shape, accepted dtypes) of what may arrive from another site under `key` (the NetTransport refuses
        anything else): `arrival`'s. An activation from a site whose compute dtype the topology does not pin (no
        `compute_dtype`, and a device kind it cannot tell from `device_kind` / `backend`, e.g. backend "cuda"
        alone) may come in any compute dtype: that site picks its dtype from devices only it sees."""
        shape, dtype = self.arrival(key)
        kind, stage, _ = key
        owner = self.topology.sites[(stage - 1 if kind == "act" else stage) % self.topology.n_sites]  # its dtype
        if owner is self.site or owner.compute_dtype is not None or \
                _backends.capability_for(owner.device_kind or owner.backend).known:
            return shape, (dtype,)
        return shape, tuple(np.dtype(d) for d in _backends.COMPUTE_DTYPES)

    def warm_up(self) -> None:
        """Run every program of this site on zeros, twice (updated params may come back with another layout and
        recompile), on copies of the real state. All compilation happens before the first step, so that the link
        timeout only has to cover compute."""
        mb = self.batch_size // self.microbatches
        toks = np.zeros((mb, self.seq), np.int32)
        opt = self.optimizer
        states = [(s.params, st) for s, st in zip(self.stages.values(), opt.states)]
        put = self.put
        split = any(t.kind == "W" for t in self.order)  # zero-bubble: B and W run their own programs
        for _ in range(2):
            new = []
            for s, (params, state) in zip(self.stages.values(), states):
                act = np.zeros(*self.arrival(("act", s.index, 0)))  # this stage's input
                dy = np.zeros(*self.arrival(("cot", s.index, 0)))  # the cotangent of its output
                if split:
                    warm_up_split(s, params, put, act, dy, toks)
                x = put(toks if s.role.first else act, s)
                if s.role.first or s.role.last:  # the step's tokens, sliced on the site
                    batch = np.zeros((self.microbatches, mb, self.seq + 1), np.int32)
                    _stage.microbatches(s.role, put(batch, s, P(None, _placement.DATA)))
                gacc = _stage.zeros_accumulator(s.params, s.shardings, s.data)
                one = put(np.float32(1.0), s, P())
                if s.role.first and s.role.last:  # the whole model on this site: the step's one fused program
                    whole = np.zeros((self.microbatches, mb, self.seq + 1), np.int32)
                    batch = put(whole, s, P(None, _placement.DATA))
                    gacc, _ = _stage.whole_step(s.role, params, batch, gacc, self._lacc(s), one)
                    if self.eval_set:
                        _stage.whole_loss(s.role, params, batch, self._lacc(s), one)
                elif s.role.last:
                    _, gacc, _ = _stage.last_step(s.role, params, x, put(toks, s), gacc, self._lacc(s), one)
                    if self.eval_set:
                        _stage.last_loss(s.role, params, x, put(toks, s), self._lacc(s), one)
                else:
                    _stage.forward(s.role, params, x)
                    _, gacc = _stage.backward(s.role, params, x, put(dy, s), gacc)
                g, sq, _ = _stage.reduce(gacc)
                copy = jax.tree.map(jnp.copy, (params, state))  # apply donates its inputs
                new.append(opt.apply(*copy, g, self.put_tree(np.float32(float(sq)),
                                                               NamedSharding(s.role.mesh, P()))))
            states = jax.block_until_ready(new)
        if isinstance(opt.transport, _group.GroupTransport):
            opt.transport.warm_up(("act", 0, 0))

    def _lacc(self, s):
        return self.put(np.zeros((s.data,), np.float32), s)

    def evaluate(self, transport) -> float | None:
        """The held-out loss, the mean over `eval_set` of each batch's loss through the forward-only table (every
        site takes part); None on a site without the last stage, which has no loss to give."""
        losses = []
        for batch in self.eval_set:
            tokens = batch.reshape(self.microbatches, self.batch_size // self.microbatches, batch.shape[-1])
            out = run_step(self.stages, self.eval_order, tokens, transport, n_sites=self.topology.n_sites,
                           n_stages=self.n_stages, last_data=self._last_data(), put=self.put, forward_only=True)
            loss = _executor.finish_eval(list(self.stages.values()), out)
            if loss is not None:
                losses.append(float(loss))
        return float(np.mean(losses)) if losses else None

    def _last_data(self) -> int:
        return self.topology.sites[(self.n_stages - 1) % self.topology.n_sites].data

    def next_batch(self) -> np.ndarray:
        """int32 [M, mb, T+1]: the step's batch as `Pipeline` splits it (the same seeded stream on every site),
        with only this process's `rows` read; the others stay -1 (`put` never places them on this process)."""
        tokens = np.full((self.batch_size, self.seq + 1), -1, np.int32)
        tokens[list(self.rows)] = next(self.batches)
        return tokens.reshape(self.microbatches, self.batch_size // self.microbatches, self.seq + 1)

    def train_step(self, tokens: np.ndarray, transport: NetTransport, record=None):
        """One step of this site's part of the schedule, then the optimizer. Returns (loss or None, grad norm).
        `record`: called with each of the step's `Event`s (its tasks and transfers, timed) once it is done."""
        n_sites = self.topology.n_sites
        zeros, self._zeros = self._zeros, None  # donated by the step: gone if it fails
        out = run_step(self.stages, self.order, tokens, transport, n_sites=n_sites, n_stages=self.n_stages,
                       last_data=self._last_data(), put=self.put, zeros=zeros, record=record)
        stages = list(self.stages.values())
        loss, grads, sqs, self._zeros = _executor.finish_step(stages, out)
        params, norm = self.optimizer.step(stages, grads, sqs)
        self.set_params(params)
        return loss, norm

    def read_rows(self, batch_size: int, first: int) -> None:
        """A DiLoCo replica whose share was dealt again: from the next step it trains on `batch_size` rows of every
        global batch, from row `first` on (this process's shards of them); the data stream keeps its place."""
        _stages.check_batch(batch_size, self.microbatches, (self.site,), field="--batch-size")
        self.batch_size = batch_size
        self.rows = rows_read(self.mesh, self.stages, self.microbatches, batch_size)
        self.batches.read_rows([first + r for r in self.rows])

    def set_params(self, params: list[dict]) -> None:
        """Swap in new params for this site's stages, in stage order."""
        self.stages = dict(zip(self.stages, _stages.with_params(list(self.stages.values()), params)))

    def load(self, params: list[dict], states: list, data: dict) -> None:
        """A restored checkpoint: params and optimizer states of this site's stages, and the data position."""
        self.set_params(params)
        self.optimizer.load_states(states)
        self.batches.set_state(data)
