"""A DiLoCo replica as its own site process: `hxtrain site --strategy diloco` / `hxtrain launch --strategy diloco`.

A replica is one site holding the whole model, or a group of sites that pipeline it among themselves (the
topology's `[diloco] replicas`; `hxtrain.sites.replicas` places a site in its replica and checks what can run). A
site's `LocalSite` runs its replica's pipeline over the links inside the replica; the replica reads its share of
every global batch and takes inner steps with its own optimizer. Every H steps each site exchanges the
pseudo-gradients of the stages it holds with its counterpart, the site holding the same stages in the other replica
(the run's mutual-TLS `Endpoint`), one PSEUDO_GRADIENT frame per parameter through the codec, plus the tokens its
replica processed, and each runs the same `hxtrain.training.outer.OuterSync` on the same inputs in replica order, so
both hold bit-identical global params, as in one process (`hxtrain.training.diloco`). Every received delta is
checked against the parameter's shape and dtype.

Elastic (`--elastic`): a replica that loses the other goes on alone, and a `sites.relink.Relink` thread waits for it to come
back; a returning replica (`--rejoin`) takes the outer state at the survivor's next sync (`ReplicaSteps.take_state`).

Checkpoints (`--checkpoint-dir DIR --save-every N`): each replica saves, under DIR/<site>, what the in-process
DiLoCo run saves (`hxtrain.training.diloco_checkpoint`): the global params and the outer state, which both replicas
hold bit for bit, and its own params, inner optimizer state and data position (a site of a replica group: those of
the stages it holds). At start-up the sites send each other the steps complete in their folders and all restore
the newest one they share (`--resume`). Elastic: a survivor alone goes on saving; a returning replica restores
nothing (it takes the outer state from the survivor), sets aside the steps it left unsealed (and any from its return
on), and saves again from the next save step on, so a later resume finds the steps both folders hold.

Streaming fragments are the whole model's, each cut down to the keys a site holds, so a site of a replica group
syncs exactly what the in-process replica would.

For now: two replicas; for replicas of several sites, no --elastic (said so, naming the setting, before anything
starts).
"""

from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path

import jax
import numpy as np

from hxtrain.checkpoints import logical as _logical
from hxtrain.links.wire import Kind
from hxtrain.network.handshake import PeerError
from hxtrain.training.diloco import evaluate_global
from hxtrain.sites.replicas import build, place
from hxtrain.training.outer import OuterSync, flat, fragment_keys, nested

_TOKENS = 1 << 20  # the `microbatch` of the frame carrying a replica's token count (keys are numbered from 0)


