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

Not yet here (said so where asked for): site processes (`hxtrain launch`), checkpoints, and the planner's model.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

from hxtrain.checkpoints import logical as _logical
from hxtrain.config.topology import Diloco, Topology, load_topology
from hxtrain.core import placement as _placement
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from hxtrain.engine.pipeline import Pipeline
from hxtrain.links import codecs as _codecs
from hxtrain.training import data as _data

__all__ = ["DilocoTrainer", "fragment_keys", "sync_offset", "replica_batches"]


def fragment_keys(shapes: dict, fragments: int) -> list[tuple[str, ...]]:
    """The logical parameter keys (in model order, `logical.shapes`) cut into `fragments` contiguous groups of
    about equal bytes, each non-empty."""
    keys = list(shapes)
    if not 1 <= fragments <= len(keys):
        raise ValueError(f"fragments: expected 1..{len(keys)} (the model's parameter arrays), got {fragments}")
    sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in shapes.values()]
    total, out, start, acc = sum(sizes), [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        left_keys, left_groups = len(keys) - i - 1, fragments - len(out) - 1
        if len(out) < fragments - 1 and (acc >= total * (len(out) + 1) / fragments or left_keys == left_groups):
            out.append(tuple(keys[start:i + 1]))
            start = i + 1
    out.append(tuple(keys[start:]))
    return out


def sync_offset(fragment: int, fragments: int, sync_every: int) -> int:
    """The first inner step at which `fragment` syncs; it syncs again every `sync_every` steps after that."""
    return ((fragment + 1) * sync_every) // fragments


def replica_batches(batch_size: int, shares) -> list[int]:
    """Rows of a global batch per replica, proportional to `shares` (largest remainders first), summing to
    `batch_size`; ValueError when a replica would get none."""
    w = np.asarray(shares, np.float64) / float(np.sum(shares))
    raw = w * batch_size
    out = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - out), kind="stable")[: batch_size - int(out.sum())]:
        out[i] += 1
    if (out < 1).any():
        raise ValueError(f"--batch-size {batch_size}: shares {list(shares)} leave replica {int(np.argmin(out))} "
                         "no rows; raise the batch or its share")
    return [int(x) for x in out]


