"""`Pipeline`: a Flax NNX model split into stages, placed on the sites of a topology, run by a schedule table.

    topology = hxtrain.load_topology("meshes/local.toml")
    pipe = hxtrain.Pipeline(model, topology, schedule="1f1b", microbatches=8, partition=None)
    loss, grads = pipe.loss_and_grads(tokens)   # tokens int32 [B, T+1]; grads shaped like nnx.state(model, nnx.Param)
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hxtrain.engine import executor as _executor
from hxtrain.core import parts as _parts
from hxtrain.core import placement as _placement
from hxtrain.schedules import tables as _schedules
from hxtrain.schedules.forward import ForwardOnly
from hxtrain.core import stages as _stages
from hxtrain.config.topology import Topology, load_topology
from hxtrain.engine.transport import InProcessTransport, link_codecs


class Pipeline:
    """The model's parameters live here, split by stage, each on its own site's mesh.

    Args:
      model: an NNX model following the protocol in `hxtrain.core.parts` (embed / blocks / head).
      topology: a `Topology` or a path / shipped name ("local").
      schedule: "gpipe", "1f1b", ... or a `Schedule` object.
      microbatches: M; the batch must be a multiple of M, and each microbatch a multiple of every site's `data`.
      partition: blocks per stage (uneven allowed, e.g. [5, 3]), or None: the topology's `layers` shares if it
        gives them, else an even split.
      fuse: g microbatches per stage program (default 1): the schedule runs over M / g units, each task computing
        its g microbatches one after the other in one program. The same loss and grads and the same activation
        memory per microbatch, g times fewer programs and transfers per step, a fill and drain g times longer:
        for dispatch-bound steps (small models, CPUs). Not with split-backward schedules (ZB-H1).
    """

    def __init__(self, model, topology: Topology | str | os.PathLike = "local", schedule: Any = "1f1b",
                 microbatches: int = 8, partition=None, *, transport=None, fuse: int = 1):
        self.topology = topology if isinstance(topology, Topology) else load_topology(topology)
        self.schedule = _schedules.get_schedule(schedule) if isinstance(schedule, str) else schedule
        if not isinstance(microbatches, int) or isinstance(microbatches, bool) or microbatches < 1:
            raise ValueError(f"microbatches: expected a whole number >= 1, got {microbatches!r}")
        self.microbatches = microbatches
        if not isinstance(fuse, int) or isinstance(fuse, bool) or fuse < 1 or microbatches % fuse:
            raise ValueError(f"fuse: expected a whole number >= 1 that divides microbatches ({microbatches}), got "
                             f"{fuse!r}")
        if fuse > 1 and self.schedule.split_backward:
            raise ValueError(f"fuse: {fuse} microbatches per program is not built for the split backward of "
                             f"schedule {self.schedule.name!r}; use fuse=1 or another schedule")
        self.fuse = fuse
        self._model = model
        self.parts = _parts.split_model(model)
        n_sites = self.topology.n_sites
        n_stages = n_sites * getattr(self.schedule, "virtual", 1)
        self.ranges = _stages.stage_ranges(self.topology, self.parts.n_layers, n_stages, partition)
        self.meshes = _placement.site_meshes(self.topology)
        if transport is None:  # boundary compression as the topology's links ask (default "none")
            transport = InProcessTransport(self.meshes, codecs=link_codecs(self.topology))
        self.transport = transport
        self.tasks = tuple(self.schedule.tasks(n_sites, microbatches // fuse))  # units of `fuse` microbatches
        # Evaluation walks the same stages with a forward-only table (no backward, nothing held).
        self.eval_tasks = tuple(ForwardOnly(virtual=getattr(self.schedule, "virtual", 1))
                                .tasks(n_sites, microbatches))
        self.stages = [_stages.place_stage(self.parts, i, r, len(self.ranges), self.topology,
                                           self.meshes[i % n_sites], _copied_onto)
                       for i, r in enumerate(self.ranges)]
        self.last_step_stats: _executor.StepStats | None = None  # set by every step
        self._zeros: dict | None = None  # the last step's accumulators, zeroed, for the next one

    # ---- one step ----------------------------------------------------------------------------------------------

    def _check_tokens(self, tokens) -> np.ndarray:
        return _stages.split_batch(tokens, self.microbatches, self.topology.sites)

    def grads(self, tokens, *, poison: bool = False, record=None, timeline: bool = False):
        """Run the schedule over one batch. Returns (loss, per-stage grads, per-stage squared norms), on device.

        `timeline=True` records the step's per-task and per-transfer `Event`s into `last_step_stats.events`
        (`record`, a callable, also gets each one); recording makes the step a little slower. Always:
        `last_step_stats.peak_held[site]`, the most stage inputs that site held at once."""
        batch = self._check_tokens(tokens)
        width = int(_stages.embed_output(self.parts, batch.shape[2] - 1).shape[-1]) if poison else 0
        zeros, self._zeros = self._zeros, None  # donated by the step: gone if it fails
        out = _executor.run_step(self.stages, self.tasks, batch, self.transport, poison=poison, record=record,
                                 timeline=timeline, width=width, zeros=zeros, group=self.fuse)
        self.last_step_stats = out.stats
        loss, grads, sqs, self._zeros = _executor.finish_step(self.stages, out)
        return loss, grads, sqs

    def eval_loss(self, tokens, *, poison: bool = False):
        """The mean next-token loss of `tokens` (int32 [B, T+1]) through the pipeline's forward only: no gradient,
        no stage input held. A device scalar; equal to the single-device reference loss."""
        batch = self._check_tokens(tokens)
        width = int(_stages.embed_output(self.parts, batch.shape[2] - 1).shape[-1]) if poison else 0
        out = _executor.run_step(self.stages, self.eval_tasks, batch, self.transport, poison=poison, width=width,
                                 forward_only=True)
        return _executor.finish_eval(self.stages, out)

    def set_params(self, params: list[dict]) -> None:
        """Swap in new params, one tree per stage, each on its stage's site (the optimizer's result, or a restored
        checkpoint's)."""
        self.stages = _stages.with_params(self.stages, params)

    def loss_and_grads(self, tokens, *, poison: bool = False):
        """(loss, grads): the mean next-token loss of the batch and its gradient, as an `nnx.State` shaped like
        `nnx.state(model, nnx.Param)`. Equal to `nnx.value_and_grad(loss)(model, tokens)` on one device."""
        loss, grads, _ = self.grads(tokens, poison=poison)
        return loss, self.as_state(grads)

    # ---- views -------------------------------------------------------------------------------------------------

    def as_state(self, per_stage: list[dict]) -> nnx.State:
        """Per-stage trees (params or grads) -> one nnx.State shaped like nnx.state(model, nnx.Param)."""
        blocks = []
        for tree, (lo, hi) in zip(per_stage, self.ranges):
            blocks += [jax.tree.map(lambda a, i=i: a[i], tree["blocks"]) for i in range(hi - lo)]
        return _parts.as_model_state(self._model, per_stage[0]["embed"], blocks, per_stage[-1]["head"])

    def params_state(self) -> nnx.State:
        return self.as_state([s.params for s in self.stages])

    def trained_model(self, device=None):
        """A model like the one the pipeline was built from, holding its current parameters on `device` (default:
        JAX's first device), for what runs on one device (sampling); see `core.parts.with_params`."""
        return _parts.with_params(self._model, self.params_state(), device)

    def analytic_bubble(self) -> float | None:
        """The schedule's idle fraction by formula (`schedules.analytic_bubble`, over its units of `fuse`
        microbatches); None for a user table."""
        try:
            return _schedules.analytic_bubble(self.schedule, self.topology.n_sites, self.microbatches // self.fuse)
        except _schedules.ScheduleError:
            return None

    def site_names(self) -> list[str]:
        return [s.name for s in self.topology.sites]

    def write_timeline(self, path: str | os.PathLike, stats: _executor.StepStats | None = None) -> dict:
        """Write a recorded step (default: the last, run with `timeline=True`) as Chrome-trace JSON (Perfetto,
        chrome://tracing). Returns the written object."""
        from hxtrain.schedules.timeline import to_chrome_trace

        stats = stats or self.last_step_stats
        if stats is None or not stats.events:
            raise ValueError("write_timeline: no recorded step; run pipe.grads(tokens, timeline=True) first")
        meta = {"schedule": self.schedule.name, "microbatches": self.microbatches, "fuse": self.fuse,
                "topology": self.topology.name,
                "analytic_bubble": self.analytic_bubble(), "peak_held": list(stats.peak_held)}
        return to_chrome_trace(stats.events, path, site_names=self.site_names(), metadata=meta)

    def timeline_summary(self, stats: _executor.StepStats | None = None) -> str:
        """Per-site busy / idle % of a recorded step next to the schedule's analytic bubble."""
        from hxtrain.schedules.timeline import format_summary

        stats = stats or self.last_step_stats
        if stats is None or not stats.events:
            raise ValueError("timeline_summary: no recorded step; run pipe.grads(tokens, timeline=True) first")
        return format_summary(stats.events, self.topology.n_sites, site_names=self.site_names(),
                              analytic=self.analytic_bubble())

    def describe(self) -> str:
        from hxtrain.backends import site_client

        fused = f" ({self.fuse} per program)" if self.fuse > 1 else ""
        lines = [f"topology {self.topology.name!r} ({self.topology.source}), schedule {self.schedule.name}, "
                 f"{self.microbatches} microbatches{fused}"]
        for s, (lo, hi) in zip(self.stages, self.ranges):
            site = self.topology.sites[s.site]
            parts = (["embed"] if s.role.first else []) + [f"blocks[{lo}:{hi}]"] + (["head"] if s.role.last else [])
            devs = s.role.mesh.devices.flatten()
            client = site_client(site).name
            lines.append(f"  stage {s.index} -> site {site.name!r} ({site.backend}, client {client!r}, data {site.data} x tensor "
                         f"{site.tensor}, devices {[d.id for d in devs]}, compute {s.role.compute_dtype}): "
                         f"{' + '.join(parts)}")
        return "\n".join(lines)


def _copied_onto(params, shardings):
    # Copies, not aliases: the optimizer donates these buffers, and the caller's model must survive training.
    return jax.tree.map(lambda a, s: jax.device_put(jnp.array(a, copy=True), s), params, shardings)
