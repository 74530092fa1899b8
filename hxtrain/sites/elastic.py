"""`hxtrain launch --elastic` for a pipeline: a run that loses a site goes on without it, then takes it back.

The launcher runs the run as **segments**, each one `launch` of some sites of the topology:

1. All sites, as usual, saving every `--save-every` steps into `--checkpoint-dir`.
2. A site is lost (killed, crashed, or stalled and killed after the grace period; its peers stop within their
   `--timeout`, exit code 3). The launcher finds the newest step that every site of the segment sealed
   (`hxtrain.checkpoints.steps.newest_complete`), asks the planner for a partition of the model over the
   survivors (each keeps its data x tensor; `PlanError` when it does not fit, and the run stops there, naming the
   checkpoint), and starts them with `--sites`, `--partition` and `--continue-step`: each survivor reads its new
   blocks, their optimizer state and the data position from whichever sites' folders hold them. The data order
   continues from that step, so a step is run again only when it was past the rollback.
3. With rejoin (the default), the survivors stop at the next checkpoint boundary (`--stop-at`) and the launcher
   starts the whole topology again from that step, the lost site included, with the partition the run began with.
   A site lost `max_losses` times is not brought back.

Each change is one `[launch] elastic:` line and one row of `<--out>/events.jsonl` (what happened, when, the step
the run went back to and how many steps were lost). The sites' metrics files get the steps after the rollback
appended again: the last row of a step is the one that counted.

Every site must read the whole checkpoint folder: on one machine it is one folder; across machines it must be
storage that all sites share. A site of several processes restores on every one of them, each process its own
shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from hxtrain.sites.launch import LOST_PEER, launch

# JAX's persistent cache skips programs that compiled in under a second; a restarted site has many of those
CACHE_EVERYTHING = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
_STEP = re.compile(r"^\[([^\]/]+)(?:/\d+)?\] step (\d+) ")  # [a] or [a/1]: a process of site a


class ElasticError(RuntimeError):
    """The run cannot go on: the message says why and where its newest checkpoint is."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What the launcher needs of a resolved run (`hxtrain site`'s `SiteConfig` after `resolve_run`)."""

    model: str
    schedule: str
    microbatches: int
    batch_size: int
    steps: int
    save_every: int
    checkpoint_dir: str
    partition: tuple[int, ...] | None
    resume: str
    out: str | None


class _Watch:
    """The launcher's output stream, passed through, noting the newest step each site logged."""

    def __init__(self, out):
        self.out, self.last, self._lock = out, {}, threading.Lock()

    def write(self, text: str) -> None:
        for line in text.splitlines():
            m = _STEP.match(line)
            if m:
                with self._lock:
                    self.last[m[1]] = max(self.last.get(m[1], 0), int(m[2]))
        self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def check(topology, run: Run, strategy: str) -> None:
    """ElasticError naming the flag when this run cannot be elastic."""
    if strategy != "pipeline":
        raise ElasticError(f"--elastic with --strategy {strategy}: only pipeline runs re-plan here")
    if not run.checkpoint_dir or not run.save_every:
        raise ElasticError("--elastic: needs --checkpoint-dir DIR and --save-every N > 0: a run goes on from the "
                           "newest step every site sealed")


def check_segment(cfg) -> None:
    """ValueError naming the flag when a segment's --stop-at / --continue-step do not fit the run (a site's resolved
    `SiteConfig`)."""
    for flag, value in (("--stop-at", cfg.stop_at), ("--continue-step", cfg.continue_step)):
        if value is None:
            continue
        least = 1 if flag == "--stop-at" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= cfg.steps:
            raise ValueError(f"{flag}: expected a step in {least}..{cfg.steps} (--steps), got {value!r}")
    if cfg.continue_step is not None and not cfg.checkpoint_dir:
        raise ValueError(f"--continue-step {cfg.continue_step}: needs --checkpoint-dir, the folder that holds the "
                         "step")
    if None not in (cfg.stop_at, cfg.continue_step) and cfg.stop_at <= cfg.continue_step:
        raise ValueError(f"--stop-at {cfg.stop_at}: expected a step after --continue-step {cfg.continue_step}")


def replan(topology, survivors: list[str], run: Run) -> tuple[tuple[int, ...], str]:
    """The planner's partition of the model over `survivors` (their own data x tensor, the run's schedule and
    microbatches) and one line on its prediction; ElasticError when the model does not fit them."""
    from hxtrain.core import model_registry
    from hxtrain.planning.planner import PlanError, plan
    from hxtrain.schedules.tables import get_schedule

    part = topology.only(survivors, "survivors")
    try:
        p = plan(part, model_registry.preset(run.model), global_batch=run.batch_size, schedules=(run.schedule,),
                 microbatch_choices=(run.microbatches,), model_name=run.model, keep_shapes=True,
                 reorder=False)  # the segment's processes are up in this order
    except PlanError as e:
        raise ElasticError(f"the model does not fit on the survivors {survivors}: {e}") from None
    if not p.predicted.fits:
        raise ElasticError(f"the model does not fit on the survivors {survivors}: "
                           f"{'; '.join(p.predicted.notes) or 'over the memory of a device'}")
    partition = p.partition(getattr(get_schedule(run.schedule), "virtual", 1))
    return partition, f"predicted {p.predicted.step_s * 1e3:.1f} ms/step, {p.predicted.fraction_of_ideal:.0%} of ideal"


def _culprits(exits) -> list[str]:
    """Sites that failed by themselves (killed, crashed, or stalled until the launcher killed them), not the ones
    that stopped because they lost a peer."""
    return list(dict.fromkeys(e.site for e in exits if e.returncode not in (0, LOST_PEER)))


