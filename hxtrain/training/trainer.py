"""Training: a `Pipeline`, a per-site optimizer with global-norm clipping, grain batches, metrics, progress.

    trainer = hxtrain.Trainer(model, "local", schedule="1f1b", microbatches=8, batch_size=32)
    history = trainer.fit(steps=100)         # list of per-step metric dicts

`hxtrain train` calls `train(...)`, which builds the model from a preset name and runs `Trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import jax
import numpy as np

from hxtrain.data import loader as _data
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from hxtrain.engine.pipeline import Pipeline
from hxtrain.training.loop import NonFiniteLoss

__all__ = ["NonFiniteLoss", "RunConfig", "Trainer", "build_model", "train"]


class Trainer:
    def __init__(self, model, topology="local", *, schedule="1f1b", microbatches: int = 8, partition=None,
                 batch_size: int = 32, seq: int | None = None, optimizer: OptimizerConfig | None = None,
                 data: str | os.PathLike | None = None, seed: int = 0, max_corpus_bytes: int | None = 8_000_000,
                 out: str | os.PathLike | None = None, save_every: int = 0, keep: int = 3, resume: str = "auto",
                 init_from: str | os.PathLike | None = None, executor: str = "mpmd", eval_batches: int = 0,
                 fuse: int = 1):
        """`out`: run folder (metrics.jsonl, TensorBoard events, checkpoints/); with it, checkpoints are saved
        every `save_every` steps (0: only at the end of `fit`), the last `keep` kept, and `resume` ("never",
        "auto", "must") decides whether the newest intact checkpoint in out/checkpoints is restored here
        (`self.resumed_from` = its step or None). `init_from`: start from an exported model
        (`hxtrain export`) or a checkpoint folder's parameters (fresh optimizer, step 0). `eval_batches` >= 1
        holds documents out of `data` (a prepared folder's eval shards, else a split of the files by document)
        and `evaluate` takes the mean loss of that many fixed batches of them; 0 trains on all of `data`.
        `fuse`: microbatches per stage program (`Pipeline(fuse=...)`, the MPMD executor)."""
        if not (isinstance(eval_batches, int) and not isinstance(eval_batches, bool) and eval_batches >= 0):
            raise ValueError(f"--eval-batches: expected a whole number >= 0, got {eval_batches!r}")
        if executor not in ("mpmd", "spmd"):
            raise ValueError(f"executor: expected 'mpmd' or 'spmd', got {executor!r}")
        vocab = getattr(getattr(model, "cfg", None), "vocab_size", None)  # before any work: tokens must fit
        # Holding data out splits the corpus by document; without it, every document trains (as it always has).
        self.corpus, held_out = _data.load_split(data, hold_out=eval_batches > 0, max_bytes=max_corpus_bytes,
                                                 model_vocab=vocab)
        if executor == "spmd":  # one program over every site (same backend and shape everywhere), GPipe only
            from hxtrain.engine.spmd import SpmdPipeline

            if fuse != 1:
                raise ValueError(f"fuse: {fuse} is for the mpmd executor (spmd runs one program per step already)")
            self.pipeline = SpmdPipeline(model, topology, schedule=schedule, microbatches=microbatches,
                                         partition=partition)
        else:
            self.pipeline = Pipeline(model, topology, schedule=schedule, microbatches=microbatches,
                                     partition=partition, fuse=fuse)
        self.seq = seq if seq is not None else getattr(getattr(model, "cfg", None), "seq_len", None)
        if self.seq is None:
            raise ValueError("seq: the model has no cfg.seq_len; pass seq= explicitly")
        self.batch_size = batch_size
        self.pipeline._check_tokens(np.zeros((batch_size, self.seq + 1), np.int32))  # fail before any work
        self.optimizer_config = optimizer or OptimizerConfig()
        self.optimizer = (self.pipeline.make_optimizer(self.optimizer_config) if executor == "spmd"
                          else SiteOptimizer(self.optimizer_config, self.pipeline.stages))
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=batch_size, seed=seed)
        # The same fixed batches at every evaluation, so that successive eval losses compare.
        self.eval_corpus = held_out
        self.eval_set: list[np.ndarray] = [] if held_out is None else \
            _data.eval_batches(held_out, seq=self.seq, batch_size=batch_size, count=eval_batches)
        if out is not None:  # the tokenizer travels with the run, for `tokenizer.for_run` (sampling, export)
            _data.tokenizer_of(self.corpus).save(out)
        self.step = 0
        self.timeline_summary: str | None = None  # set by fit(timeline=...)
        self.seed, self.out, self.checkpoints, self.resumed_from = seed, out, None, None
        if init_from is not None:
            from hxtrain.checkpoints.export import load_params

            load_params(self.pipeline, init_from)
        if out is not None:
            from hxtrain.checkpoints.checkpoint import Checkpoints

            self.checkpoints = Checkpoints(Path(out) / "checkpoints", save_every=save_every, keep=keep)
            restored = self.checkpoints.resume(self, resume)
            if restored is not None:
                self.load(restored)
                self.resumed_from = restored.step

    def evaluate(self) -> float:
        """The held-out loss: the mean over the `eval_batches` fixed batches of the held-out split, each through
        the pipeline's forward only (no gradient, no activation held)."""
        if not self.eval_set:
            raise ValueError("eval_every: this Trainer holds no data out; build it with eval_batches >= 1")
        if not hasattr(self.pipeline, "eval_loss"):
            raise ValueError("--eval-every: the spmd executor has no forward-only pass; use --executor mpmd")
        return float(np.mean([float(self.pipeline.eval_loss(b)) for b in self.eval_set]))

    def sample(self, n_tokens: int | None = None, prompt: str | None = None, *, temperature: float = 0.8,
               top_k: int | None = 40, seed: int = 0) -> str:
        """Text from the model as trained so far, on one device: `prompt` (default: the first tokens of a
        held-out sequence, else of a training one) and `n_tokens` (default: up to 48, as the context allows)
        generated after it with the run's tokenizer."""
        from hxtrain.generation.sampling import sample_text

        tokenizer = _data.tokenizer_of(self.corpus)
        if prompt is None:
            rows = next(_data.batches(self.eval_corpus if self.eval_corpus is not None else self.corpus,
                                      seq=self.seq, batch_size=1, seed=1))
            prompt = tokenizer.decode([int(t) for t in rows[0, :max(1, min(16, self.seq // 4))]])
        if n_tokens is None:
            n_tokens = max(1, min(48, self.seq - len(tokenizer.encode(prompt))))
        return sample_text(self.pipeline.trained_model(), tokenizer, prompt, n_tokens, temperature=temperature,
                           top_k=top_k, seed=seed)

    def load(self, restored) -> None:
        """Continue from a restored checkpoint (`Checkpoints.restore`): its params, optimizer states, step, and
        the data order at the saved position (the order depends on the seed, so the iterator is rebuilt first)."""
        self.pipeline.set_params(restored.params)
        self.optimizer.load_states(restored.opt_states)
        self.step, self.seed = restored.step, restored.seed
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=self.batch_size, seed=restored.seed)
        self.batches.set_state(restored.data)

    def train_step(self, tokens, *, timeline: bool = False) -> dict:
        """One optimizer step on one batch; returns device values (no host sync). `timeline`: record the step's
        per-site events (slower) so `metrics.busy_fractions(self.pipeline)` can report busy time."""
        pipe = self.pipeline
        loss, grads, sqs = pipe.grads(tokens, timeline=True) if timeline else pipe.grads(tokens)
        params, norm = self.optimizer.step(pipe.stages, grads, sqs)
        pipe.set_params(params)
        self.step += 1
        return {"loss": loss, "grad_norm": norm}

    def fit(self, steps: int, *, out: str | os.PathLike | None = None, progress: bool = True,
            log_every: int = 1, timeline_every: int = 0, timeline: str | os.PathLike | None = None,
            timeline_step: int | None = None, eval_every: int = 0) -> list[dict]:
        """Train `steps` steps. Metrics (loss, lr, grad norm, tokens/s, bytes per link, and per-site `busy`
        fraction on steps that are multiples of `timeline_every`) go to `out/metrics.jsonl` and TensorBoard events
        in `out/tb/` when `out` (default: the Trainer's `out`) is given. Checkpoints: see `__init__`; one is
        also saved at the end. Raises NonFiniteLoss at the first NaN/inf loss; the last checkpoint saved before
        it is sealed and intact.

        `timeline`: write step `timeline_step` of this call (1..steps, default the last) as a Chrome trace there
        (that step is recorded, so a little slower); its per-site busy/idle summary lands in `timeline_summary`.

        `eval_every` N >= 1: the held-out loss (`evaluate`) after every N-th step and the last, as the rows'
        "eval_loss" (progress bar, JSONL, TensorBoard); needs a Trainer built with `eval_batches` >= 1."""
        if eval_every and not self.eval_set:
            raise ValueError("eval_every: this Trainer holds no data out; build it with eval_batches >= 1 "
                             "(hxtrain train --eval-batches)")
        if not (isinstance(steps, int) and steps >= 1):
            raise ValueError(f"steps: expected >= 1, got {steps!r}")
        timeline_step = steps if timeline_step is None else timeline_step
        if timeline is not None and not (isinstance(timeline_step, int) and 1 <= timeline_step <= steps):
            raise ValueError(f"timeline_step: expected a step in 1..{steps}, got {timeline_step!r}")
        if timeline is not None and not hasattr(self.pipeline, "write_timeline"):
            raise ValueError("timeline: this executor records no timeline; use the mpmd executor")
        from hxtrain.training.loop import fit_steps

        source = _TrainerSteps(self, first=self.step + 1, timeline=timeline, timeline_step=timeline_step,
                               timeline_every=timeline_every)
        saver = _TrainerSaver(self) if self.checkpoints is not None else None
        return fit_steps(source, first=self.step + 1, count=steps, out=out if out is not None else self.out,
                         progress=progress, log_every=log_every, saver=saver, evaluate=self.evaluate,
                         eval_every=eval_every)


class _TrainerSteps:
    """`training.loop.Steps` of a Trainer: its batches, its `train_step`, the rows' transfer and timeline fields."""

    def __init__(self, trainer: Trainer, *, first: int, timeline, timeline_step: int, timeline_every: int):
        self.trainer, self.first = trainer, first
        self.timeline, self.timeline_step, self.timeline_every = timeline, timeline_step, timeline_every
        self.tokens_per_step = trainer.batch_size * trainer.seq
        self.learning_rate = trainer.optimizer.learning_rate

    def next_batch(self):
        return next(self.trainer.batches)

    def run(self, batch, step: int) -> dict:
        from hxtrain.training import metrics as _metrics

        t, pipe = self.trainer, self.trainer.pipeline
        recorded = self.timeline is not None and step - self.first + 1 == self.timeline_step
        sampled = bool(self.timeline_every) and step % self.timeline_every == 0
        pipe.transport.reset_stats()
        m = t.train_step(batch, timeline=recorded or sampled)
        row = {"loss": m["loss"], "grad_norm": m["grad_norm"], "bytes_per_link": pipe.transport.bytes_per_link()}
        busy = _metrics.busy_fractions(pipe) if sampled else None
        if busy is not None:
            row["busy"] = busy
        if recorded:
            pipe.write_timeline(self.timeline)
            t.timeline_summary = f"step {step}:\n{pipe.timeline_summary()}"
        return row


class _TrainerSaver:
    """`training.loop.Saver` of a Trainer's `Checkpoints`."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer

    def save(self, step: int, *, force: bool = False):
        return self.trainer.checkpoints.save(self.trainer, force=force)

    def close(self, *, failed: bool) -> None:
        self.trainer.checkpoints.wait()  # after a NaN too: seal what was saved before it


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What `hxtrain train` runs; every field has a sane default (the topology's [run] table fills the rest)."""

    mesh: str = "local"
    model: str | None = None
    schedule: str | None = None
    microbatches: int | None = None
    batch_size: int | None = None
    steps: int | None = None
    data: str | None = None
    out: str | None = None
    partition: tuple[int, ...] | None = None
    learning_rate: float = 3e-3
    seed: int = 0
    executor: str = "mpmd"  # "spmd": the whole pipeline as one program (hxtrain.engine.spmd; GPipe, uniform sites)
    timeline: str | None = None  # Chrome-trace file for one recorded step
    timeline_step: int | None = None  # which step (default: the last)
    save_every: int = 0  # checkpoint every N steps under out/checkpoints (0: only at the end); needs `out`
    keep: int = 3  # checkpoints kept
    resume: str = "auto"  # never | auto | must: continue from the newest intact checkpoint in out/checkpoints
    init_from: str | None = None  # an `hxtrain export` folder (or a run folder) to take the parameters from
    plan: str | None = None  # a plan file from `hxtrain plan`: its topology, model, schedule, microbatches, batch
    strategy: str = "pipeline"  # or "diloco": replicas that sync every H steps (hxtrain.training.diloco)
    diloco: tuple[tuple[str, object], ...] = ()  # (Diloco field, value) given on the command line
    eval_every: int = 0  # the held-out loss every N steps and at the end (0: none; the run trains on all the data)
    eval_batches: int = 4  # batches of held-out documents per evaluation (with eval_every)
    sample_tokens: int | None = None  # the end of the run prints this many generated tokens (None: up to 48, as
    # the model's context allows after the prompt; 0: none)


def build_model(name: str, seed: int = 0):
    """A model from a preset name ('tiny', 'small', ...), from the model registry."""
    from hxtrain.core import model_registry

    return model_registry.build(name, seed=seed)


def _from_plan(config: RunConfig) -> RunConfig:
    """`config` with the plan file's topology, model, schedule, microbatches and global batch (the partition comes
    from the planned topology's `layers`; interleaved schedules get each site's chunks spelled out)."""
    from hxtrain.core import model_registry
    from hxtrain.planning.planner import Plan
    from hxtrain.schedules.tables import get_schedule

    taken = [f for f in ("model", "schedule", "microbatches", "batch_size", "partition") if getattr(config, f)]
    if taken:
        raise ValueError(f"--plan {config.plan}: the plan fixes {', '.join(taken)}; drop those options (or edit "
                         "the plan's topology file)")
    plan = Plan.load(config.plan)
    model_seq = getattr(model_registry.find(plan.model or ""), "seq_len", None)
    if model_seq is not None and model_seq != plan.seq:
        raise ValueError(f"--plan {config.plan}: planned for sequences of {plan.seq} tokens, but model "
                         f"{plan.model!r} trains on {model_seq}; plan again with --seq {model_seq}")
    topo, partition = plan.topology, None
    v = getattr(get_schedule(plan.schedule), "virtual", 1)
    if v > 1:  # one stage per site comes from the planned topology's `layers`; chunks are spelled out
        partition = plan.partition(v)
    return dataclasses.replace(config, mesh=topo.source, model=plan.model, schedule=plan.schedule,
                               microbatches=plan.microbatches, batch_size=plan.global_batch, partition=partition)


def run_folders(config) -> list[tuple[str, str, Path]]:
    """(flag, what, folder) of every folder a run writes: `--out` and, for `hxtrain train`, its checkpoints/; for
    a site process (a config with `checkpoint_dir`), --checkpoint-dir/<site> instead, and --out only on the
    site's leader (process 0, the one that writes metrics there)."""
    out = getattr(config, "out", None)
    if getattr(config, "process_id", None) not in (None, 0):
        out = None
    folders = [] if out is None else [("--out", "run folder", Path(out))]
    if hasattr(config, "checkpoint_dir"):  # a site's checkpoints: under --checkpoint-dir, one folder per site
        if config.checkpoint_dir:
            folders.append(("--checkpoint-dir", "checkpoint folder", Path(config.checkpoint_dir) / config.site))
    elif out is not None:  # Trainer(out=...) keeps its checkpoints in out/checkpoints
        folders.append(("--out", "checkpoint folder", Path(out) / "checkpoints"))
    timeline = getattr(config, "timeline", None)
    if timeline is not None and getattr(config, "process_id", None) in (None, 0):
        folders.append(("--timeline", "timeline folder", Path(timeline).parent))
    return folders


def resolve_run(topology, config, **defaults):
    """`config` with each None field from `defaults` or the topology's [run] table (`RunDefaults.fill`), then the
    choices the topology layer cannot check: the schedule's name, a run folder that is not a file, and every
    folder the run writes (`run_folders`, created here) writable. For `hxtrain train` and `hxtrain site` alike,
    before any model is built; ValueError naming the flag. Starts no JAX backend (a site process resolves before
    it sets its device count)."""
    from hxtrain.checkpoints.manifest import unwritable
    from hxtrain.schedules.tables import ScheduleError, get_schedule

    sample = getattr(config, "sample_tokens", None)  # `hxtrain train` only
    for flag, value, least in (("--eval-every", config.eval_every, 0), ("--eval-batches", config.eval_batches, 1),
                               ("--sample-tokens", 0 if sample is None else sample, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{flag}: expected a whole number >= {least}, got {value!r}")
    resolved = topology.run.fill(config, **defaults)
    step = getattr(resolved, "timeline_step", None)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or not 1 <= step <= resolved.steps):
        raise ValueError(f"--timeline-step: expected a step in 1..{resolved.steps} (--steps), got {step!r}")
    try:
        get_schedule(resolved.schedule)
    except ScheduleError as e:
        field = "--schedule" if config.schedule is not None else f"{topology.source}: run.schedule"
        raise ValueError(f"{field}: {e}") from None
    out = getattr(resolved, "out", None)
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"--out: expected a run folder (created if missing), got {str(out)!r}, which is a file")
    for flag, what, folder in run_folders(resolved):
        why = unwritable(folder)
        if why is not None:
            raise ValueError(f"{flag}: cannot write to {what} {str(folder)!r} ({why})")
    return resolved


def train(config: RunConfig, *, progress: bool = True) -> tuple[Trainer, list[dict]]:
    """Resolve defaults from the topology's [run] table, print them once, build and fit."""
    from hxtrain.backends import register_plugins
    from hxtrain.config.topology import load_topology

    if config.strategy == "diloco":
        from hxtrain.training.diloco_run import train_diloco

        return train_diloco(config, progress=progress)
    if config.plan is not None:
        config = _from_plan(config)
    topo = load_topology(config.mesh)
    register_plugins(topo)  # before anything below starts JAX's backends
    # the SPMD executor runs GPipe only, so it does not inherit the topology's default schedule
    resolved = resolve_run(topo, config, schedule="gpipe" if config.executor == "spmd" else None)
    print(f"hxtrain train: mesh={topo.source} model={resolved.model} schedule={resolved.schedule} "
          f"microbatches={resolved.microbatches} batch={resolved.batch_size} steps={resolved.steps} "
          f"data={resolved.data or 'stdlib'} out={resolved.out or '-'} ({jax.devices()[0].platform}, "
          f"{jax.device_count()} devices)")
    model = build_model(resolved.model, seed=resolved.seed)
    opt = OptimizerConfig.for_steps(resolved.steps, resolved.learning_rate)
    trainer = Trainer(model, topo, schedule=resolved.schedule, microbatches=resolved.microbatches,
                      partition=resolved.partition, batch_size=resolved.batch_size, optimizer=opt,
                      data=resolved.data, seed=resolved.seed, executor=resolved.executor, out=resolved.out,
                      save_every=resolved.save_every, keep=resolved.keep, resume=resolved.resume,
                      init_from=resolved.init_from, eval_batches=resolved.eval_batches if resolved.eval_every else 0)
    print(trainer.pipeline.describe())
    if resolved.init_from is not None:
        print(f"initialised from {resolved.init_from}")
    if trainer.resumed_from is not None:  # --steps is the run's total: a resumed run does the rest
        print(f"resuming from {Path(resolved.out) / 'checkpoints'} at step {trainer.resumed_from} "
              f"({max(resolved.steps - trainer.step, 0)} of {resolved.steps} steps left)")
        if trainer.step >= resolved.steps:
            print(f"done: already at step {trainer.step} of {resolved.steps}; nothing to train")
            return trainer, []
    history = trainer.fit(resolved.steps - trainer.step, out=resolved.out, progress=progress,
                          timeline=resolved.timeline, timeline_step=resolved.timeline_step,
                          eval_every=resolved.eval_every)
    if resolved.timeline is not None:
        print(f"timeline -> {resolved.timeline} (Chrome trace: Perfetto / chrome://tracing), "
              f"{trainer.timeline_summary}")
    first, last = history[0]["loss"], history[-1]["loss"]
    held_out = f", held-out loss {history[-1]['eval_loss']:.4f}" if "eval_loss" in history[-1] else ""
    print(f"done: {len(history)} steps, loss {first:.4f} -> {last:.4f}{held_out}, "
          f"cross-site bytes/step {sum(history[-1]['bytes_per_link'].values())}")
    if resolved.sample_tokens != 0:
        print(f"sample (temperature 0.8, top-k 40):\n{trainer.sample(resolved.sample_tokens)}")
    return trainer, history

