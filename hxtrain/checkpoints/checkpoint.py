"""Checkpoints of a training run: orbax `CheckpointManager`, logical layout, sealed with a manifest.

    ckpt = Checkpoints("runs/a/checkpoints", save_every=50, keep=3)
    ckpt.save(trainer)             # when trainer.step % save_every == 0 (force=True: now); asynchronous
    trainer.load(ckpt.restore(trainer))  # newest intact checkpoint, onto the trainer's *own* placement (any topology)
    ckpt.close()

`Trainer(..., out=DIR, save_every=N, keep=K, resume="auto")` does all of this itself (under DIR/checkpoints).

One checkpoint (orbax step folder DIR/<step>) holds four items, saved together:
    params   the model's parameters keyed by model path (`params/blocks/3/w1`), see `hxtrain.checkpoints.logical`
    opt      optax state keyed the same way (`opt/0/mu/blocks/3/w1`, `opt/0/count`)
    data     the grain iterator state (JSON), so the data order continues exactly
    meta     step, seed, model class/config, parameter shapes, the placement it came from (JSON)
Each array is written from the devices of the site that holds it; nothing is gathered on one host. After orbax has
finished a step, `hxtrain.checkpoints.manifest.seal` records every file's sha256; restore verifies it and falls back to the
previous checkpoint (with a warning naming step and file) when a file was truncated or altered, and skips steps that
were never sealed (the run died while saving them).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import orbax.checkpoint as ocp

from hxtrain.checkpoints import logical as _logical
from hxtrain.checkpoints import manifest as _manifest
from hxtrain.checkpoints.manifest import CheckpointDamaged

FORMAT = "hxtrain-checkpoint/1"
RESUME_MODES = ("never", "auto", "must")
__all__ = ["CheckpointDamaged", "CheckpointError", "CheckpointMismatch", "CheckpointWarning", "Checkpoints", "Restored",
           "check_shapes", "FORMAT", "RESUME_MODES", "run_meta"]


class CheckpointError(RuntimeError):
    """No usable checkpoint where one is required, checkpoints where none may be, or a save that failed."""


def _orbax_reraises(record: logging.LogRecord) -> bool:
    """Logging filter: False for an orbax error logged with its exception and traceback. orbax logs a failed
    background save that way on its own threads, then raises the same exception to `Checkpoints.wait` / `save`,
    which report it as one CheckpointError line (the traceback stays on its `__cause__`)."""
    return not (record.levelno >= logging.ERROR and record.exc_info and "orbax" in record.pathname)


logging.getLogger("absl").addFilter(_orbax_reraises)  # orbax logs through absl's logger


class CheckpointMismatch(ValueError):
    """The checkpoint holds another model shape than the one it is restored into."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (unsealed or damaged) and an older one is used."""


def check_shapes(saved: dict, expected: dict, where: str) -> None:
    """Raise CheckpointMismatch at the first parameter path (model order) that is missing, extra or of another
    shape. `saved`/`expected`: {'blocks/3/w1': (shape, dtype name)}."""
    for path, (shape, _) in expected.items():
        if path not in saved:
            raise CheckpointMismatch(f"{where}: the model's parameter {path} {tuple(shape)} is not in the checkpoint; "
                                     f"it was saved from another model")
        if tuple(saved[path][0]) != tuple(shape):
            raise CheckpointMismatch(f"{where}: parameter {path} has shape {tuple(saved[path][0])} in the checkpoint "
                                     f"but {tuple(shape)} in the model; restore it into the model it was saved from")
    extra = [p for p in saved if p not in expected]
    if extra:
        raise CheckpointMismatch(f"{where}: parameter {extra[0]} {tuple(saved[extra[0]][0])} is in the checkpoint but "
                                 f"not in the model; it was saved from another model")


def run_meta(step: int, seed: int, model, ranges, topology, schedule: str, microbatches: int, batch_size: int,
             seq: int, shapes: dict, **extra) -> dict:
    """The `meta` item (JSON): what a checkpoint was saved from. `model`: the model object or (class name, config
    object); `shapes`: `hxtrain.checkpoints.logical.shapes` of the stages saved; `extra`: more JSON fields."""
    name, cfg = model if isinstance(model, tuple) else (type(model).__name__, getattr(model, "cfg", None))
    return {
        "format": FORMAT, "step": int(step), "seed": int(seed), "model": name,
        "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "shapes": {k: [list(s), d] for k, (s, d) in shapes.items()},
        "topology": topology.name, "ranges": [list(r) for r in ranges],
        "sites": [[s.name, s.backend, s.data, s.tensor] for s in topology.sites],
        "schedule": schedule, "microbatches": microbatches, "batch_size": batch_size, "seq": seq,
        "time": time.time(), **extra,
    }


