"""Training: a `Pipeline`, a per-site optimizer with global-norm clipping, grain batches, metrics, progress.

    trainer = hxtrain.Trainer(model, "local", schedule="1f1b", microbatches=8, batch_size=32)
    history = trainer.fit(steps=100)         # list of per-step metric dicts

`hxtrain train` calls `train(...)`, which builds the model from a preset name and runs `Trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import jax
import numpy as np

from hxtrain import data as _data
from hxtrain.optim import OptimizerConfig, SiteOptimizer
from hxtrain.pipeline import Pipeline


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the run stops with the last good state intact."""


class Trainer:
    def __init__(self, model, topology="local", *, schedule="1f1b", microbatches: int = 8, partition=None,
                 batch_size: int = 32, seq: int | None = None, optimizer: OptimizerConfig | None = None,
                 data: str | os.PathLike | None = None, seed: int = 0, max_corpus_bytes: int | None = 8_000_000):
        self.pipeline = Pipeline(model, topology, schedule=schedule, microbatches=microbatches, partition=partition)
        self.seq = seq or getattr(getattr(model, "cfg", None), "seq_len", None)
        if self.seq is None:
            raise ValueError("seq: the model has no cfg.seq_len; pass seq= explicitly")
        self.batch_size = batch_size
        self.pipeline._check_tokens(np.zeros((batch_size, self.seq + 1), np.int32))  # fail before any work
        self.optimizer_config = optimizer or OptimizerConfig()
        self.optimizer = SiteOptimizer(self.optimizer_config, self.pipeline.stages)
        self.corpus = _data.load_corpus(data, max_bytes=max_corpus_bytes)
        self.batches = _data.batches(self.corpus, seq=self.seq, batch_size=batch_size, seed=seed)
        self.step = 0

    def train_step(self, tokens) -> dict:
        """One optimizer step on one batch; returns device values (no host sync)."""
        pipe = self.pipeline
        loss, grads, sqs = pipe.grads(tokens)
        norm = self.optimizer.step(pipe.stages, grads, sqs)
        self.step += 1
        return {"loss": loss, "grad_norm": norm}

    def fit(self, steps: int, *, out: str | os.PathLike | None = None, progress: bool = True,
            log_every: int = 1) -> list[dict]:
        """Train `steps` steps. Metrics (loss, lr, grad norm, tokens/s, bytes per link) go to `out/metrics.jsonl`
        when `out` is given. Raises NonFiniteLoss at the first NaN/inf loss."""
        if steps < 1:
            raise ValueError(f"steps: expected >= 1, got {steps}")
        from tqdm.auto import tqdm

        metrics_file = None
        if out is not None:
            Path(out).mkdir(parents=True, exist_ok=True)
            metrics_file = open(Path(out) / "metrics.jsonl", "a")
        history: list[dict] = []
        tokens_per_step = self.batch_size * self.seq
        bar = tqdm(total=steps, disable=not progress, unit="step", dynamic_ncols=True)
        try:
            for _ in range(steps):
                batch = next(self.batches)
                t0 = time.perf_counter()
                self.pipeline.transport.reset_stats()
                m = self.train_step(batch)
                loss = float(m["loss"])  # one host sync per step, for the progress bar and the NaN check
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    raise NonFiniteLoss(f"step {self.step}: loss is {loss}; stopping (parameters of step "
                                        f"{self.step - 1} are the last good ones)")
                row = {"step": self.step, "loss": loss, "grad_norm": float(m["grad_norm"]),
                       "lr": self.optimizer.learning_rate(self.step - 1), "tokens_per_s": tokens_per_step / dt,
                       "step_s": dt, "bytes_per_link": self.pipeline.transport.bytes_per_link()}
                history.append(row)
                if metrics_file and self.step % log_every == 0:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        return history


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


def build_model(name: str, seed: int = 0):
    """A model from a preset name ('tiny', 'small', ...). The only place hxtrain names concrete models."""
    from models import gpt

    key = name.lower()
    if key not in gpt.PRESETS:
        raise ValueError(f"--model: unknown model {name!r}; choose one of {sorted(gpt.PRESETS)}")
    return gpt.build(gpt.PRESETS[key], seed=seed)


def train(config: RunConfig, *, progress: bool = True) -> tuple[Trainer, list[dict]]:
    """Resolve defaults from the topology's [run] table, print them once, build and fit."""
    from hxtrain.topology import load_topology

    topo = load_topology(config.mesh)
    run = topo.run
    resolved = dataclasses.replace(
        config,
        model=config.model or run.model, schedule=config.schedule or run.schedule,
        microbatches=config.microbatches or run.microbatches, batch_size=config.batch_size or run.batch_size,
        steps=config.steps or run.steps)
    print(f"hxtrain train: mesh={topo.source} model={resolved.model} schedule={resolved.schedule} "
          f"microbatches={resolved.microbatches} batch={resolved.batch_size} steps={resolved.steps} "
          f"data={resolved.data or 'stdlib'} out={resolved.out or '-'} ({jax.devices()[0].platform}, "
          f"{jax.device_count()} devices)")
    model = build_model(resolved.model, seed=resolved.seed)
    opt = OptimizerConfig(learning_rate=resolved.learning_rate, total_steps=resolved.steps,
                          warmup_steps=min(20, max(resolved.steps // 10, 1)))
    trainer = Trainer(model, topo, schedule=resolved.schedule, microbatches=resolved.microbatches,
                      partition=resolved.partition, batch_size=resolved.batch_size, optimizer=opt,
                      data=resolved.data, seed=resolved.seed)
    print(trainer.pipeline.describe())
    history = trainer.fit(resolved.steps, out=resolved.out, progress=progress)
    first, last = history[0]["loss"], history[-1]["loss"]
    print(f"done: {len(history)} steps, loss {first:.4f} -> {last:.4f}, "
          f"cross-site bytes/step {sum(history[-1]['bytes_per_link'].values())}")
    return trainer, history
