"""Checkpoints of a run whose sites are separate OS processes (`hxtrain site` / `hxtrain launch`).

Each site saves only its own stages, under DIR/<site name>/, with `hxtrain.checkpoints.checkpoint.Checkpoints` (orbax, async,
sealed with a sha256 manifest) and the Trainer's items and logical keys (params/blocks/3/w1, opt/0/mu/..., data,
meta), so the union of the sites' folders describes the whole model. Every site has its own copy of the optax
step counter (opt/0/count): stage numbers are renumbered from 0 within a site for `hxtrain.checkpoints.logical`, which keeps
the counters of stage 0.

Resume must be the same step on every site: sites save at the same steps, but one may have died before sealing
its newest. So each site finds its newest sealed and intact step *before* the start-up barrier (verifying the
sha256s may take a while; no peer waits with a short timeout then), the sites exchange them after the barrier
(`exchange_steps`, exact) and all restore the smallest. A second barrier then
absorbs the time the restores take. A checkpoint saved with another topology, partition, model, batch or seed is
refused, naming the field (from the `meta` item). Every site must be given the same checkpoint flags.
"""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path
from typing import Callable, Sequence

from hxtrain.checkpoints import logical as _logical
from hxtrain.checkpoints import manifest as _manifest
from hxtrain.checkpoints.checkpoint import (RESUME_MODES, CheckpointError, CheckpointMismatch, Checkpoints, check_shapes,
                                run_meta)

# What must be equal for a site to continue a checkpoint; (meta field, the flag or file that sets it).
MUST_MATCH = (("model", "--model"), ("config", "--model"), ("sites", "the topology's [[sites]]"),
              ("ranges", "--partition / the topology's layers"), ("schedule", "--schedule"),
              ("microbatches", "--microbatches"), ("batch_size", "--batch-size"), ("seq", "--model"),
              ("seed", "--seed (the data order depends on it)"), ("site", "--site"), ("stages", "--schedule"))


# What must be equal to continue a step that another topology saved (an elastic re-plan): the run, not its split.
CONTINUE_MUST_MATCH = (("model", "--model"), ("config", "--model"), ("batch_size", "--batch-size"),
                       ("seq", "--model"), ("seed", "--seed (the data order depends on it)"))


def _param_key(opt_key: str) -> str | None:
    """'0/mu/blocks/3/w1' -> 'blocks/3/w1' (the parameter an optimizer leaf belongs to); None for a counter."""
    parts = opt_key.split("/")
    at = next((i for i, p in enumerate(parts) if p in _logical.PARTS), None)
    return None if at is None else "/".join(parts[at:])


def _subtree(targets: dict, params: set, counters: bool) -> dict:
    """The leaves of `targets` (a logical params or opt tree) that belong to the parameters `params`, plus the
    step counters when `counters`."""
    out: dict = {}
    for key, leaf in _logical.flat(targets):
        owner = _param_key(key) if key.split("/")[0] not in _logical.PARTS else key
        if (owner in params) if owner is not None else counters:
            _logical._set(out, key.split("/"), leaf)
    return out


def _merge(into: dict, tree: dict) -> None:
    for key, leaf in _logical.flat(tree):
        _logical._set(into, key.split("/"), leaf)


def _partial_read(item_dir: Path, targets: dict) -> dict:
    """The leaves `targets` (ShapeDtypeStructs with shardings) of one orbax item folder that holds more."""
    import jax
    import orbax.checkpoint as ocp

    args = jax.tree_util.tree_map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, dtype=t.dtype), targets)
    with ocp.PyTreeCheckpointer() as reader:
        return reader.restore(item_dir, args=ocp.args.PyTreeRestore(targets, restore_args=args,
                                                                    partial_restore=True))


def check_meta(saved: dict, now: dict, where: str) -> None:
    """CheckpointMismatch naming the first MUST_MATCH field that differs, then any parameter of another shape."""
    now = json.loads(json.dumps(now))  # tuples -> lists, as the saved JSON holds them
    for field, flag in MUST_MATCH:
        if saved.get(field) != now.get(field):
            raise CheckpointMismatch(f"{where}: saved with {field} = {saved.get(field)!r}, this run has {field} = "
                                     f"{now.get(field)!r}; resume with the same {flag}, or pass another "
                                     f"--checkpoint-dir to start afresh")
    check_shapes(saved["shapes"], {k: tuple(v) for k, v in now["shapes"].items()}, where)


_LOW = 1 << 12