def _meta(trainer) -> dict:
    pipe = trainer.pipeline
    return run_meta(trainer.step, getattr(trainer, "seed", 0), pipe._model, pipe.ranges, pipe.topology,
                    pipe.schedule.name, pipe.microbatches, trainer.batch_size, trainer.seq, _logical.shapes(pipe))


@dataclasses.dataclass(frozen=True)
class Restored:
    """A checkpoint read onto a trainer's own placement: its step and data seed, params and optax states per
    stage, and the data iterator's state. `Trainer.load` applies it."""

    step: int
    seed: int
    params: list
    opt_states: list
    data: dict


class Checkpoints:
    """A folder of checkpoints (orbax `CheckpointManager`): save every `save_every` steps, keep the last `keep`.

    Args:
      directory: the folder (created); orbax keeps one subfolder per step.
      save_every: `save(trainer)` saves when trainer.step is a multiple of it; 0 = only `save(force=True)`.
      keep: how many recent checkpoints to keep (>= 1).
      async_save: write in the background (the next training steps overlap the write).
    """

    def __init__(self, directory: str | os.PathLike, *, save_every: int = 0, keep: int = 3, async_save: bool = True):
        if not isinstance(save_every, int) or isinstance(save_every, bool) or save_every < 0:
            raise ValueError(f"save_every: expected a whole number >= 0 (0 = only at the end), got {save_every!r}")
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep: expected a whole number >= 1 of checkpoints to keep, got {keep!r}")
        self.directory = Path(directory).absolute()
        self.save_every, self.keep = save_every, keep
        # A missing folder is made here, or refused in one line. One that exists may be read-only (read from by
        # `hxtrain export`, `--init-from`); saving into it fails at `save`, in one line too. `hxtrain train` and
        # `hxtrain site` probe the folders they save into before they start (`training.trainer.resolve_run`).
        why = None if self.directory.is_dir() else _manifest.unwritable(self.directory)
        if why is not None:
            raise CheckpointError(f"cannot write to checkpoint folder {str(self.directory)!r} ({why})")
        # Rotation is done here, not by orbax (max_to_keep=None): orbax would count a step that is written but not
        # yet sealed, so with keep=1 a kill before the seal would leave nothing restorable. Here only sealed steps
        # count, and old ones are deleted after the new one is sealed.
        # Step folders are made synchronously, in `save`: made in the background, a folder that cannot be made (the
        # checkpoint folder became read-only) fails that thread while orbax's other save threads wait 300 s for its
        # "created" signal, and the process cannot exit before they give up.
        options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True, create=True,
                                               async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
        self._mngr = ocp.CheckpointManager(self.directory, options=options)
        self._unsealed: list[int] = []
        self._failed: CheckpointError | None = None  # a failed save: raised once, then nothing is waited for

    # ---- listing -----------------------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Every step orbax finished (sealed or not), oldest first."""
        self._mngr.reload()
        return sorted(self._mngr.all_steps())

    def steps(self) -> list[int]:
        """Steps that are complete and sealed (not yet verified against their manifest), oldest first."""
        return [s for s in self.all_steps() if _manifest.is_sealed(self.directory / str(s))]

    def latest(self) -> int | None:
        """The newest step that is sealed and intact, or None."""
        try:
            return self.newest_intact(None, warn=False)
        except CheckpointError:
            return None

    # ---- save --------------------------------------------------------------------------------------------------

    def due(self, step: int, force: bool = False) -> bool:
        """Whether `step` is one to save: a multiple of `save_every`, or any step when forced."""
        return force or bool(self.save_every and step % self.save_every == 0)

    def save(self, trainer, *, force: bool = False) -> bool:
        """Save the trainer's params, optimizer state, step, seed and data position (asynchronously). Returns
        whether a checkpoint was started (False when it is not a `save_every` step or this step is saved)."""
        step = int(trainer.step)
        self.seal_finished()
        if not self.due(step, force):
            return False
        why = _logical.supported(trainer.pipeline)
        if why is not None:  # a warning rather than an error: the run itself is fine, it just cannot be saved
            warnings.warn(f"step {step} not checkpointed: {why}", CheckpointWarning, stacklevel=2)
            return False
        return self.save_stages(step, trainer.pipeline, trainer.optimizer.states, trainer.batches.get_state(),
                                _meta(trainer))

    def save_stages(self, step: int, pipeline, states: list, data: dict, meta: dict) -> bool:
        """Start saving `pipeline`'s stages (anything with `.stages` and `.ranges`, see `hxtrain.checkpoints.logical`), their
        optax `states`, the iterator state `data` and `meta` as checkpoint `step`. False if that step exists."""
        self.wait()  # one save in flight at a time; seal the previous one before starting the next
        if step in self.all_steps():
            return False
        items = _logical.to_logical(pipeline, states)
        return self.save_trees(step, items["params"], items["opt"], data, meta, waited=True)

    def save_trees(self, step: int, params: dict, opt: dict, data: dict, meta: dict, *, waited: bool = False) -> bool:
        """`save_stages` for trees already in the logical layout (e.g. DiLoCo's global params and outer state,
        host arrays): the same items, so `hxtrain export` reads such a checkpoint like any other."""
        if not waited:
            self.wait()
            if step in self.all_steps():
                return False
        args = ocp.args.Composite(params=ocp.args.StandardSave(params), opt=ocp.args.StandardSave(opt),
                                  data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta))
        try:
            self._mngr.save(step, args=args, force=True)
        except OSError as e:  # the step folder could not be made: nothing of the step runs in the background
            raise self._failure([step], e) from e
        self._failed = None
        self._unsealed.append(step)
        return True

    def _failure(self, steps: list[int], e: BaseException) -> CheckpointError:
        """One line naming the step(s), this folder and the cause (a read-only folder, a full disk, ...)."""
        what = {0: "checkpoint", 1: f"checkpoint step {steps[0]}"}.get(len(steps), f"checkpoint steps {steps}")
        if isinstance(e, OSError) and e.strerror:
            why = e.strerror + (f": {str(e.filename)!r}" if e.filename else "")
            return CheckpointError(f"{what}: cannot write to checkpoint folder {str(self.directory)!r} ({why})")
        why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
        return CheckpointError(f"{what}: saving into checkpoint folder {str(self.directory)!r} failed ({why})")

    def wait(self) -> list[int]:
        """Finish the save in flight, seal it (write its manifest), then keep only the newest `keep` sealed.
        Returns the steps sealed now. Under jax.distributed (a site of several processes) every process calls it:
        process 0 seals, the others wait for it, then all delete the same old steps (orbax's delete is a
        collective). A save that failed, in the background too, is a CheckpointError naming the step and the
        cause, raised once: later calls (the loop's close after that failure) return []."""
        if self._failed is not None:
            return []
        sealed, self._unsealed = self._unsealed, []
        try:
            self._mngr.wait_until_finished()
            if not sealed:
                return []
            import jax

            if jax.process_index() == 0:
                for step in sealed:
                    _manifest.seal(self.directory / str(step))
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices(f"hxtrain: sealed {self.directory} {sealed}")
            for old in self.steps()[:-self.keep]:
                self._mngr.delete(old)
        except (OSError, ValueError) as e:  # a background write (tensorstore: ValueError), the seal or a deletion
            self._failed = self._failure(sealed, e)  # failed: a read-only folder, a full disk, ...
            raise self._failed from e
        return sealed

    def seal_finished(self) -> list[int]:
        """Seal the save in flight if orbax has finished writing it, without waiting; the steps sealed now. A step
        counts for a resume only once sealed, so a run that is killed loses fewer steps when this runs after every
        step. One process only: under jax.distributed the processes could see different states (`wait` is a
        collective there), so they seal at the next save."""
        import jax

        if not self._unsealed or jax.process_count() > 1 or self._mngr.is_saving_in_progress():
            return []
        return self.wait()

    def close(self) -> None:
        self.wait()
        if self._failed is None:  # orbax's close would wait for (and raise) the failed save again
            self._mngr.close()

    # ---- restore -----------------------------------------------------------------------------------------------

    def newest_intact(self, step: int | None = None, *, warn: bool = True) -> int:
        """The newest step (at or before `step`) that is sealed and matches its manifest; the newer ones it passes
        over are warned about (`warn`). CheckpointError listing why each was passed over when there is none."""
        notes = []
        for s in reversed(self.all_steps()):
            if step is not None and s > step:
                continue
            folder = self.directory / str(s)
            if not _manifest.is_sealed(folder):
                notes.append(f"checkpoint step {s}: not sealed (the run stopped while saving it)")
                continue
            try:
                _manifest.verify(folder, s)
            except CheckpointDamaged as e:
                notes.append(str(e))
                continue
            for n in notes if warn else ():
                warnings.warn(f"{n}; restoring step {s} instead", CheckpointWarning, stacklevel=3)
            return s
        wanted = "" if step is None else f" at or before step {step}"
        raise CheckpointError(f"no complete checkpoint{wanted} in {self.directory}"
                              + (": " + "; ".join(notes) if notes else ""))

    def read_meta(self, step: int) -> dict:
        return self.read_item(step, "meta", None)

    def restore(self, trainer, step: int | None = None) -> "Restored":
        """Restore the newest intact checkpoint (at or before `step`) into `trainer`, whatever its topology,
        partition or data x tensor shape: targets come from the trainer's own placement. Newer checkpoints that
        were skipped are moved to `<directory>/rejected/` so that the run can save those steps again.
        Returns the restored step."""
        self.wait()
        why = _logical.supported(trainer.pipeline)
        if why is not None:
            raise CheckpointError(f"cannot restore into this trainer: {why}")
        chosen = self.newest_intact(step)
        meta = self.read_meta(chosen)
        pipe = trainer.pipeline
        check_shapes(meta["shapes"], _logical.shapes(pipe), f"checkpoint step {chosen} in {self.directory}")
        params, states, data = self.load_stages(chosen, pipe, trainer.optimizer.states)
        self.set_aside([s for s in self.all_steps() if s > chosen])
        return Restored(int(meta["step"]), int(meta["seed"]), params, states, data)

    def read_params(self, step: int, targets: dict) -> dict:
        """Only the params item of checkpoint `step`, read onto `targets` (a tree of ShapeDtypeStructs with
        shardings, keyed like the checkpoint's logical layout)."""
        return self.read_item(step, "params", targets)

    def read_item(self, step: int, item: str, targets: dict):
        """One item ("params", "opt") of checkpoint `step` onto `targets`; "data" / "meta" (JSON) take None."""
        arg = ocp.args.JsonRestore() if item in ("data", "meta") else ocp.args.StandardRestore(targets)
        return self._mngr.restore(step, args=ocp.args.Composite(**{item: arg}))[item]

    def load_stages(self, step: int, pipeline, fresh: list) -> tuple[list, list, dict]:
        """Checkpoint `step` read onto `pipeline`'s own placement: (per-stage params, per-stage optax states shaped
        like `fresh`, the iterator state). Checks nothing: choose the step and compare its meta first."""
        tg = _logical.targets(pipeline, fresh)
        got = self._mngr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(tg["params"]), opt=ocp.args.StandardRestore(tg["opt"]),
            data=ocp.args.JsonRestore()))
        params = _logical.to_stages(pipeline, got["params"], [s.params for s in pipeline.stages])
        return params, _logical.to_stages(pipeline, got["opt"], fresh), got["data"]

    def set_aside(self, steps: list[int]) -> None:
        """Move `steps` to `<directory>/rejected/` (kept for inspection; the run may save those steps again).

        Under jax.distributed (a site of several processes) every process calls it, with the steps it listed
        (`all_steps`) just before. They first wait for each other, so that no process lists the folder after
        process 0 has moved steps out of it: such a process found none, skipped the barrier below and left
        process 0 waiting in it for ever (the hang of an elastic restore on a site of two processes,
        tests/test_checkpoint_processes.py)."""
        import jax

        multi = jax.process_count() > 1
        if multi:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"hxtrain: listed {self.directory}")
        if not steps:
            return
        if jax.process_index() == 0:  # one process moves the folders for all
            dest = self.directory / "rejected"
            dest.mkdir(exist_ok=True)
            for s in steps:
                target = dest / f"{s}-{time.strftime('%Y%m%dT%H%M%S')}"
                shutil.move(str(self.directory / str(s)), str(target))
        if multi:
            multihost_utils.sync_global_devices(f"hxtrain: set aside {self.directory} {steps}")
        self._mngr.reload()

    def resume(self, trainer, mode: str = "auto") -> "Restored | None":
        """`never`: refuse a folder that already holds checkpoints; `auto`: restore the newest intact one if any;
        `must`: restore or raise. Returns what was restored (for the trainer to load) or None."""
        if mode not in RESUME_MODES:
            raise ValueError(f"resume: expected one of {RESUME_MODES}, got {mode!r}")
        found = self.all_steps()
        if mode == "never":
            if found:
                raise CheckpointError(f"resume=never but {self.directory} already holds checkpoints (steps {found}); "
                                      f"use another --out, delete them, or resume with --resume auto")
            return None
        if not found:
            if mode == "must":
                raise CheckpointError(f"resume=must but there is no checkpoint in {self.directory}; train once "
                                      f"with --resume auto (or never) to create one, or check --out")
            return None
        try:
            return self.restore(trainer)
        except CheckpointError as e:
            if mode == "must":
                raise
            warnings.warn(f"{e}; starting from scratch (the unusable steps are moved to "
                          f"{self.directory / 'rejected'})", CheckpointWarning, stacklevel=2)
            self.set_aside(found)
            return None