def run(topology, index: int, cfg, d, endpoints: dict, log, relink=None) -> list[dict]:
    """This site as a DiLoCo replica to the last step, through the site process's training loop. `relink(timeout)`
    (elastic): a new Endpoint to the other replica when it is back, else None. With `cfg.rejoin` this replica
    returns to a run under way: it takes the outer state from the other replica and goes on from that step."""
    from hxtrain.sites.steps import run_loop

    local, how = build(topology, index, cfg, d)
    log(local.describe())
    g, j = place(topology, d, index)
    names = [s.name for s in topology.sites]
    counterpart = names.index(d.groups(topology)[1 - g][j])
    within = {local.topology.sites.index(local.topology.site(names[i])): ep  # the replica's own pipeline
              for i, ep in endpoints.items() if i != counterpart}
    for ep in within.values():
        ep.max_bytes = local.max_frame_bytes()
    transport = local.transport(within, overlap=not cfg.sync_sends)
    meter = None
    if d.shares == "measured":
        from hxtrain.training.diloco import ShareMeter, replica_units

        meter = ShareMeter(cfg.batch_size, replica_units(topology, d, cfg.microbatches), d.sync_every)
    steps = ReplicaSteps(local, transport, endpoints[counterpart], g, d, elastic=cfg.elastic, log=log,
                         relink=relink, meter=meter, links=within.values(), rounds=len(topology.sites))
    stage = f", stage {j + 1} of {local.topology.n_sites}" if local.topology.n_sites > 1 else ""
    log(f"site {local.site.name!r}: diloco replica {g} of 2{stage}, rows {local.batches.rows[0]}.."
        f"{local.batches.rows[-1]} of each batch (shares {how}), sync every {d.sync_every} steps, codec {d.codec}")
    local.warm_up()
    start, ckpt, complete = 0, None, None
    if cfg.checkpoint_dir:
        from hxtrain.training.diloco_checkpoint import DilocoCheckpoints

        ckpt = DilocoCheckpoints(_ProcessRun(local, steps, topology, d, cfg),
                                 Path(cfg.checkpoint_dir) / local.site.name, save_every=cfg.save_every, keep=cfg.keep)
        if not cfg.rejoin:  # a returning replica's folder holds its own steps from before it was lost
            if cfg.resume == "never":
                ckpt.refuse_existing()
            complete = ckpt.complete()  # before the barrier: verifying the sha256s may take a while
    if cfg.rejoin:
        start = steps.take_state(cfg.connect_timeout)
        log(f"site {local.site.name!r}: rejoined at step {start} with the global params of outer step "
            f"{steps.outer.outer_steps} (inner optimizer state fresh)")
        if ckpt is not None:  # it saves again from here; what it left unsealed when lost is set aside
            ckpt.set_aside_for_return(start)
    else:
        if within:
            transport.barrier(cfg.connect_timeout)  # the replica's pipeline: every stage compiled
        steps.barrier(cfg.connect_timeout)
        log(f"site {local.site.name!r}: compiled; both replicas ready")
    if complete is not None:
        step = steps.agree_step(complete, cfg.connect_timeout)
        if step is None and cfg.resume == "must":
            from hxtrain.checkpoints.checkpoint import CheckpointError

            raise CheckpointError(f"site {local.site.name!r}: --resume must, but no step is complete in both "
                                  f"replicas' folders under {cfg.checkpoint_dir} (this one: {complete})")
        if step is not None:
            ckpt.restore(step)
            start = step
            log(f"site {local.site.name!r}: resumed from step {step} ({ckpt.root / str(step)}), outer step "
                f"{steps.outer.outer_steps}")
    rows = run_loop(local, transport, cfg, log, start, ckpt, steps=steps)
    log(f"site {local.site.name!r}: global params after outer step {steps.outer.outer_steps}: sha256 "
        f"{steps.outer.digest()}")
    return rows


class _ReplicaView:
    """This replica's stages as a pipeline for `hxtrain.checkpoints.logical` (a one-site topology: stages 0..)."""

    def __init__(self, local):
        self.local = local
        self.schedule = types.SimpleNamespace(name=local.schedule_name)
        self.microbatches = local.microbatches

    @property
    def stages(self) -> list:
        # Renumbered from 0, so that a stage of a replica group saves its optax counters (`logical` keeps those of
        # stage 0 only), as `checkpoints.site.SiteCheckpoints._view` does; params do not depend on the index.
        return [dataclasses.replace(s, index=k) for k, s in enumerate(self.local.stages.values())]

    @property
    def ranges(self) -> list:
        return [self.local.ranges[i] for i in self.local.stages]

    def set_params(self, params: list) -> None:
        self.local.set_params(params)


class _ProcessReplica:
    """The one replica of a replica process, as `DilocoCheckpoints` reads it: its name, stages, optimizer and
    the rows of every global batch it reads now (measured shares deal them again)."""

    def __init__(self, local, view):
        self.local, self.name, self.pipeline, self.optimizer = local, local.site.name, view, local.optimizer

    @property
    def rows(self) -> slice:
        first = self.local.batches.rows[0] - self.local.rows[0]  # the replica's first row of the global batch
        return slice(first, first + self.local.batch_size)


