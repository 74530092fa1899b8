"""Checkpoints of a DiLoCo run (`DilocoTrainer(out=...)`): everything a resume needs to continue bit for bit.

    out/checkpoints/                  the global side, a `Checkpoints` folder like any run's:
        <step>/params                 the global params (logical keys): `hxtrain export --checkpoint out` exports
                                      the model the replicas agree on, as for any other run
        <step>/opt                    the outer state: Nesterov momentum (logical keys), tokens per replica since
                                      each fragment's sync, the outer step count, results not yet applied
        <step>/data, <step>/meta      the global batch stream's position; the run's shape and the [diloco] settings
    out/checkpoints/replicas/<name>/  each replica's own params and inner optimizer state (`save_stages`)

A step is restored only when the global folder and every replica folder hold it sealed and intact; a resume takes
the newest such step. A checkpoint of other DiLoCo settings, replicas, model, batch or seed is refused naming the
field.

The same class saves a replica that is its own site process (`hxtrain.sites.diloco`): there `run` is that process's
view of the run (its one replica, the outer state it shares bit for bit with the other replica), the root is
`--checkpoint-dir/<site>`, and the two processes agree on a step from their `complete()` lists before each
`restore`s it. So `hxtrain export --checkpoint DIR/<site>` exports the global model of either replica.

`run` provides: replicas (each with name, pipeline: stages, ranges, schedule.name, microbatches, set_params;
optimizer: states, load_states; rows: a slice of the global batch), diloco, seed, topology, batch_size, seq,
model_id ((class name, config)), outer (`OuterSync`), batches (get_state) and restart_data(state); `restore` sets
its step and tokens.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from jax.sharding import SingleDeviceSharding

from hxtrain.checkpoints import logical as _logical
from hxtrain.checkpoints.checkpoint import (RESUME_MODES, CheckpointError, CheckpointMismatch, Checkpoints,
                                            run_meta)
from hxtrain.training.outer import flat, nested


class DilocoCheckpoints:
    """The global and per-replica checkpoint folders of `run` (a `DilocoTrainer`) under `root`."""

    def __init__(self, run, root, *, save_every: int = 0, keep: int = 3):
        self.run, self.root = run, Path(root)
        self.glob = Checkpoints(self.root, save_every=save_every, keep=keep)
        self.reps = [Checkpoints(self.root / "replicas" / rep.name, save_every=save_every, keep=keep)
                     for rep in run.replicas]

    def meta(self, step: int) -> dict:
        run = self.run
        pipe = run.replicas[0].pipeline
        d = run.diloco
        settings = {"replicas": [rep.name for rep in run.replicas], "sync_every": d.sync_every,
                    "outer_lr": d.outer_lr, "outer_momentum": d.outer_momentum, "fragments": d.fragments,
                    "overlap": d.overlap, "mix": d.mix, "codec": d.codec,
                    "rows": [[rep.rows.start, rep.rows.stop] for rep in run.replicas]}
        return run_meta(step, run.seed, run.model_id, pipe.ranges, run.topology, pipe.schedule.name,
                        pipe.microbatches, run.batch_size, run.seq, _logical.shapes(pipe), diloco=settings,
                        pending=[[at, f] for at, f, _ in self._pending()], tokens=list(run.tokens))

    def _pending(self):
        keys = self.run.outer.fragments
        return [(at, next(f for f, ks in enumerate(keys) if set(new) == set(ks)), new)
                for at, new in self.run.outer.pending]

    # ---- save ------------------------------------------------------------------------------------------------

    def save(self, step: int, *, force: bool = False) -> bool:
        if not self.glob.due(step, force):
            return False
        run, outer = self.run, self.run.outer
        opt = {"momentum": nested(outer.momentum), "since": np.asarray(outer.since, np.int64),
               "outer_steps": np.asarray(outer.outer_steps, np.int64),
               "pending": {str(i): nested(new) for i, (_, _, new) in enumerate(self._pending())}}
        data, meta = run.batches.get_state(), self.meta(step)
        started = self.glob.save_trees(step, nested(outer.global_params), opt, data, meta)
        for rep, ck in zip(run.replicas, self.reps):
            started |= ck.save_stages(step, rep.pipeline, rep.optimizer.states, data, meta)
        return started

    def close(self) -> None:
        for ck in (self.glob, *self.reps):
            ck.close()

    # ---- resume ----------------------------------------------------------------------------------------------

    def complete(self) -> list[int]:
        """The steps sealed and intact in every folder, oldest first."""
        return [step for step in self.glob.steps() if self._intact(step)]

    def _intact(self, step: int) -> bool:
        try:
            return all(ck.newest_intact(step, warn=False) == step for ck in (self.glob, *self.reps))
        except CheckpointError:
            return False

    def newest(self) -> int | None:
        """The newest step sealed and intact in every folder, or None."""
        return next((step for step in reversed(self.glob.steps()) if self._intact(step)), None)

    def set_aside_for_return(self, step: int) -> None:
        """A replica returning to a run at `step` (it saves again from there): move aside every step that is not
        sealed and intact in every folder (what it left unsealed when it was lost) and every step from `step` on
        (none, unless the folder is older than this run), so that its folders hold only the run's complete steps."""
        keep = {s for s in self.complete() if s < step}
        for ck in (self.glob, *self.reps):
            ck.set_aside([s for s in ck.all_steps() if s not in keep])

    def refuse_existing(self) -> None:
        """resume=never: CheckpointError when the folder already holds checkpoints."""
        found = self.glob.all_steps()
        if found:
            raise CheckpointError(f"resume=never but {self.root} already holds checkpoints (steps {found}); use "
                                  "another checkpoint folder, delete them, or resume with --resume auto")

    def resume(self, mode: str = "auto") -> int | None:
        """Restore the newest complete step into the run (`auto`: if any; `must`: or raise; `never`: refuse a
        folder that holds one); returns the step restored or None."""
        if mode not in RESUME_MODES:
            raise ValueError(f"resume: expected one of {RESUME_MODES}, got {mode!r}")
        if mode == "never":
            self.refuse_existing()
            return None
        step = self.newest()
        if step is None:
            if mode == "must":
                raise CheckpointError(f"resume=must but {self.root} holds no step that the global folder and every "
                                      "replica folder have sealed")
            return None
        self.restore(step)
        return step

    def restore(self, step: int) -> None:
        """Restore `step` (sealed and intact in every folder, else CheckpointError) into the run; steps after it
        are set aside."""
        if not self._intact(step):
            raise CheckpointError(f"checkpoint step {step} is not sealed and intact in {self.root} and every replica "
                                  f"folder under it (complete there: {self.complete()})")
        run, outer = self.run, self.run.outer
        saved, now = self.glob.read_meta(step), self.meta(step)
        measured = run.diloco.shares == "measured"
        if measured:  # the rows were dealt from timings: take the saved ones, compare the rest
            run.set_rows([hi - lo for lo, hi in saved["diloco"]["rows"]], first=saved["diloco"]["rows"][0][0])
            now = self.meta(step)
        for field in ("diloco", "model", "config", "batch_size", "seed", "seq", "schedule", "microbatches"):
            if saved.get(field) != _json(now.get(field)):
                raise CheckpointMismatch(f"checkpoint step {step} in {self.root}: saved with {field} = "
                                         f"{saved.get(field)!r}, this run has {_json(now.get(field))!r}; resume with "
                                         "the same settings, or pass another --out to start afresh")
        cpu = SingleDeviceSharding(jax.devices("cpu")[0])
        like = lambda tree: jax.tree.map(  # noqa: E731
            lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=cpu), tree)
        keys = outer.fragments
        pending_like = {str(i): nested({k: outer.global_params[k] for k in keys[f]})
                        for i, (_, f) in enumerate(saved["pending"])}
        opt_like = {"momentum": nested(outer.momentum), "since": np.asarray(outer.since, np.int64),
                    "outer_steps": np.asarray(0, np.int64), "pending": pending_like}
        host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
        outer.global_params = flat(host(self.glob.read_item(step, "params", like(nested(outer.global_params)))))
        opt = host(self.glob.read_item(step, "opt", like(opt_like)))
        outer.momentum = flat(opt["momentum"])
        outer.since = [list(map(int, row)) for row in opt["since"]]
        outer.outer_steps = int(opt["outer_steps"])
        outer.pending = [(int(at), flat(opt["pending"][str(i)])) for i, (at, _) in enumerate(saved["pending"])]
        for rep, ck in zip(run.replicas, self.reps):
            params, states, _ = ck.load_stages(step, rep.pipeline, rep.optimizer.states)
            rep.pipeline.set_params(params)
            rep.optimizer.load_states(states)
        run.restart_data(self.glob.read_item(step, "data", None))
        run.step = int(saved["step"])
        run.tokens = list(saved["tokens"]) if "tokens" in saved else \
            [run.step * (rep.rows.stop - rep.rows.start) * run.seq for rep in run.replicas]
        for ck in (self.glob, *self.reps):
            ck.set_aside([s for s in ck.all_steps() if s > step])


def _json(v):
    import json

    return json.loads(json.dumps(v))
