"""The SPMD fast path (one program over every site) equals the single-device reference and the MPMD pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hxtrain
from hxtrain.engine import spmd
from hxtrain.config import topology as T
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from models import gpt
from tests.helpers import assert_trees_close, batch, model, reference, rel_err

MB = 4  # microbatch size
UNEVEN = {2: [5, 3], 4: [3, 2, 2, 1]}
SHAPES = {2: [(2, 2), (1, 2)], 4: [(2, 1), (1, 2)]}  # (data, tensor); each S gets a data- and a tensor-parallel one


def _cases():
    # A covering design: every (S, M, even/uneven) once, the two shapes of each S alternating across them.
    for sites in (2, 4):
        for k, m in enumerate((sites, 2 * sites + 1)):
            for uneven in (False, True):
                data, tensor = SHAPES[sites][(k + uneven) % 2]
                yield pytest.param(sites, data, tensor, uneven, m,
                                   id=f"S{sites}-d{data}t{tensor}-{'uneven' if uneven else 'even'}-M{m}")


@pytest.mark.parametrize("sites,data,tensor,uneven,m", list(_cases()))
def test_spmd_matches_reference_and_mpmd(sites, data, tensor, uneven, m):
    topo = T.uniform(sites, data=data, tensor=tensor)
    part = UNEVEN[sites] if uneven else None
    pipe = spmd.SpmdPipeline(model(), topo, microbatches=m, partition=part)
    loss, grads = pipe.loss_and_grads(batch(m * MB))
    ref_loss, ref_grads = reference(m * MB)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)
    if uneven and m > sites:  # the MPMD executor on the same split, once per S (compiles cost: it has its own
        # reference tests in test_pipeline.py, so equality with it also follows from the reference within 2e-5)
        mpmd_loss, mpmd_grads = hxtrain.Pipeline(model(), topo, schedule="gpipe", microbatches=m,
                                                 partition=part).loss_and_grads(batch(m * MB))
        assert rel_err(loss, mpmd_loss) <= 1e-5
        assert_trees_close(grads, mpmd_grads, rtol=1e-5, what="spmd vs mpmd grads")


def test_layer_params_are_sharded_over_site_and_tensor():
    pipe = spmd.SpmdPipeline(model(), T.uniform(2, data=1, tensor=2), microbatches=2, partition=[5, 3])
    w1 = pipe.params["blocks"]["w1"]  # [site, layers (padded to 5), embed, mlp]
    assert w1.shape == (2, 5, 32, 64)
    assert w1.sharding.spec == P("site", None, None, "tensor")
    assert {s.data.shape for s in w1.addressable_shards} == {(1, 5, 32, 32)}
    assert pipe.params["embed"]["wte"].sharding.spec == P("site", "tensor", None)  # vocab over tensor
    assert np.all(np.asarray(w1[1, 3:]) == 0)  # site 1's two padded layers


def _poisoned_case():
    # The configuration of the S4-d2t1-uneven-M9 matrix case: poison is a traced input, so nothing recompiles.
    return spmd.SpmdPipeline(model(), T.uniform(4, data=2), microbatches=9, partition=[3, 2, 2, 1])


def test_poisoned_bubbles_padding_and_dummy_slots_leave_results_unchanged():
    """NaN in the padded layers, the embedding off site 0, the head off site S-1, the initial loop carry and
    everything a bubble tick sends: loss and grads still equal the reference, and padding gets zero grads."""
    pipe = _poisoned_case()
    poisoned = spmd._poison(pipe.counts, pipe.params)
    assert np.isnan(np.asarray(poisoned["blocks"]["w1"][3, 1:])).all()  # the poison is really there
    assert np.isnan(np.asarray(poisoned["head"]["w_out"][0])).all()
    assert not np.isnan(np.asarray(poisoned["blocks"]["w1"][3, 0])).any()
    loss, (grads,), (sq,) = pipe.grads(batch(9 * MB), poison=True)
    ref_loss, ref_grads = reference(9 * MB)
    assert np.isfinite(loss) and rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(pipe.as_state(grads), ref_grads, rtol=1e-5)
    assert np.all(np.asarray(grads["blocks"]["w1"][3, 1:]) == 0)
    assert np.all(np.asarray(grads["embed"]["wte"][1:]) == 0) and np.all(np.asarray(grads["head"]["w_out"][:3]) == 0)
    assert np.all(np.isfinite(np.asarray(sq)))


def test_poison_is_detected_when_padding_is_not_masked():
    """The poison test can fail: the same program told that every layer slot is live reads the NaN padding."""
    pipe = _poisoned_case()
    tokens = jax.device_put(pipe._check_tokens(batch(9 * MB)), NamedSharding(pipe.mesh, P(None, "data")))
    poisoned = spmd._poison(pipe.counts, pipe.params)
    right = np.asarray(pipe.counts, np.int32)
    assert np.isfinite(spmd._step(pipe._program, poisoned, tokens, right, np.bool_(True))[0])
    wrong = np.full_like(right, max(pipe.counts))
    assert np.isnan(spmd._step(pipe._program, poisoned, tokens, wrong, np.bool_(True))[0])


def test_optimizer_matches_site_optimizer_given_the_same_grads():
    """Two AdamW steps with global-norm clipping active: `SpmdOptimizer` on the stacked layout equals
    `SiteOptimizer` per stage when fed the same gradients (the MPMD ones, restacked with `stack_state`).
    (Not fed each path's own grads: Adam turns 1e-9 noise in exactly-zero gradients, e.g. the key bias, into
    full-size updates, so two correct paths can differ there by the learning rate.)"""
    cfg = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, clip_norm=0.2)
    topo = T.uniform(2, data=2, tensor=2)  # the configuration of a matrix case above, so nothing recompiles
    # A model of its own: the MPMD stages may alias the model's arrays (device_put onto a mesh that holds their
    # device), and SiteOptimizer donates the stage params, which would delete the shared model()'s arrays.
    fresh = gpt.build(gpt.TINY, seed=0)
    s_pipe = spmd.SpmdPipeline(fresh, topo, microbatches=5, partition=[5, 3])
    m_pipe = hxtrain.Pipeline(fresh, topo, schedule="gpipe", microbatches=5, partition=[5, 3])
    s_opt, m_opt = s_pipe.make_optimizer(cfg), SiteOptimizer(cfg, m_pipe.stages)
    for step in range(2):
        tokens = batch(5 * MB, seed=10 + step)
        _, m_grads, m_sqs = m_pipe.grads(tokens)
        _, _, (s_sq,) = s_pipe.grads(tokens)
        total = sum(float(x) for x in m_sqs)
        assert abs(float(jnp.sum(s_sq)) - total) <= 1e-5 * total  # the SPMD path's own squared norm agrees
        s_params, s_norm = s_opt.step(s_pipe.stages, [s_pipe.stack_state(m_pipe.as_state(m_grads))],
                                      [jnp.float32(total)])
        m_params, m_norm = m_opt.step(m_pipe.stages, m_grads, m_sqs)
        s_pipe.set_params(s_params)
        m_pipe.set_params(m_params)
        assert float(s_norm) > cfg.clip_norm  # clipping really happens
        assert rel_err(s_norm, m_norm) <= 1e-6
    assert_trees_close(s_pipe.params_state(), m_pipe.params_state(), rtol=1e-6, what="params")
    assert np.all(np.asarray(s_pipe.params["blocks"]["w1"][1, 3:]) == 0)  # padding stays zero under AdamW
    assert np.all(np.asarray(s_pipe.params["head"]["w_out"][0]) == 0)  # and so does the dummy head slot


def test_ppermute_only_between_neighbouring_sites():
    pipe = spmd.SpmdPipeline(model(), T.uniform(4, data=2, tensor=1), microbatches=4)  # a matrix case
    pipe.grads(batch(4 * MB))
    act = 4 * gpt.TINY.seq_len * gpt.TINY.d_model * 4  # one [mb, T, D] fp32 activation
    assert pipe.transport.bytes_per_link() == {f"{a}->{b}": (4 + 3) * act
                                               for i in range(3) for a, b in ((i, i + 1), (i + 1, i))}


@pytest.mark.parametrize("change,match", [
    (dict(backend="cuda"), r"sites\[1\] \('s1'\) backend: .* expected 'cpu' like sites\[0\] \('s0'\), got 'cuda'"),
    (dict(data=1, tensor=2), r"sites\[1\] \('s1'\) data x tensor: .* expected '2 x 1' .*, got '1 x 2'"),
    (dict(device_kind="H100"), r"sites\[1\] \('s1'\) device_kind: .* expected None .*, got 'H100'"),
])
def test_refuses_sites_it_cannot_compile_as_one_program(change, match):
    topo = T.uniform(2, data=2).replace_site("s1", **change)
    with pytest.raises(ValueError, match=match):
        spmd.SpmdPipeline(model(), topo, microbatches=2)


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved", "zb-h1"])
def test_refuses_other_schedules(schedule):
    with pytest.raises(ValueError, match=rf"schedule: the SPMD executor runs \['gpipe'\], got '{schedule}'"):
        spmd.SpmdPipeline(model(), T.uniform(2), schedule=schedule, microbatches=2)


def test_refuses_bad_microbatches_tokens_and_timeline():
    with pytest.raises(ValueError, match=r"microbatches: expected a whole number >= 1, got 0"):
        spmd.SpmdPipeline(model(), T.uniform(2), microbatches=0)
    pipe = spmd.SpmdPipeline(model(), T.uniform(2, data=2), microbatches=2)
    with pytest.raises(ValueError, match=r"tokens: microbatch size 3 \(batch 6 / 2 microbatches\) is not divisible by site 's0' data=2; "
                                         r"use a batch that is a multiple of 4"):
        pipe.grads(batch(6))
    with pytest.raises(ValueError, match=r"tokens: expected an integer array"):
        pipe.grads(np.zeros((8, 17), np.float32))
    with pytest.raises(ValueError, match=r"timeline: .* expected timeline=False, got True"):
        pipe.grads(batch(8), timeline=True)


def test_trainer_refuses_an_unknown_executor():
    with pytest.raises(ValueError, match=r"executor: expected 'mpmd' or 'spmd', got 'fast'"):
        hxtrain.Trainer(model(), T.uniform(2), executor="fast")


def test_cli_trains_with_the_spmd_executor(capsys):
    from hxtrain.cli import main

    rc = main(["train", "--model", "tiny", "--steps", "3", "--executor", "spmd", "--no-progress", "--sample-tokens", "0",
               "--microbatches", "2", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "executor spmd" in out and "schedule gpipe" in out
    assert "done: 3 steps" in out
    first, last = (float(x) for x in out.split("done: 3 steps, loss ")[1].split(",")[0].split(" -> "))
    assert np.isfinite(first) and np.isfinite(last) and last < first
