"""A DiLoCo replica as its own site process: `hxtrain site --strategy diloco` / `hxtrain launch --strategy diloco`.

Each site is one replica holding the whole model (a one-site topology of its own, `LocalSite` as for a pipeline
site); it reads its share of every global batch and takes inner steps with its own optimizer. Every H steps the two
replicas exchange their pseudo-gradients over the link between them (the run's mutual-TLS `Endpoint`), one
PSEUDO_GRADIENT frame per parameter through the codec, plus the tokens each processed, and each runs the same
`hxtrain.training.outer.OuterSync` on the same inputs in replica order, so both hold bit-identical global params, as
in one process (`hxtrain.training.diloco`). Every received delta is checked against the parameter's shape and dtype.

For now: two replicas of one site each, no checkpoints (said so, naming the setting, before anything starts).
"""

from __future__ import annotations

import dataclasses
import types

import jax
import numpy as np

from hxtrain.checkpoints import logical as _logical
from hxtrain.links.wire import Kind
from hxtrain.network.handshake import PeerError
from hxtrain.data import loader as _data
from hxtrain.training.diloco import evaluate_global
from hxtrain.training.outer import OuterSync, flat, nested

_TOKENS = 1 << 20  # the `microbatch` of the frame carrying a replica's token count (keys are numbered from 0)


def check(topology, cfg, error) -> object:
    """The run's `Diloco` for a site process; `error(message)` (the site's SiteError) for what it cannot run."""
    from hxtrain.training.diloco_run import resolve_diloco

    try:
        d = resolve_diloco(topology, cfg)
    except ValueError as e:
        raise error(str(e)) from None
    groups = d.groups(topology)
    if len(groups) != 2 or any(len(g) != 1 for g in groups):
        raise error(f"--strategy diloco in site processes: two replicas of one site each for now, got "
                    f"{['+'.join(g) for g in groups]}; run it in one process (hxtrain train --strategy diloco)")
    return d


def run(topology, index: int, cfg, d, endpoints: dict, log) -> list[dict]:
    """This site as a DiLoCo replica to the last step, through the site process's training loop."""
    from hxtrain.sites.steps import run_loop

    local = build(topology, index, cfg, d)
    log(local.describe())
    transport = local.transport({}, overlap=not cfg.sync_sends)  # the replica's own one-site pipeline
    steps = ReplicaSteps(local, transport, endpoints[1 - index], index, d, elastic=cfg.elastic, log=log)
    log(f"site {local.site.name!r}: diloco replica {index} of 2, rows {local.batches.rows[0]}.."
        f"{local.batches.rows[-1]} of each batch, sync every {d.sync_every} steps, codec {d.codec}")
    local.warm_up()
    steps.barrier(cfg.connect_timeout)
    log(f"site {local.site.name!r}: compiled; both replicas ready")
    return run_loop(local, transport, cfg, log, steps=steps)


def build(topology, index: int, cfg, d):
    """(LocalSite of this replica over a one-site topology, its rows): JAX is imported here."""
    from hxtrain.sites import program as _prog
    from hxtrain.training.diloco import replica_batches

    sizes = replica_batches(cfg.batch_size, [1, 1] if d.shares is None else d.shares)
    site = topology.sites[index]
    alone = dataclasses.replace(topology, name=f"{topology.name}[{site.name}]", sites=(site,), links=(), diloco=None)
    local = _prog.LocalSite.build(alone, 0, dataclasses.replace(cfg, batch_size=sizes[index]))
    first = sum(sizes[:index])  # the replica's rows of every global batch, as the in-process DilocoTrainer's
    corpus, _ = _data.load_split(cfg.data, hold_out=cfg.eval_every > 0, max_bytes=8_000_000,
                                 model_vocab=local.model_config.vocab_size)
    local.batches = _data.batches(corpus, seq=local.seq, batch_size=cfg.batch_size, seed=cfg.seed,
                                  rows=[first + r for r in local.rows])
    return local