def run_elastic(mesh: str, site_args: list[str], run: Run, *, rejoin: bool = True, max_losses: int = 3,
                out=None, env: dict | None = None, **launch_kw) -> int:
    """Run every site of `mesh` until step `run.steps`, going on without lost sites (see the module doc).
    `site_args`: the run's `hxtrain site` flags, without --sites/--partition/--continue-step/--stop-at; `launch_kw`
    go to `launch`. Sites restarted in a later segment compile from a JAX compilation cache that the launcher keeps
    for the run (unless `env` names one). Returns 0 when the run finished; raises ElasticError when it cannot go
    on."""
    from hxtrain.config.topology import load_topology

    env = dict(os.environ if env is None else env)
    cache = None
    if "JAX_COMPILATION_CACHE_DIR" not in env:  # a folder of this run only: every program is worth keeping
        cache = env["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hxtrain-elastic-jax-cache-")
        env.update({k: v for k, v in CACHE_EVERYTHING.items() if k not in env})
    try:
        segments = _Segments(load_topology(mesh), mesh, list(site_args), run, rejoin, max_losses,
                             sys.stdout if out is None else out, {**launch_kw, "env": env})
        return segments.run()
    finally:
        if cache is not None:
            shutil.rmtree(cache, ignore_errors=True)


@dataclasses.dataclass
class _Segments:
    """The loop of the module doc: which sites run next, with which partition, from which step, until which."""

    topo: object
    mesh: str
    site_args: list[str]
    spec: Run
    rejoin: bool
    max_losses: int
    out: object
    launch_kw: dict

    def say(self, msg: str) -> None:
        self.out.write(f"[launch] elastic: {msg}\n")
        self.out.flush()

    def event(self, event: str, **fields) -> None:
        if self.spec.out is None:
            return
        path = Path(self.spec.out) / "events.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")

    def run(self) -> int:
        from hxtrain.checkpoints.steps import newest_complete

        run, root = self.spec, Path(self.spec.checkpoint_dir).absolute()
        everyone = [s.name for s in self.topo.sites]
        sites, partition, start, losses = everyone, run.partition, None, {}
        found = newest_complete(root) if run.resume != "never" else None
        if found is not None:  # also a step that survivors saved before the launcher itself stopped
            start = found[0]
            self.say(f"continuing from step {start}, the newest complete checkpoint in {root} (saved by "
                     f"{list(found[1])})")
        while True:
            back = [n for n in everyone if n not in sites and losses.get(n, 0) < self.max_losses]
            stop_at = None
            if self.rejoin and back:  # the next checkpoint boundary, unless the run ends first
                stop_at = ((start or 0) // run.save_every + 1) * run.save_every
                stop_at = None if stop_at >= run.steps else stop_at
            args = list(self.site_args)
            args += [] if sites == everyone else ["--sites", ",".join(sites)]
            args += [] if partition is None else ["--partition", ",".join(map(str, partition))]
            args += [] if start is None else ["--continue-step", str(start)]
            args += [] if stop_at is None else ["--stop-at", str(stop_at)]
            watch = _Watch(self.out)
            failed = [e for e in launch(self.mesh, args, only=tuple(sites), out=watch, **self.launch_kw)
                      if e.returncode != 0]
            if not failed and stop_at is None:
                return 0
            if not failed:  # at the boundary: bring the lost sites back
                sites = [n for n in everyone if n in sites or n in back]
                partition = run.partition if sites == everyone else replan(self.topo, sites, run)[0]
                start = stop_at
                self.say(f"sites {back} rejoin at step {stop_at}: the run goes on on {sites}"
                         + ("" if partition is None else f" with partition {','.join(map(str, partition))}"))
                self.event("rejoined", step=stop_at, sites=back, running=sites, partition=partition)
                continue
            if any(e.returncode == 2 for e in failed):  # bad input or a refused checkpoint: not a lost site
                raise ElasticError(f"{failed[0].describe()} (bad input or a refused checkpoint, see its error "
                                   "above); nothing to re-plan around")
            lost = _culprits(failed)
            if not lost:
                raise ElasticError(f"every failed site lost a peer ({'; '.join(e.describe() for e in failed)}); "
                                   "cannot tell which one to go on without")
            for n in lost:
                losses[n] = losses.get(n, 0) + 1
            found = newest_complete(root)
            if found is None:
                raise ElasticError(f"sites {lost} were lost before every site sealed a checkpoint in {root}; "
                                   "nothing to go on from (lower --save-every)")
            survivors = [n for n in sites if n not in lost]
            if not survivors:
                raise ElasticError(f"every site was lost; the newest complete checkpoint is step {found[0]} in "
                                   f"{root}")
            reached = max(watch.last.values(), default=found[0])
            try:
                partition, why = replan(self.topo, survivors, run)
            except ElasticError as e:
                raise ElasticError(f"{e}; the run stops at step {found[0]} (its checkpoint is in {root})") from None
            start, sites, n_lost = found[0], survivors, max(0, reached - found[0])
            self.say(f"lost {'; '.join(e.describe() for e in failed if e.site in lost)} at step {reached}; going "
                     f"on from step {start}, the newest step every site sealed ({n_lost} steps lost), on "
                     f"{survivors} with partition {','.join(map(str, partition))} ({why})")
            self.event("site_lost", sites=lost, reached=reached, step=start, steps_lost=n_lost, running=survivors,
                       partition=partition)


__all__ = ["ElasticError", "Run", "check", "check_segment", "replan", "run_elastic"]