class _ProcessRun:
    """What `DilocoCheckpoints` reads and restores of a run, as one replica process sees it: its own replica, the
    outer state it shares with the other, its data stream."""

    def __init__(self, local, steps, topology, d, cfg):
        self.local = local
        self.replicas = [_ProcessReplica(local, steps.view)]
        self.diloco, self.seed, self.topology, self.batch_size = d, cfg.seed, topology, cfg.batch_size
        self.seq, self.model_id, self.outer = local.seq, (local.model_name, local.model_config), steps.outer
        self.batches = local.batches
        self.step, self.tokens = 0, [0]

    def set_rows(self, sizes, first: int = 0) -> None:
        self.local.read_rows(int(sizes[0]), first)

    def restart_data(self, state: dict) -> None:
        self.batches.set_state(state)


class ReplicaSteps:
    """`training.loop.Steps` of a replica: its inner step, then the syncs due, exchanged with the other replica."""

    def __init__(self, local, transport, endpoint, index: int, d, *, elastic: bool = False, log=print,
                 relink=None, meter=None, links=(), rounds: int = 1):
        """`links`: the site's pipeline links inside its replica (a replica group); what every site must agree on
        (a checkpoint step, measured rows) then travels `rounds` times over all its links (>= the longest path
        between two sites)."""
        self.local, self.transport, self.ep, self.me, self.d = local, transport, endpoint, index, d
        self.links, self.rounds = list(links), rounds
        self.elastic, self.log, self.relink = elastic, log, relink
        self.meter = meter  # measured shares (`training.diloco.ShareMeter`): the rows are dealt again each round
        self.alone = False  # elastic: the other replica was lost, this one goes on by itself
        self.learning_rate = local.optimizer.learning_rate
        self.view = _ReplicaView(local)  # the replica's current stages, for `checkpoints.logical`
        mine = self.params()
        frags = None  # a stage of a replica group: the whole model's fragments, each cut down to this site's keys
        if local.model_keys is not None and local.model_keys.keys() != mine.keys():
            frags = [tuple(k for k in f if k in mine) for f in fragment_keys(local.model_keys, d.fragments)]
        self.outer = OuterSync(d, mine, 2, fragments=frags)
        biggest = max(v.nbytes for v in self.outer.global_params.values())
        endpoint.max_bytes = max(endpoint.max_bytes, 2 * biggest + (1 << 16))

    @property
    def tokens_per_step(self) -> int:  # this replica's rows now (measured shares deal them again)
        return self.local.batch_size * self.local.seq

    def params(self) -> dict:
        return flat(jax.device_get(_logical.to_logical(self.view)["params"]))

    def barrier(self, timeout: float) -> None:
        """Both replicas compiled and ready (one frame each way)."""
        self.ep.send(Kind.PSEUDO_GRADIENT, np.zeros(1, np.int64), step=0, microbatch=_TOKENS + 1)
        self.ep.recv(kind=Kind.PSEUDO_GRADIENT, step=0, microbatch=_TOKENS + 1, timeout=timeout)

    def agree_step(self, mine: list[int], timeout: float) -> int | None:
        """The newest step complete in every site's checkpoint folder, or None: each round, every site sends the
        steps it still holds in common to each peer it links to and keeps those they send back."""
        both = set(mine)
        for r in range(self.rounds):
            for theirs in self._round(np.array([-1, *sorted(both)], np.int64), r, _TOKENS + 2, timeout):
                both &= {int(s) for s in theirs[1:]}
        return max(both) if both else None

    def _round(self, value: np.ndarray, r: int, tag: int, timeout: float | None = None) -> list[np.ndarray]:
        """One round: `value` to every linked site (the other replica's and the pipeline's), theirs back."""
        eps = [self.ep, *self.links]
        for ep in eps:
            ep.send(Kind.PSEUDO_GRADIENT, value, step=r, microbatch=tag)
        return [ep.recv(kind=Kind.PSEUDO_GRADIENT, step=r, microbatch=tag, timeout=timeout)[1] for ep in eps]

    def next_batch(self):
        return self.local.next_batch()

    def evaluate(self) -> float | None:
        """Replica 0's held-out loss of the global params (both replicas hold the same ones), as the in-process
        `DilocoTrainer.evaluate`: every site of replica 0 takes part, its last site has the loss; None elsewhere."""
        if self.me != 0:
            return None
        return evaluate_global(self.local, self.outer.global_params,
                               lambda local: [local.evaluate(self.transport)])

    def run(self, batch, step: int) -> dict:
        t, outer = self.transport, self.outer
        t.reset_stats()
        t.step = step
        rows = self.local.batch_size
        t0 = time.perf_counter()
        loss, norm = self.local.train_step(batch, t)
        if self.meter is not None:  # the inner step, done on the device
            jax.block_until_ready((loss, norm))
            self.meter.add(self.me, rows, time.perf_counter() - t0)
        outer.add_tokens(self.me, rows * self.local.seq)
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
        if self.alone and due and not outer.pending and self.relink is not None:
            self._welcome_back(step)
        if self.meter is not None and self.meter.due(step) and not self.alone:
            self._deal(step)
        other = self.ep.peer
        return {"site": self.local.site.name, "loss": loss, "grad_norm": norm, "outer_step": outer.outer_steps,
                "replica_rows": rows,
                "sync_bytes": sent, "bytes_per_link": {f"{self.local.site.name}->{other}": sent},
                "payload_bytes_per_link": {}, "control_bytes": 0}

    # ---- a replica that returns (elastic) ------------------------------------------------------------------

    def _welcome_back(self, step: int) -> None:
        """Alone after a sync with nothing in flight: if the other replica is back, hand it the outer state at
        `step` (global params, momentum, tokens since each fragment's sync, outer steps) and wait until it is
        ready; both then go on from step + 1 together."""
        ep = self.relink.linked()
        if ep is None:
            return
        outer = self.outer
        ep.max_bytes = self.ep.max_bytes  # pseudo-gradients again, from the next sync on
        for since in outer.since:  # it counts its tokens from here
            since[1 - self.me] = 0
        try:
            for j, k in enumerate(outer.global_params):
                ep.send(Kind.STATE, outer.global_params[k], step=step, microbatch=2 * j)
                ep.send(Kind.STATE, outer.momentum[k], step=step, microbatch=2 * j + 1)
            head = [step, outer.outer_steps, *(t for since in outer.since for t in since)]
            ep.send(Kind.STATE, np.array(head, np.int64), step=step, microbatch=_TOKENS)
            ep.recv(kind=Kind.STATE, microbatch=_TOKENS + 1, timeout=max(ep.timeout, 120.0))  # it compiled
        except PeerError as e:
            ep.close()
            self.log(f"site {self.local.site.name!r}: replica {ep.peer!r} came back at step {step} but did not "
                     f"take the state ({e}); still the only replica")
            self.relink.start()
            return
        self.ep.close()  # the lost link
        self.ep, self.alone = ep, False
        self.log(f"site {self.local.site.name!r}: replica {ep.peer!r} rejoined at step {step}; it holds the "
                 f"global params of outer step {outer.outer_steps}, and the average is over both again")

    def take_state(self, timeout: float) -> int:
        """The returning side of `_welcome_back`: this replica's params become the global ones, its optimizer
        starts afresh at the run's step, its data goes on from there. Returns the step."""
        outer, ep = self.outer, self.ep
        _, head = ep.recv(kind=Kind.STATE, microbatch=_TOKENS, timeout=timeout)  # sent after the arrays
        step, outer.outer_steps, since = int(head[0]), int(head[1]), [int(t) for t in head[2:]]
        n = len(outer.since[0])
        outer.since = [since[i:i + n] for i in range(0, len(since), n)]
        for j, k in enumerate(outer.global_params):
            for m, into in ((2 * j, outer.global_params), (2 * j + 1, outer.momentum)):
                _, x = ep.recv(kind=Kind.STATE, step=step, microbatch=m, timeout=timeout)
                if x.shape != into[k].shape or x.dtype != into[k].dtype:
                    raise PeerError(f"site {ep.peer!r} sent the outer state of {k} as {x.shape} {x.dtype}, "
                                    f"expected {into[k].shape} {into[k].dtype}")
                into[k] = x
        self.local.set_params(_logical.to_stages(self.view, nested(outer.global_params),
                                                 [s.params for s in self.view.stages]))
        self.local.optimizer.restart_at(step)
        self.local.batches.set_state({"next_index": step})
        ep.send(Kind.STATE, np.zeros(1, np.int64), step=step, microbatch=_TOKENS + 1)
        return step

    def _deal(self, step: int) -> None:
        """Measured shares: every site sends its peers each replica's median seconds per row of inner step since
        the last deal (a replica group's slowest site's) and rows now, as far as it knows them, for `rounds`
        rounds; all then deal the global batch again from the same figures (`ShareMeter.deal`: the same rows
        everywhere), and this one reads its new rows from the next step on. A lost peer here is handled like one
        lost in a sync."""
        m, me = self.meter, self.me
        # [seconds per row, rows] of each replica; a replica group's is its slowest site's, agreed over every link
        figures = np.full((2, 2), -1.0)
        figures[me] = m.per_row(me), self.local.batch_size
        try:
            for r in range(self.rounds):
                for theirs in self._round(figures, step * self.rounds + r, _TOKENS + 3):
                    if theirs.shape != (2, 2) or not np.isfinite(theirs).all() or (theirs < -1).any():
                        self.ep.abort(f"bad share figures from a peer of site {self.local.site.name!r}")
                        raise PeerError(f"a peer of site {self.local.site.name!r} sent seconds per row and rows "
                                        f"(step {step}) as {theirs.tolist()!r}, expected numbers >= 0 (-1: unknown)")
                    figures = np.maximum(figures, theirs)
        except PeerError as e:
            self._lost(step, e)
            return
        if (figures < 0).any():  # every site's figures travel every link `rounds` times: cannot happen
            raise PeerError(f"site {self.local.site.name!r}: no share figures from replica {1 - me} at step {step}")
        both = list(figures)
        sizes = m.deal([int(x[1]) for x in both], [float(x[0]) for x in both])
        rates = " ".join(f"{1.0 / x[0]:.4g}" if x[0] > 0 else "-" for x in both)
        self.log(f"site {self.local.site.name!r}: step {step}: rows per second of inner step {rates} -> rows "
                 f"{sizes} from step {step + 1}")
        if sizes[me] != self.local.batch_size:
            self.local.read_rows(sizes[me], sum(sizes[:me]))

    def _exchange(self, f: int, mine: dict, step: int) -> int:
        outer = self.outer
        _, my_delta = outer.delta(f, mine)
        if not self.alone:
            try:
                return self._with_peer(f, mine, my_delta, step)
            except PeerError as e:
                self._lost(step, e)
        outer.combine(f, [my_delta], step, [outer.since[f][self.me]])
        return 0

    def _lost(self, step: int, e: PeerError) -> None:
        """The other replica is gone: raise it again, or (--elastic) go on as the only replica."""
        if not self.elastic:
            raise e
        self.alone = True
        self.log(f"site {self.local.site.name!r}: lost replica {self.ep.peer!r} at step {step} ({e}); "
                 "continuing as the only replica (--elastic): the average is over this replica alone")
        if self.relink is not None:  # it may come back (`hxtrain site --rejoin`, or launch restarts it)
            self.relink.start()

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
