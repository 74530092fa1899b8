"""Evaluation through the pipeline's forward only (`Pipeline.eval_loss`, a `ForwardOnly` table) equals the unsplit
model's loss; no bubble or unused mailbox slot leaks into it; nothing is held."""

import numpy as np
import pytest

import hxtrain
from hxtrain.config import topology as T
from hxtrain.engine import executor
from hxtrain.schedules import tables
from hxtrain.schedules.forward import ForwardOnly
from tests.helpers import batch, model, reference, rel_err

MB = 4


@pytest.mark.parametrize("sites,data,tensor,schedule,m,partition", [
    (1, 2, 1, "1f1b", 2, None),                 # one stage: the fused forward-only program
    (4, 2, 1, "gpipe", 5, [3, 2, 2, 1]),
    (2, 1, 1, "interleaved", 2, None),          # two chunks per site: the forward-only table wraps around too
])
def test_eval_loss_equals_the_single_device_loss_with_poisoned_slots(sites, data, tensor, schedule, m, partition):
    pipe = hxtrain.Pipeline(model(), T.uniform(sites, data=data, tensor=tensor), schedule=schedule,
                            microbatches=m, partition=partition)
    loss = pipe.eval_loss(batch(m * MB), poison=sites > 1)
    assert np.isfinite(float(loss)) and rel_err(loss, reference(m * MB)[0]) <= 1e-5
    assert pipe.transport.pending() == []  # every (poisoned) slot was consumed by the task it was meant for
    out = executor.run_step(pipe.stages, pipe.eval_tasks, pipe._check_tokens(batch(m * MB)), pipe.transport,
                            forward_only=True)
    assert out.gacc == {} and set(out.stats.peak_held) == {0}  # no gradient, no stage input held


def test_forward_only_table_is_valid_holds_nothing_and_rejects_a_backward():
    sched = ForwardOnly(virtual=2)
    orders = sched.site_orders(2, 3)
    tables.validate(orders, 2, 3, virtual=2, forward_only=True)
    assert [str(t) for t in orders[0]] == ["F0", "F0", "F1", "F1", "F2", "F2"]
    assert [t.stage for t in orders[1][:2]] == [1, 3]
    assert all(tables.live_activations(o) == 0 for o in orders)
    training = tables.get_schedule("1f1b").site_orders(2, 3)
    with pytest.raises(tables.ScheduleError, match="has kind 'B' but this schedule only has \\('F',\\)"):
        tables.validate(training, 2, 3, forward_only=True)
    with pytest.raises(tables.ScheduleError, match="ForwardOnly: virtual must be an int >= 1"):
        ForwardOnly(virtual=0)


def test_a_forward_only_pass_is_asked_for_never_inferred():
    pipe = hxtrain.Pipeline(model(), T.uniform(2), schedule="1f1b", microbatches=2)
    tokens = pipe._check_tokens(batch(2 * MB))
    with pytest.raises(ValueError, match="forward_only: expected a table of F tasks only \\(ForwardOnly\\), got "
                                         "task B0 of stage 1"):
        executor.run_step(pipe.stages, pipe.tasks, tokens, pipe.transport, forward_only=True)


def test_trainer_evaluates_held_out_documents_every_n_steps_and_at_the_end(tmp_path):
    import json

    import jax.numpy as jnp

    from models import gpt

    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=1), T.uniform(2), microbatches=2, batch_size=8,
                              eval_batches=2)
    history = trainer.fit(3, eval_every=2, progress=False, out=tmp_path)  # metrics, no checkpoints
    assert [("eval_loss" in r) for r in history] == [False, True, True]  # step 2, and the last step
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("eval_loss") for r in rows] == [r.get("eval_loss") for r in history]
    # The held-out loss is the unsplit model's mean loss on the fixed held-out batches.
    model = trainer.pipeline.trained_model()
    expected = np.mean([float(gpt.loss(model, jnp.asarray(b))) for b in trainer.eval_set])
    assert rel_err(history[-1]["eval_loss"], expected) <= 1e-5
    # Held out means held out: no training window is one of the evaluation's.
    train_rows = {r.tobytes() for _ in range(4) for r in next(trainer.batches)}
    assert not train_rows & {r.tobytes() for b in trainer.eval_set for r in b}


@pytest.mark.parametrize("argv,message", [
    (["--eval-every", "-1"], "--eval-every: expected a whole number >= 0, got -1"),
    (["--eval-every", "2", "--eval-batches", "0"], "--eval-batches: expected a whole number >= 1, got 0"),
    (["--sample-tokens", "-3"], "--sample-tokens: expected a whole number >= 0, got -3"),
    (["--eval-every", "2", "--eval-batches", "-1", "--strategy", "diloco"],
     "--eval-batches: expected a whole number >= 1, got -1"),
    (["site", "--site", "s1", "--eval-every", "-2"], "--eval-every: expected a whole number >= 0, got -2"),
])
def test_eval_and_sample_flags_are_checked_in_one_line(capsys, argv, message):
    from hxtrain.cli import main

    command, argv = (argv[:1], argv[1:]) if argv[0] == "site" else (["train"], argv)  # sites: the same flags
    assert main([*command, "--model", "tiny", "--steps", "1", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