class ReplicaSteps:
    """`training.loop.Steps` of a replica: its inner step, then the syncs due, exchanged with the other replica."""

    def __init__(self, local, transport, endpoint, index: int, d, *, elastic: bool = False, log=print):
        self.local, self.transport, self.ep, self.me, self.d = local, transport, endpoint, index, d
        self.elastic, self.log = elastic, log
        self.alone = False  # elastic: the other replica was lost, this one goes on by itself
        self.tokens_per_step = local.batch_size * local.seq
        self.learning_rate = local.optimizer.learning_rate
        self.view = types.SimpleNamespace(stages=list(local.stages.values()),
                                          ranges=[local.ranges[i] for i in local.stages])
        self.outer = OuterSync(d, self.params(), 2)
        biggest = max(v.nbytes for v in self.outer.global_params.values())
        endpoint.max_bytes = max(endpoint.max_bytes, 2 * biggest + (1 << 16))

    def params(self) -> dict:
        self.view.stages = list(self.local.stages.values())
        return flat(jax.device_get(_logical.to_logical(self.view)["params"]))

    def barrier(self, timeout: float) -> None:
        """Both replicas compiled and ready (one frame each way)."""
        self.ep.send(Kind.PSEUDO_GRADIENT, np.zeros(1, np.int64), step=0, microbatch=_TOKENS + 1)
        self.ep.recv(kind=Kind.PSEUDO_GRADIENT, step=0, microbatch=_TOKENS + 1, timeout=timeout)

    def next_batch(self):
        return self.local.next_batch()

    def evaluate(self) -> float | None:
        """Replica 0's held-out loss of the global params (both replicas hold the same ones), as the in-process
        `DilocoTrainer.evaluate`; None on replica 1."""
        if self.me != 0:
            return None
        return evaluate_global(self.local, self.outer.global_params,
                               lambda local: [local.evaluate(self.transport)])

    def run(self, batch, step: int) -> dict:
        t, outer = self.transport, self.outer
        t.reset_stats()
        t.step = step
        loss, norm = self.local.train_step(batch, t)
        outer.add_tokens(self.me, self.local.batch_size * self.local.seq)
        sent, due = 0, outer.due(step)
        if due or outer.pending:
            mine = self.params()
            for f in due:
                sent += self._exchange(f, mine, step)
            ready = outer.landed(step)
            if ready:
                outer.apply(mine, ready)
                self.local.set_params(_logical.to_stages(self.view, nested(mine),
                                                         [s.params for s in self.view.stages]))
        other = self.ep.peer
        return {"site": self.local.site.name, "loss": loss, "grad_norm": norm, "outer_step": outer.outer_steps,
                "sync_bytes": sent, "bytes_per_link": {f"{self.local.site.name}->{other}": sent},
                "payload_bytes_per_link": {}, "control_bytes": 0}

    def _exchange(self, f: int, mine: dict, step: int) -> int:
        outer = self.outer
        _, my_delta = outer.delta(f, mine)
        if not self.alone:
            try:
                return self._with_peer(f, mine, my_delta, step)
            except PeerError as e:
                if not self.elastic:
                    raise
                self.alone = True
                self.log(f"site {self.local.site.name!r}: lost replica {self.ep.peer!r} at step {step} ({e}); "
                         "continuing as the only replica (--elastic): the average is over this replica alone")
        outer.combine(f, [my_delta], step, [outer.since[f][self.me]])
        return 0

    def _with_peer(self, f: int, mine: dict, my_delta: dict, step: int) -> int:
        outer, ep, codec = self.outer, self.ep, self.d.codec
        keys = outer.fragments[f]
        sent = 0
        for j, k in enumerate(keys):  # the raw delta: the endpoint encodes it with the codec, as delta() did
            sent += ep.send(Kind.PSEUDO_GRADIENT, outer.global_params[k] - mine[k], step=step, stage=f,
                            microbatch=j, codec=codec)
        my_tokens = outer.since[f][self.me]
        sent += ep.send(Kind.PSEUDO_GRADIENT, np.array([my_tokens], np.int64), step=step, stage=f, microbatch=_TOKENS)
        theirs = {}
        for j, k in enumerate(keys):
            _, x = ep.recv(kind=Kind.PSEUDO_GRADIENT, step=step, stage=f, microbatch=j)
            want = outer.global_params[k]
            if x.shape != want.shape or x.dtype != want.dtype:
                ep.abort(f"bad pseudo-gradient from site {ep.peer!r}")
                raise PeerError(f"site {ep.peer!r} sent the pseudo-gradient of {k} (step {step}) as shape "
                                f"{x.shape} {x.dtype}, expected {want.shape} {want.dtype}")
            theirs[k] = x
        their_tokens = int(ep.recv(kind=Kind.PSEUDO_GRADIENT, step=step, stage=f, microbatch=_TOKENS)[1][0])
        deltas = [my_delta, theirs] if self.me == 0 else [theirs, my_delta]
        tokens = [my_tokens, their_tokens] if self.me == 0 else [their_tokens, my_tokens]
        outer.combine(f, deltas, step, tokens)
        return sent
