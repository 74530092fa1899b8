"""`--strategy diloco`: replicas that train the whole model apart and agree every H steps (DiLoCo, Streaming DiLoCo).

    cfg = Diloco(replicas=(("s0", "s1"), ("s2", "s3")), sync_every=50)   # 2 replicas x 2 pipeline stages
    run = DilocoTrainer(model, "local-4site", diloco=cfg, batch_size=32)
    history = run.fit(steps=200)

A replica is a group of sites that pipelines the model among themselves with the one engine (`Pipeline`, on the
devices its sites have in the whole topology); its inner optimizer (AdamW) and its state stay local. Replica r
reads rows [offset_r, offset_r + b_r) of every global batch, b_r following its `shares`. Every step each replica
takes an inner step. Parameters are split into `fragments` contiguous groups of about equal bytes (one group:
plain DiLoCo); fragment f syncs at inner steps ((f + 1) * H) // F + k * H, so every parameter syncs exactly once
per H steps and the peak bytes of a sync fall by F. At a sync every replica sends its pseudo-gradient
delta_r = (the fragment's global params) - (its own), through the fragment's codec (the bytes counted as sent to
each other replica); all replicas average the decoded deltas weighted by the tokens each processed since the
fragment's last sync, and take the same outer Nesterov step. The result is applied `overlap` inner steps later,
keeping a `mix` share of the replica's own params then (0: the replicas hold bit-identical global params).

The outer step runs on the host in numpy float32, in replica order, so that replicas on different brands of device
would compute bit-identical global params; it is DiLoCo's own rule (momentum m <- mu m + delta; params <- params -
lr (delta + mu m)), optax.sgd(nesterov=True)'s arithmetic. DiLoCo is not the same optimisation as synchronous
training: with H = 1, outer SGD at lr 1 and inner SGD it is (tests/test_diloco.py), otherwise it is its own method.

"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import types

import jax
import numpy as np

from hxtrain.checkpoints import logical as _logical
from hxtrain.config.topology import Diloco, Topology, load_topology
from hxtrain.core import placement as _placement
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from hxtrain.engine.pipeline import Pipeline
from hxtrain.data import loader as _data
from hxtrain.training.outer import OuterSync, flat, nested

__all__ = ["DilocoTrainer", "Replica", "replica_batches"]


def replica_shares(topology, d, model_cfg, batch_size: int) -> tuple[list[float], str]:
    """(each replica's share of the global batch, how it was chosen): `d.shares` as given, equal when None, or,
    for "planned", each replica's tokens/s as the planner predicts it for the whole batch on that replica's sites
    alone (its cost model and the sites' capabilities), so that a faster replica reads more rows and the replicas
    reach each sync together; "planned:FILE" does the same with the block times that `hxtrain profile --out FILE`
    measured on the sites it profiled (the others estimated). Deterministic (no time budget; the profile is read,
    not measured): every replica process computes the same shares."""
    groups = d.groups(topology)
    if d.shares is None:
        return [1.0] * len(groups), "equal"
    if d.shares == "measured":  # equal until the replicas have run a round (`ShareMeter`)
        return [1.0] * len(groups), ("measured (equal until the first outer step, then each replica's rows per "
                                     "second of inner step)")
    if not isinstance(d.shares, str):
        return [float(x) for x in d.shares], "given"
    from hxtrain.planning.planner import PlanError, plan

    profiles, source = {}, ""
    if d.shares != "planned":
        from hxtrain.planning.profile import ProfileError, load_site_profiles

        path = d.shares[len("planned:"):]
        try:
            profiles = load_site_profiles(path, topology)
        except (OSError, ValueError, ProfileError) as e:
            raise ValueError(f"--shares {d.shares}: cannot read the profile: {e}") from None
        source = f" from the block times measured in {path}"
    rates = []
    for g in groups:
        try:
            p = plan(topology.only(g, "replicas"), model_cfg, global_batch=batch_size, time_budget_s=math.inf,
                     profiles={n: profiles[n] for n in g if n in profiles} or None, reorder=False)
        except PlanError as e:
            raise ValueError(f"--shares {d.shares}: replica {'+'.join(g)}: {e}") from None
        rates.append(p.predicted.tokens_per_s)
    how = ", ".join(f"{'+'.join(g)} {r:,.0f} tokens/s" for g, r in zip(groups, rates))
    return rates, f"planned{source} ({how})"


def replica_batches(batch_size: int, shares, units=None) -> list[int]:
    """Rows of a global batch per replica, proportional to `shares` (largest remainders first), summing to
    `batch_size`; `units[r]`: replica r's rows must be a multiple of it (its microbatches x data), default 1.
    ValueError when a replica would get none, or the units cannot add up to the batch."""
    units = [1] * len(shares) if units is None else [int(u) for u in units]
    w = np.asarray(shares, np.float64) / float(np.sum(shares))
    raw = w * batch_size
    out = [int(x) for x in np.floor(raw / units)]  # whole units, then one more unit at a time
    left = batch_size - sum(u * n for u, n in zip(units, out))
    while left > 0:
        fits = [r for r in range(len(units)) if units[r] <= left]
        if not fits:
            raise ValueError(f"--batch-size {batch_size}: replicas read rows in multiples of {units} (microbatches "
                             f"x data), which cannot add up to {batch_size}; use a batch that is a sum of them")
        r = max(fits, key=lambda r: (raw[r] - units[r] * out[r], -r))
        out[r] += 1
        left -= units[r]
    rows = [u * n for u, n in zip(units, out)]
    if min(rows) < 1:
        raise ValueError(f"--batch-size {batch_size}: shares {list(shares)} leave replica {rows.index(min(rows))} "
                         "no rows; raise the batch or its share")
    return rows


def replica_rows(topology, d, model_cfg, batch_size: int, microbatches: int) -> tuple[list[int], str]:
    """(rows of every global batch each replica reads, how its shares were chosen), in process and in every
    replica process alike. Planned shares (speeds, real numbers) are dealt in whole units of each replica's
    microbatches x data (the lcm of its sites' data), so every replica's rows split over its devices; shares given
    as numbers (or equal) are honoured row for row, and rows a replica cannot split are refused naming it."""
    shares, how = replica_shares(topology, d, model_cfg, batch_size)
    units = replica_units(topology, d, microbatches) if isinstance(d.shares, str) else None
    return replica_batches(batch_size, shares, units), how


class ShareMeter:
    """`shares = "measured"`: each replica's seconds per row of every inner step since the last deal; at every
    outer step (each `every` inner steps) the global batch is dealt again in proportion to the replicas' rows per
    second (the median step's, so a step that compiled for new rows does not count), in whole units
    (`replica_batches`), unless that would shorten the slowest replica's predicted step by less than `keep` (5%):
    rows that change cost a compile, so noise must not move them. The same arithmetic in one process and in every
    replica process (which exchange their figures first), so all replicas deal the same rows."""

    def __init__(self, batch_size: int, units, every: int, keep: float = 0.05):
        self.batch_size, self.units, self.every, self.keep = batch_size, list(units), every, keep
        self.samples: list[list[float]] = [[] for _ in self.units]

    def add(self, r: int, rows: int, seconds: float) -> None:
        self.samples[r].append(seconds / rows)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def per_row(self, r: int) -> float:
        """Replica r's median seconds per row since the last deal (0.0: no step measured)."""
        return float(np.median(self.samples[r])) if self.samples[r] else 0.0

    def deal(self, current, per_row=None) -> list[int]:
        """The rows of the next round per replica: `current` (the rows now) or, when it pays, the batch dealt by
        the replicas' rows per second; `per_row`: every replica's seconds per row (gathered from the processes;
        default this meter's own). Starts counting afresh."""
        per_row = [self.per_row(r) for r in range(len(self.units))] if per_row is None else list(per_row)
        self.samples = [[] for _ in self.units]
        current = [int(x) for x in current]
        if not all(t > 0 for t in per_row):
            return current  # a replica measured nothing: keep its rows
        new = replica_batches(self.batch_size, [1.0 / t for t in per_row], self.units)
        slowest = lambda rows: max(n * t for n, t in zip(rows, per_row))  # noqa: E731
        return new if slowest(new) < (1.0 - self.keep) * slowest(current) else current


def replica_units(topology, d, microbatches: int) -> list[int]:
    """Each replica's rows come in multiples of its microbatches x data (the lcm of its sites' data)."""
    by_name = {s.name: s for s in topology.sites}
    return [microbatches * math.lcm(*(by_name[n].data for n in g)) for g in d.groups(topology)]


@dataclasses.dataclass
class Replica:
    """One replica: its sites' pipeline, its inner optimizer, and which rows of the global batch it reads."""

    name: str
    pipeline: Pipeline
    optimizer: SiteOptimizer
    rows: slice

    def params(self) -> dict[str, np.ndarray]:
        """This replica's params, host copies keyed by logical path."""
        return flat(jax.device_get(_logical.to_logical(self.pipeline)["params"]))

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        pipe = self.pipeline
        pipe.set_params(_logical.to_stages(pipe, nested(params), [s.params for s in pipe.stages]))


def evaluate_global(pipeline, global_params: dict, losses) -> float | None:
    """The mean of `losses(pipeline)` (device scalars) with the replica's `pipeline` (a `Pipeline` or a site's
    `LocalSite`) holding the global params for the while; its own params are put back, also on failure. None
    when every loss is None (a site of a replica's pipeline without the last stage)."""
    stages = pipeline.stages if isinstance(pipeline.stages, list) else list(pipeline.stages.values())
    view = types.SimpleNamespace(stages=stages, ranges=[pipeline.ranges[s.index] for s in stages])
    kept = [s.params for s in stages]
    pipeline.set_params(_logical.to_stages(view, nested(global_params), kept))
    try:
        got = [float(x) for x in losses(pipeline) if x is not None]
        return float(np.mean(got)) if got else None
    finally:
        pipeline.set_params(kept)


class DilocoTrainer:
    """DiLoCo over the replicas of a topology, every replica pipelined over its own sites, all in this process."""

    def __init__(self, model, topology: Topology | str | os.PathLike = "local", *, diloco: Diloco | None = None,
                 schedule="1f1b", microbatches: int = 8, partition=None, batch_size: int = 32,
                 seq: int | None = None, optimizer: OptimizerConfig | None = None, data=None, seed: int = 0,
                 max_corpus_bytes: int | None = 8_000_000, out=None, save_every: int = 0, keep: int = 3,
                 resume: str = "auto", eval_batches: int = 0):
        """`out`: run folder (metrics.jsonl, TensorBoard events, checkpoints/): with it, the global and every
        replica's state are saved every `save_every` steps (0: only at the end of `fit`), the last `keep` kept, and
        `resume` ("never", "auto", "must") restores the newest step every folder sealed
        (`hxtrain.training.diloco_checkpoint`; `self.resumed_from` = its step or None). `eval_batches` >= 1 holds
        documents out, as `Trainer` does, and `evaluate` takes the global params' loss on that many fixed batches
        of replica 0's size."""
        topo = topology if isinstance(topology, Topology) else load_topology(topology)
        self.diloco = cfg = diloco or topo.diloco or Diloco()
        from hxtrain.config.checks import check_diloco

        check_diloco(topo.source, cfg, [s.name for s in topo.sites])
        groups = cfg.groups(topo)
        sizes, self.shares_from = replica_rows(topo, cfg, model.cfg, batch_size, microbatches)
        self.seq = seq or getattr(getattr(model, "cfg", None), "seq_len", None)
        if self.seq is None:
            raise ValueError("seq: the model has no cfg.seq_len; pass seq= explicitly")
        self.optimizer_config = optimizer or OptimizerConfig()
        self.replicas, start = [], 0
        for group, b in zip(groups, sizes):
            name = "+".join(group)
            pipe = Pipeline(model, _placement.sub_topology(topo, group), schedule=schedule,
                            microbatches=microbatches, partition=partition)
            try:
                pipe._check_tokens(np.zeros((b, self.seq + 1), np.int32))
            except ValueError as e:
                raise ValueError(f"replica {name}: its share of --batch-size {batch_size} is {b} rows: {e}") from None
            self.replicas.append(Replica(name, pipe, SiteOptimizer(self.optimizer_config, pipe.stages),
                                         slice(start, start + b)))
            start += b
        self.topology, self.batch_size, self.seed, self.out = topo, batch_size, seed, out
        self.model_id = (type(model).__name__, model.cfg)  # what a checkpoint's meta records
        self.outer = OuterSync(cfg, self.replicas[0].params(), len(self.replicas))  # all start from one model
        self.meter = ShareMeter(batch_size, replica_units(topo, cfg, microbatches), cfg.sync_every) \
            if cfg.shares == "measured" else None
        self.clock = time.perf_counter  # what the meter times inner steps with
        self.tokens = [0] * len(self.replicas)  # tokens each replica processed, in all
        self.step = 0
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)  # prepared tokens must fit the model
        self.corpus, held_out = _data.load_split(data, hold_out=eval_batches > 0, max_bytes=max_corpus_bytes,
                                                 model_vocab=vocab)
        self.eval_set = [] if held_out is None else _data.eval_batches(
            held_out, seq=self.seq, batch_size=sizes[0], count=eval_batches)
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=batch_size, seed=seed)
        self.checkpoints, self.resumed_from = None, None
        if out is not None:
            from pathlib import Path

            from hxtrain.training.diloco_checkpoint import DilocoCheckpoints

            self.checkpoints = DilocoCheckpoints(self, Path(out) / "checkpoints", save_every=save_every, keep=keep)
            self.resumed_from = self.checkpoints.resume(resume)

    def restart_data(self, state: dict) -> None:
        """Continue the global batch stream at a restored position (and each replica's token count with it)."""
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=self.batch_size, seed=self.seed)
        self.batches.set_state(state)

    # ---- one inner step, and the syncs due after it ---------------------------------------------------------

    def train_step(self, tokens) -> dict:
        """Every replica's inner step on its rows of `tokens`, then the fragment syncs due at this step. Returns
        loss (token-weighted over replicas) and each replica's, grad_norm (the largest replica's), sync_bytes
        (pseudo-gradient bytes the replicas sent this step, in all: each its delta to every other), outer_step,
        each replica's rows this step and tokens so far. With measured shares, the rows are dealt again after
        every H-th step (`ShareMeter`)."""
        tokens = np.asarray(tokens)
        losses, norms = [], []
        for r, rep in enumerate(self.replicas):
            part = tokens[rep.rows]
            t0 = self.clock()
            loss, grads, sqs = rep.pipeline.grads(part)
            params, norm = rep.optimizer.step(rep.pipeline.stages, grads, sqs)
            rep.pipeline.set_params(params)
            losses.append(float(loss))
            norms.append(float(norm))
            if self.meter is not None:  # the replica's inner step, done (its loss and norm are on the host)
                self.meter.add(r, part.shape[0], self.clock() - t0)
            self.tokens[r] += part.shape[0] * self.seq
            self.outer.add_tokens(r, part.shape[0] * self.seq)
        self.step += 1
        sent = self._sync(self.step)
        weights = [rep.rows.stop - rep.rows.start for rep in self.replicas]  # the rows this step read
        if self.meter is not None and self.meter.due(self.step):
            self.set_rows(self.meter.deal(weights))
        return {"loss": sum(w * x for w, x in zip(weights, losses)) / sum(weights), "grad_norm": max(norms),
                "replica_rows": {rep.name: w for rep, w in zip(self.replicas, weights)},
                "replica_loss": {rep.name: x for rep, x in zip(self.replicas, losses)}, "sync_bytes": sent,
                "outer_step": self.outer.outer_steps,
                "replica_tokens": {rep.name: t for rep, t in zip(self.replicas, self.tokens)}}

    def set_rows(self, sizes, first: int = 0) -> None:
        """Each replica reads `sizes[r]` rows of every global batch from the next step on (in replica order)."""
        start = first
        for rep, b in zip(self.replicas, sizes):
            rep.rows = slice(start, start + int(b))
            start += int(b)

    def _sync(self, step: int) -> int:
        """The syncs due at `step` (every replica is here, so the exchange is a list); the bytes sent."""
        outer, R = self.outer, len(self.replicas)
        due = outer.due(step)
        if not due and not outer.pending:
            return 0
        local = [rep.params() for rep in self.replicas]
        sent = 0
        for f in due:
            deltas = [outer.delta(f, mine)[1] for mine in local]
            sent += outer.wire_bytes(f) * (R - 1) * R
            outer.combine(f, deltas, step)
        ready = outer.landed(step)
        if ready:
            for rep, mine in zip(self.replicas, local):
                outer.apply(mine, ready)
                rep.set_params(mine)
        return sent

    def evaluate(self) -> float:
        """The held-out loss of the global params (what an export of the run holds), through replica 0's
        pipeline forward only; the replica's own params are back in place afterwards."""
        if not self.eval_set:
            raise ValueError("eval_every: this DilocoTrainer holds no data out; build it with eval_batches >= 1")
        return evaluate_global(self.replicas[0].pipeline, self.global_params,
                               lambda pipe: [pipe.eval_loss(b) for b in self.eval_set])

    @property
    def global_params(self) -> dict[str, np.ndarray]:
        return self.outer.global_params

    @property
    def outer_steps(self) -> int:
        return self.outer.outer_steps

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self, steps: int, *, out=None, progress: bool = True, log_every: int = 1,
            eval_every: int = 0) -> list[dict]:
        """Train `steps` inner steps through the one training loop (metrics JSONL + TensorBoard, progress, the NaN
        stop); rows carry outer_step, sync_bytes and replica_tokens besides the usual fields. `eval_every` N >= 1:
        the global params' held-out loss (`evaluate`) after every N-th step and the last, as "eval_loss"."""
        from hxtrain.training.loop import fit_steps

        if eval_every and not self.eval_set:
            raise ValueError("eval_every: this DilocoTrainer holds no data out; build it with eval_batches >= 1 "
                             "(hxtrain train --eval-batches)")
        return fit_steps(_DilocoSteps(self), first=self.step + 1, count=steps,
                         out=out if out is not None else self.out, progress=progress, log_every=log_every,
                         saver=None if self.checkpoints is None else _DilocoSaver(self.checkpoints),
                         postfix=lambda row: {"outer": row["outer_step"]}, evaluate=self.evaluate,
                         eval_every=eval_every)

    def describe(self) -> str:
        cfg = self.diloco
        lines = [f"diloco: {len(self.replicas)} replicas, sync every {cfg.sync_every} steps, outer lr "
                 f"{cfg.outer_lr} momentum {cfg.outer_momentum} (Nesterov), {len(self.outer.fragments)} fragment(s), "
                 f"overlap {cfg.overlap}, codec {cfg.codec}, shares {self.shares_from}; not the same optimisation "
                 "as synchronous training"]
        for rep in self.replicas:
            lines.append(f"  replica {rep.name}: rows {rep.rows.start}..{rep.rows.stop - 1} of each batch; "
                         + rep.pipeline.describe().replace("\n", "\n    "))
        return "\n".join(lines)


class _DilocoSaver:
    """`training.loop.Saver` of a DilocoTrainer's checkpoints."""

    def __init__(self, checkpoints):
        self.checkpoints = checkpoints

    def save(self, step: int, *, force: bool = False):
        return self.checkpoints.save(step, force=force)

    def close(self, *, failed: bool) -> None:
        self.checkpoints.close()  # after a NaN too: seal what was saved before it


class _DilocoSteps:
    """`training.loop.Steps` of a DilocoTrainer."""

    def __init__(self, run: DilocoTrainer):
        self.run_ = run
        self.tokens_per_step = run.batch_size * run.seq
        self.learning_rate = run.replicas[0].optimizer.learning_rate

    def next_batch(self):
        return next(self.run_.batches)

    def run(self, batch, step: int) -> dict:
        return self.run_.train_step(batch)
