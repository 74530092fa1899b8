"""The one training loop (`hxtrain.training.loop.run_steps`) that Trainer.fit and site processes share, with
stand-in steps: rows, metrics, the NaN stop, checkpoints saved when due and always sealed."""

import math

import numpy as np
import pytest

from hxtrain.training.loop import NonFiniteLoss, run_steps


class FakeSteps:
    tokens_per_step = 64

    def __init__(self, losses):
        self.losses, self.batches = list(losses), 0

    def next_batch(self):
        self.batches += 1
        return np.zeros((2, 3), np.int32)

    def run(self, batch, step):
        return {"loss": self.losses[step - 1], "grad_norm": np.float32(2.0), "bytes_per_link": {"a->b": step}}

    def learning_rate(self, step):
        return 0.1 * step


class Recorder:
    def __init__(self):
        self.rows, self.saved, self.closed = [], [], None

    def write(self, row):
        self.rows.append(row)

    def close(self):
        self.rows.append("closed")

    def save(self, step, *, force=False):
        self.saved.append((step, force))

    def close_saver(self, *, failed):
        self.closed = failed


class Saver:
    def __init__(self, rec):
        self.save, self.close = rec.save, rec.close_saver


def test_rows_metrics_checkpoints_and_report():
    rec, reported = Recorder(), []
    rows = run_steps(FakeSteps([3.0, 2.0, 1.0, 0.5]), first=2, last=4, metrics=rec, saver=Saver(rec),
                     report=reported.append, log_every=2)
    assert [r["step"] for r in rows] == [2, 3, 4] and [r["loss"] for r in rows] == [2.0, 1.0, 0.5]
    assert [r["lr"] for r in rows] == [0.1, pytest.approx(0.2), pytest.approx(0.3)]  # lr of the step before
    assert all(r["grad_norm"] == 2.0 and type(r["grad_norm"]) is float and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["bytes_per_link"] == {"a->b": 2}
    assert [r["step"] for r in rec.rows[:-1]] == [2, 4] and rec.rows[-1] == "closed"  # every 2nd step, then closed
    assert rec.saved == [(2, False), (3, False), (4, True)] and rec.closed is False  # the last one always saved
    assert reported == rows


def test_a_site_without_the_loss_reports_none():
    (row,) = run_steps(FakeSteps([None]), first=1, last=1)
    assert row["loss"] is None


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_stops_naming_the_step_and_still_seals(bad):
    rec = Recorder()
    steps = FakeSteps([1.0, bad, 0.5])
    with pytest.raises(NonFiniteLoss, match=rf"^site 'b': step 2: loss is {bad}; stopping \(parameters of step 1 "
                                            r"are the last good ones\)$"):
        run_steps(steps, first=1, last=3, metrics=rec, saver=Saver(rec), where="site 'b': ")
    assert [r["step"] for r in rec.rows[:-1]] == [1] and rec.rows[-1] == "closed"
    assert rec.saved == [(1, False)] and rec.closed is True and steps.batches == 2
