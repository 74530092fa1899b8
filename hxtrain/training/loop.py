"""The one training loop: steps, metrics (JSONL + TensorBoard), progress, the NaN stop and checkpoints.

`Trainer.fit` (every site in this process) and a site process (`hxtrain site`) both run `run_steps`; they differ
only in the `Steps` they hand it: what one step runs, where its batch comes from and how a row is reported.

    rows = run_steps(steps, first=1, last=100, metrics=MetricsWriter(out), saver=saver, report=bar_update)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or infinite; the run stops with the last good state intact."""


class Steps(Protocol):
    """What the loop runs. `run(batch, step)` does step number `step` and returns its row's fields: at least
    "loss" (a float, or None on a site that does not compute the loss) and "grad_norm"; more are kept as given."""

    tokens_per_step: int

    def next_batch(self) -> np.ndarray: ...

    def run(self, batch: np.ndarray, step: int) -> dict: ...

    def learning_rate(self, step: int) -> float: ...


class Saver(Protocol):
    """Checkpoints: `save(step, force=)` saves when the step is due (always when forced); `close(failed=)` waits
    for what was saved and seals it (a saver may decline to after a failure that left its peers unreachable)."""

    def save(self, step: int, *, force: bool = False) -> object: ...

    def close(self, *, failed: bool) -> None: ...


def run_steps(steps: Steps, *, first: int, last: int, metrics=None, saver: Saver | None = None,
              report: Callable[[dict], None] | None = None, log_every: int = 1, where: str = "",
              evaluate: Callable[[], float] | None = None, eval_every: int = 0) -> list[dict]:
    """Steps `first` .. `last` (inclusive); returns their rows.

    Each row: step, the fields `steps.run` returned, lr, tokens_per_s, step_s. `metrics` (a `MetricsWriter`)
    gets every `log_every`-th row; `saver` saves the due steps and always the last one; `report(row)` follows
    each step (a progress bar, a log line). A non-finite loss raises NonFiniteLoss naming the step (prefixed by
    `where`, e.g. "site 'b': "); what was saved before it is still sealed. `evaluate()` (the held-out loss) runs
    after every `eval_every`-th step and after the last one; its value, unless None, is the row's "eval_loss".
    """
    history: list[dict] = []
    failed = True
    try:
        for step in range(first, last + 1):
            batch = steps.next_batch()
            t0 = time.perf_counter()
            fields = steps.run(batch, step)
            loss = fields["loss"]
            loss = None if loss is None else float(loss)  # one host sync per step, for the report and NaN check
            dt = time.perf_counter() - t0
            if loss is not None and not math.isfinite(loss):
                raise NonFiniteLoss(f"{where}step {step}: loss is {loss}; stopping (parameters of step {step - 1} "
                                    "are the last good ones)")
            row = {"step": step, **fields, "loss": loss, "grad_norm": float(fields["grad_norm"]),
                   "lr": steps.learning_rate(step - 1), "tokens_per_s": steps.tokens_per_step / dt, "step_s": dt}
            if evaluate is not None and eval_every and (step % eval_every == 0 or step == last):
                value = evaluate()  # None on a site process without the last stage: its peers need it all the same
                if value is not None:
                    row["eval_loss"] = float(value)
            history.append(row)
            if metrics is not None and (step % log_every == 0 or "eval_loss" in row):
                metrics.write(row)
            if saver is not None:
                saver.save(step, force=step == last)  # the end of a run is always saved
            if report is not None:
                report(row)
        failed = False
    finally:
        if metrics is not None:
            metrics.close()
        if saver is not None:
            saver.close(failed=failed)  # also after NonFiniteLoss: seal what was saved before it
    return history


def fit_steps(steps: Steps, *, first: int, count: int, out=None, progress: bool = True, log_every: int = 1,
              saver: Saver | None = None, postfix: Callable[[dict], dict] | None = None,
              evaluate: Callable[[], float] | None = None, eval_every: int = 0) -> list[dict]:
    """`run_steps` for `count` steps from `first` with a progress bar (tqdm: terminal or Jupyter) showing the loss,
    tokens/s and `postfix(row)`, and metrics (JSONL + TensorBoard) in `out` when given: `Trainer.fit` and
    `DilocoTrainer.fit`. With `evaluate` and `eval_every`, the bar also shows the latest held-out loss."""
    if not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise ValueError(f"steps: expected >= 1, got {count!r}")
    if not (isinstance(eval_every, int) and not isinstance(eval_every, bool) and eval_every >= 0):
        raise ValueError(f"eval_every: expected a whole number >= 0 (0: no evaluation), got {eval_every!r}")
    from tqdm.auto import tqdm

    from hxtrain.training.metrics import MetricsWriter

    bar = tqdm(total=count, disable=not progress, unit="step", dynamic_ncols=True)
    latest = {}

    def report(row):
        if "eval_loss" in row:
            latest["eval"] = f"{row['eval_loss']:.3f}"
        bar.set_postfix(loss=f"{row['loss']:.3f}", **latest, tok_s=f"{row['tokens_per_s']:.0f}",
                        **(postfix(row) if postfix else {}))
        bar.update(1)

    try:
        return run_steps(steps, first=first, last=first + count - 1, report=report, saver=saver,
                         metrics=MetricsWriter(out) if out is not None else None, log_every=log_every,
                         evaluate=evaluate, eval_every=eval_every)
    finally:
        bar.close()