def _flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def _nested(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *path, last = key.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


@dataclasses.dataclass
class Replica:
    """One replica: its sites' pipeline, its inner optimizer, and which rows of the global batch it reads."""

    name: str
    pipeline: Pipeline
    optimizer: SiteOptimizer
    rows: slice

    def params(self) -> dict[str, np.ndarray]:
        """This replica's params, host copies keyed by logical path."""
        return _flat(jax.device_get(_logical.to_logical(self.pipeline)["params"]))

    def set_params(self, flat: dict[str, np.ndarray]) -> None:
        pipe = self.pipeline
        pipe.set_params(_logical.to_stages(pipe, _nested(flat), [s.params for s in pipe.stages]))


class DilocoTrainer:
    """DiLoCo over the replicas of a topology, every replica pipelined over its own sites, all in this process."""

    def __init__(self, model, topology: Topology | str | os.PathLike = "local", *, diloco: Diloco | None = None,
                 schedule="1f1b", microbatches: int = 8, partition=None, batch_size: int = 32,
                 seq: int | None = None, optimizer: OptimizerConfig | None = None, data=None, seed: int = 0,
                 max_corpus_bytes: int | None = 8_000_000, out=None):
        topo = topology if isinstance(topology, Topology) else load_topology(topology)
        self.diloco = cfg = diloco or topo.diloco or Diloco()
        from hxtrain.config.checks import check_diloco

        check_diloco(topo.source, cfg, [s.name for s in topo.sites])
        groups = cfg.groups(topo)
        sizes = replica_batches(batch_size, cfg.shares or [1] * len(groups))
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
        shapes = _logical.shapes(self.replicas[0].pipeline)
        self.fragments = fragment_keys(shapes, cfg.fragments)
        self.global_params = self.replicas[0].params()  # every replica starts from the same model
        self.momentum = {k: np.zeros_like(v) for k, v in self.global_params.items()}
        self.codec = _codecs.get_codec(cfg.codec)
        self.tokens = [0] * len(self.replicas)  # tokens each replica processed, in all
        self._since = [[0] * len(self.replicas) for _ in self.fragments]  # per fragment, since its last sync
        self._pending: list[tuple[int, int, dict]] = []  # (apply at step, fragment, new global params)
        self.outer_steps = 0
        self.step = 0
        self.corpus = _data.load_corpus(data, max_bytes=max_corpus_bytes)
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=batch_size, seed=seed)

    # ---- one inner step, and the syncs due after it ---------------------------------------------------------

    def train_step(self, tokens) -> dict:
        """Every replica's inner step on its rows of `tokens`, then the fragment syncs due at this step. Returns
        loss (token-weighted over replicas), grad_norm (the largest replica's), sync_bytes (pseudo-gradient bytes
        every replica sent this step, in all) and each replica's tokens so far."""
        tokens = np.asarray(tokens)
        losses, norms = [], []
        for r, rep in enumerate(self.replicas):
            part = tokens[rep.rows]
            loss, grads, sqs = rep.pipeline.grads(part)
            params, norm = rep.optimizer.step(rep.pipeline.stages, grads, sqs)
            rep.pipeline.set_params(params)
            losses.append(loss)
            norms.append(norm)
            n = part.shape[0] * self.seq
            self.tokens[r] += n
            for since in self._since:
                since[r] += n
        self.step += 1
        sent = self._sync_due(self.step)
        weights = [rep.rows.stop - rep.rows.start for rep in self.replicas]
        loss = sum(w * float(x) for w, x in zip(weights, losses)) / sum(weights)
        return {"loss": loss, "grad_norm": max(float(x) for x in norms), "sync_bytes": sent,
                "outer_step": self.outer_steps,
                "replica_tokens": {rep.name: t for rep, t in zip(self.replicas, self.tokens)}}

    def _sync_due(self, step: int) -> int:
        cfg, sent = self.diloco, 0
        due = [f for f in range(len(self.fragments)) if step >= sync_offset(f, len(self.fragments), cfg.sync_every)
               and (step - sync_offset(f, len(self.fragments), cfg.sync_every)) % cfg.sync_every == 0]
        local = [rep.params() for rep in self.replicas] if due or self._pending else None
        for f in due:
            new, nbytes = self._outer_step(f, local)
            sent += nbytes
            self._pending.append((step + cfg.overlap, f, new))
            if f == len(self.fragments) - 1:
                self.outer_steps += 1
        ready = [p for p in self._pending if p[0] <= step]
        if ready:
            self._pending = [p for p in self._pending if p[0] > step]
            for _, _, new in ready:
                self.global_params.update(new)
            for rep, mine in zip(self.replicas, local):
                for _, _, new in ready:
                    for k, g in new.items():
                        mine[k] = g if cfg.mix == 0 else (cfg.mix * mine[k] + (1 - cfg.mix) * g).astype(g.dtype)
                rep.set_params(mine)
        return sent

    def _outer_step(self, f: int, local: list[dict]) -> tuple[dict, int]:
        """Fragment f's new global params from every replica's pseudo-gradient; and the bytes each replica sent
        (its encoded delta to every other replica), summed over replicas."""
        cfg, codec, R = self.diloco, self.codec, len(self.replicas)
        weights = np.asarray(self._since[f], np.float64)
        weights = (weights / weights.sum()).astype(np.float32)
        self._since[f] = [0] * R
        new, nbytes = {}, 0
        for k in self.fragments[f]:
            g = self.global_params[k]
            avg = np.zeros_like(g)
            for r in range(R):  # in replica order: the same sum on every replica
                delta = g - local[r][k]
                if codec.name != "none":
                    delta = codec.decode(codec.encode(delta), delta.shape, delta.dtype)
                nbytes += codec.wire_bytes(delta.shape, delta.dtype) * (R - 1)
                avg += weights[r] * delta
            m = self.momentum[k] = (np.float32(cfg.outer_momentum) * self.momentum[k] + avg).astype(g.dtype)
            step = avg + np.float32(cfg.outer_momentum) * m if cfg.outer_momentum else avg
            new[k] = (g - np.float32(cfg.outer_lr) * step).astype(g.dtype)
        return new, nbytes

    # ---- the loop ---------------------------------------------------------------------------------------------

    def fit(self, steps: int, *, out=None, progress: bool = True, log_every: int = 1) -> list[dict]:
        """Train `steps` inner steps through the one training loop (metrics JSONL + TensorBoard, progress, the NaN
        stop); rows carry outer_step, sync_bytes and replica_tokens besides the usual fields."""
        from hxtrain.training.loop import fit_steps

        return fit_steps(_DilocoSteps(self), first=self.step + 1, count=steps,
                         out=out if out is not None else self.out, progress=progress, log_every=log_every,
                         postfix=lambda row: {"outer": row["outer_step"]})

    def describe(self) -> str:
        cfg = self.diloco
        lines = [f"diloco: {len(self.replicas)} replicas, sync every {cfg.sync_every} steps, outer lr "
                 f"{cfg.outer_lr} momentum {cfg.outer_momentum} (Nesterov), {len(self.fragments)} fragment(s), "
                 f"overlap {cfg.overlap}, codec {cfg.codec}; not the same optimisation as synchronous training"]
        for rep in self.replicas:
            lines.append(f"  replica {rep.name}: rows {rep.rows.start}..{rep.rows.stop - 1} of each batch; "
                         + rep.pipeline.describe().replace("\n", "\n    "))
        return "\n".join(lines)


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