def exchange_steps(transport, index: int, step: int, n_sites: int) -> list[int]:
    """Every site's `step` (-1 = none), on every site, exactly: the CONTROL exchange carries float32, so each step
    travels as two parts below 2**12 and 2**24 (exact up to step 2**36)."""
    vec = transport.exchange_norms({2 * index: float(step // _LOW), 2 * index + 1: float(step % _LOW)}, 2 * n_sites)
    return [int(hi) * _LOW + int(lo) for hi, lo in zip(vec[0::2], vec[1::2])]


def agree(newest: Sequence[int], names: Sequence[str], directory: Path, mode: str) -> int | None:
    """The step every site restores: the smallest of the sites' newest sealed steps (`newest[i]`, -1 = none), or
    None (start afresh). CheckpointError for `must` when some site has none, naming its folder."""
    steps = [int(x) for x in newest]
    missing = [n for n, s in zip(names, steps) if s < 0]
    if mode == "must" and missing:
        raise CheckpointError(f"resume=must but there is no complete checkpoint in "
                              f"{', '.join(str(directory / n) for n in missing)}; train once with --resume auto "
                              f"(or never) to create one, or check --checkpoint-dir")
    return None if missing else min(steps)


class SiteCheckpoints:
    """The checkpoints of one site (`hxtrain.sites.program.LocalSite`) in `directory/<site name>`."""

    def __init__(self, local, directory, *, save_every: int = 0, keep: int = 3, resume: str = "auto",
                 log: Callable[[str], None] = print):
        if resume not in RESUME_MODES:
            raise ValueError(f"--resume: expected one of {RESUME_MODES}, got {resume!r}")
        self.local, self.mode, self.log = local, resume, log
        self.root = Path(directory).absolute()
        self.name = local.site.name
        self.ckpt = Checkpoints(self.root / self.name, save_every=save_every, keep=keep)

    @property
    def folder(self) -> Path:
        return self.ckpt.directory

    def _view(self):
        # The site's stages as a pipeline for `hxtrain.checkpoints.logical`: renumbered from 0, so that the optax counters are
        # saved once per site (logical keeps those of stage 0); their params are the current ones.
        stages = [dataclasses.replace(s, index=k) for k, s in enumerate(self.local.stages.values())]
        return types.SimpleNamespace(stages=stages, ranges=[self.local.ranges[i] for i in self.local.stages])

    def meta(self, step: int) -> dict:
        loc = self.local
        return run_meta(step, loc.seed, (loc.model_name, loc.model_config), loc.ranges, loc.topology,
                        loc.schedule_name, loc.microbatches, loc.batch_size, loc.seq,
                        _logical.shapes(self._view()), site=self.name, stages=list(loc.stages))

    # ---- start-up ----------------------------------------------------------------------------------------------

    def newest(self) -> int:
        """This site's newest sealed, intact step (-1: none); call before the barrier. resume=never refuses a
        folder that holds checkpoints."""
        found = self.ckpt.all_steps()
        if self.mode == "never":
            if found:
                raise CheckpointError(f"site {self.name!r}: resume=never but {self.folder} already holds "
                                      f"checkpoints (steps {found}); use another --checkpoint-dir, delete them, "
                                      f"or pass --resume auto")
            return -1
        latest = self.ckpt.latest()
        return -1 if latest is None else latest

    def resume(self, transport, newest: int) -> int:
        """Agree with the other sites on a step (after the barrier) and restore it; returns it (0: afresh)."""
        names = [s.name for s in self.local.topology.sites]
        vec = exchange_steps(transport, self.local.index, newest, len(names))
        step = agree(vec, names, self.root, self.mode)
        if step is None:
            stale = self.ckpt.all_steps()
            if stale:  # another site has none: these steps will be saved again
                self.log(f"site {self.name!r}: starting afresh (sites "
                         f"{[n for n, s in zip(names, vec) if s < 0]} have no checkpoint); steps {stale} moved to "
                         f"{self.folder / 'rejected'}")
                self.ckpt.set_aside(stale)
            return 0
        self.restore(step, why=f"the newest step every site has sealed (sites' newest: "
                               f"{dict(zip(names, map(int, vec)))})")
        return step

    def restore(self, step: int, why: str = "") -> None:
        """Restore exactly `step` into the site (params, optimizer state with its step counter, data position);
        steps after it are set aside."""
        try:
            chosen = self.ckpt.newest_intact(step, warn=False)
        except CheckpointError:
            chosen = None
        if chosen != step:
            raise CheckpointError(
                f"site {self.name!r}: the sites agreed to resume from step {step} ({why}), but {self.folder} no "
                f"longer holds it intact (its steps: {self.ckpt.steps()}); with --keep {self.ckpt.keep} a site "
                f"deletes older steps before every site has sealed the newer one; keep >= 2 avoids this. Restore "
                f"the folders by hand to one common step, or pass another --checkpoint-dir")
        where = f"site {self.name!r}: checkpoint step {step} in {self.folder}"
        check_meta(self.ckpt.read_meta(step), self.meta(step), where)
        view = self._view()
        self.local.load(*self.ckpt.load_stages(step, view, self.local.optimizer.states))
        self.ckpt.set_aside([s for s in self.ckpt.all_steps() if s > step])
        self.log(f"site {self.name!r}: resumed from step {step} ({self.folder / str(step)})")

    def continue_from(self, step: int) -> int:
        """Restore `step` as saved by *whichever* topology saved it (an elastic re-plan or a rejoin): every site
        of that topology sealed it (`hxtrain.checkpoints.steps.complete`), so the union of their folders under
        the checkpoint directory, which every site of an elastic run reads (one folder on one machine, shared
        storage across machines), holds this site's blocks, their optimizer state and the data position. Each
        leaf is read from the folder that holds it, onto this site's own placement. Steps after `step` in this
        site's own folder are set aside. Returns `step`."""
        from hxtrain.checkpoints import steps as _steps

        found = _steps.complete(self.root, step)
        if found is None:
            have = _steps.newest_complete(self.root)
            raise CheckpointError(f"--continue-step {step}: no complete checkpoint of step {step} under {self.root} "
                                  f"(every site of the topology that saved it must have sealed it); the newest "
                                  f"complete step there is {'none' if have is None else have[0]}")
        now = self.meta(step)
        union: dict = {}
        for name, meta in found.items():
            where = f"site {self.name!r}: continuing step {step} of site {name!r} ({self.root / name / str(step)})"
            for field, flag in CONTINUE_MUST_MATCH:
                if meta.get(field) != json.loads(json.dumps(now.get(field))):
                    raise CheckpointMismatch(f"{where}: saved with {field} = {meta.get(field)!r}, this run has "
                                             f"{field} = {now.get(field)!r}; continue with the same {flag}")
            try:
                _manifest.verify(self.root / name / str(step), step)
            except _manifest.CheckpointDamaged as e:
                raise CheckpointError(f"{where}: {e}") from None
            union.update({k: (name, v) for k, v in meta["shapes"].items()})
        mine = {k: (tuple(s), d) for k, (s, d) in now["shapes"].items()}
        check_shapes({k: v for k, (_, v) in union.items() if k in mine}, mine, f"site {self.name!r}: step {step}")
        view = self._view()
        tg = _logical.targets(view, self.local.optimizer.states)
        first = next(iter(found))
        params, opt = {}, {}
        for name in found:  # each folder's leaves onto this site's shardings, read in one pass per item
            want = {k for k, (src, _) in union.items() if src == name and k in mine}
            sub_p, sub_o = _subtree(tg["params"], want, False), _subtree(tg["opt"], want, name == first)
            folder = self.root / name / str(step)
            if sub_p:
                _merge(params, _partial_read(folder / "params", sub_p))
            if sub_o:
                _merge(opt, _partial_read(folder / "opt", sub_o))
        self.local.load(_logical.to_stages(view, params, [s.params for s in view.stages]),
                        _logical.to_stages(view, opt, self.local.optimizer.states),
                        _steps.read_json(self.root / first, step, "data"))
        self.ckpt.set_aside([s for s in self.ckpt.all_steps() if s > step])
        self.log(f"site {self.name!r}: continued from step {step}, saved by sites {list(found)} "
                 f"({', '.join(str(self.root / n / str(step)) for n in found)})")
        return step

    # ---- during the run ----------------------------------------------------------------------------------------

    def save(self, step: int, *, force: bool = False) -> None:
        """Start saving `step` (asynchronously) when it is due; log the steps sealed meanwhile (after every step
        once orbax has finished one: a step counts for a resume only when sealed)."""
        self._sealed(self.ckpt.seal_finished())
        if not self.ckpt.due(step, force):
            return
        self._sealed(self.ckpt.wait())
        view = self._view()
        self.ckpt.save_stages(step, view, self.local.optimizer.states, self.local.batches.get_state(),
                              self.meta(step))

    def close(self) -> None:
        """Finish and seal the save in flight."""
        self._sealed(self.ckpt.wait())
        self.ckpt.close()

    def _sealed(self, steps: list[int]) -> None:
        for s in steps:
            self.log(f"site {self.name!r}: saved step {s} ({self.folder / str(s)})")


__all__ = ["CONTINUE_MUST_MATCH", "MUST_MATCH", "SiteCheckpoints", "agree", "check_meta"]
