"""Every parallel path equals the unsplit model on one device (loss and every gradient leaf, fp32 rel <= 1e-5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hxtrain
from hxtrain.config import topology as T
from models import gpt, llama, toy
from tests.helpers import assert_trees_close, batch, chunked_reference, model, reference, rel_err

MB = 4  # microbatch size, fixed so that compiled stage programs are shared across cases
SHAPES = [(1, 1), (2, 1), (1, 2), (2, 2)]
UNEVEN = {2: [5, 3], 4: [3, 2, 2, 1]}


@functools.cache
def _llama():
    return llama.build(llama.PRESETS["llama-tiny"], seed=0)


FAMILIES = {"gpt": (gpt.loss, model), "llama": (llama.loss, _llama)}


@functools.cache
def _reference(family: str, n: int):
    loss, net = FAMILIES[family]
    return reference(n) if family == "gpt" else chunked_reference(loss, net(), batch(n), MB)


def _splits():
    # One case per split of the model (sites x data x tensor x even/uneven): its schedules and microbatch counts run
    # inside the case, on the split's compiled stage programs (a new split compiles for seconds; a new schedule or
    # microbatch count only dispatches). The Llama decoder runs every site count and device shape on the uneven
    # split (one site: the whole model), tensor parallelism over its KV heads included.
    for sites in (1, 2, 4):
        for data, tensor in SHAPES:
            if sites * data * tensor > 8:
                continue
            for uneven in ([False, True] if sites > 1 else [False]):
                split = f"S{sites}-d{data}t{tensor}-{'uneven' if uneven else 'even'}"
                yield pytest.param("gpt", sites, data, tensor, uneven, id=f"gpt-{split}")
                if uneven or sites == 1:
                    yield pytest.param("llama", sites, data, tensor, uneven, id=f"llama-{split}")


@pytest.mark.parametrize("family,sites,data,tensor,uneven", list(_splits()))
def test_pipeline_matches_single_device(family, sites, data, tensor, uneven):
    topo = T.uniform(sites, data=data, tensor=tensor)
    for schedule in ("gpipe", "1f1b"):
        for m in sorted({1, sites, 2 * sites + 1}):
            pipe = hxtrain.Pipeline(FAMILIES[family][1](), topo, schedule=schedule, microbatches=m,
                                    partition=UNEVEN[sites] if uneven else None)
            loss, grads = pipe.loss_and_grads(batch(m * MB))
            ref_loss, ref_grads = _reference(family, m * MB)
            where = f"{schedule} M={m}"
            assert rel_err(loss, ref_loss) <= 1e-5, f"{where}: loss {loss} vs {ref_loss}"
            assert_trees_close(grads, ref_grads, rtol=1e-5, what=f"{where}: grads")
    if family == "llama" and tensor == 2:  # the KV heads split over tensor with their query groups
        blocks = pipe.stages[0].params["blocks"]
        for w in ("wq", "wk", "wv"):
            assert blocks[w].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None), w


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_poisoned_slots_leave_results_unchanged(schedule):
    """Every mailbox slot a task reads is pre-filled with NaN; only real transfers may overwrite them."""
    pipe = hxtrain.Pipeline(model(), T.uniform(4, data=2), schedule=schedule, microbatches=5, partition=[3, 2, 2, 1])
    loss, grads = pipe.loss_and_grads(batch(5 * MB), poison=True)
    ref_loss, ref_grads = reference(5 * MB)
    assert np.isfinite(loss) and rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)
    assert pipe.transport.pending() == []  # every slot was consumed by the task it was meant for


def test_poison_is_detected_when_a_task_reads_too_early():
    """The poison check can fail: a table that runs a stage's forward before its input arrives reads NaN."""
    class Broken:
        name, virtual = "broken", 1

        def tasks(self, sites, m):
            good = hxtrain.get_schedule("gpipe").tasks(sites, m)
            first = next(t for t in good if t.stage == 1)
            return (first,) + tuple(t for t in good if t != first)

    pipe = hxtrain.Pipeline(model(), T.uniform(2), schedule=Broken(), microbatches=2)
    loss, _ = pipe.loss_and_grads(batch(2 * MB), poison=True)
    assert np.isnan(loss)
    with pytest.raises(RuntimeError, match="nothing was sent"):
        pipe.loss_and_grads(batch(2 * MB))


@pytest.mark.parametrize("sites,data", [(2, 2), (4, 1)])
def test_cross_site_bytes_equal_the_analytic_value(sites, data):
    m = 3
    pipe = hxtrain.Pipeline(model(), T.uniform(sites, data=data), schedule="1f1b", microbatches=m)
    pipe.loss_and_grads(batch(m * MB))
    cfg = gpt.TINY
    analytic = 2 * (sites - 1) * m * MB * cfg.seq_len * cfg.d_model * 4
    assert pipe.transport.total_bytes() == analytic
    per_link = pipe.transport.bytes_per_link()
    assert set(per_link) == {f"{i}->{i + 1}" for i in range(sites - 1)} | {f"{i + 1}->{i}" for i in range(sites - 1)}
    assert len(set(per_link.values())) == 1  # activations one way, cotangents the other, equal sizes


def test_second_model_follows_the_protocol():
    """A different model (gated-MLP mixer, no attention) pipelines and matches its own single-device loss."""
    cfg = toy.ToyConfig()
    mixer = toy.Mixer(cfg, nnx.Rngs(3))
    tokens = np.random.default_rng(1).integers(0, 256, (8, cfg.seq_len + 1)).astype(np.int32)
    ref_loss, ref_grads = nnx.value_and_grad(toy.loss)(mixer, jnp.asarray(tokens))
    pipe = hxtrain.Pipeline(mixer, T.uniform(2, data=2, tensor=2), schedule="1f1b", microbatches=2, partition=[4, 2])
    loss, grads = pipe.loss_and_grads(tokens)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_tensor_parallel_shards_weights_over_tensor():
    pipe = hxtrain.Pipeline(model(), T.uniform(2, data=1, tensor=2), microbatches=2)
    w1 = pipe.stages[0].params["blocks"]["w1"]
    assert w1.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert w1.addressable_shards[0].data.shape == (4, 32, 32)  # [layers, embed, mlp / tensor]


def test_one_data_reduction_per_step():
    """The per-microbatch programs hold no reduction over `data`; the step's one reduction happens in `reduce`."""
    from hxtrain.core import programs as stage

    pipe = hxtrain.Pipeline(model(), T.uniform(2, data=2, tensor=1), microbatches=2)
    s = pipe.stages[0]
    x = jax.device_put(batch(MB)[:, :-1], jax.sharding.NamedSharding(s.role.mesh, jax.sharding.PartitionSpec("data")))
    dy = jnp.zeros((MB, gpt.TINY.seq_len, gpt.TINY.d_model))
    gacc = stage.zeros_accumulator(s.params, s.shardings, s.data)
    hlo = stage.backward.lower(s.role, s.params, x, dy, gacc).compile().as_text()
    assert "all-reduce" not in hlo
    shardings = tuple(a.sharding for a in jax.tree.leaves(gacc))  # what `reduce` hands its program
    assert "all-reduce" in stage._reduce.lower(shardings, gacc).compile().as_text()


def test_training_leaves_the_callers_model_intact():
    """The optimizer donates the pipeline's buffers; they must be copies, not the caller's model arrays."""
    m = gpt.build(gpt.TINY, seed=1)
    before = nnx.to_pure_dict(nnx.state(m, nnx.Param))
    before = jax.tree.map(np.asarray, before)
    trainer = hxtrain.Trainer(m, T.uniform(2), microbatches=2, batch_size=4, max_corpus_bytes=10_000)
    trainer.fit(2, progress=False)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(m, nnx.Param)))  # raises if a buffer was deleted
    assert_trees_close(after, before, rtol=0.0, what="model")


def test_link_codecs_from_the_topology_apply_by_default():
    import dataclasses

    topo = T.uniform(2)
    topo = dataclasses.replace(topo, links=(dataclasses.replace(topo.links[0], activations="bf16"),))
    pipe = hxtrain.Pipeline(model(), topo, microbatches=2)
    loss, _ = pipe.loss_and_grads(batch(2 * MB))
    per_kind = {k[2]: v.bytes for k, v in pipe.transport.stats.items()}
    assert per_kind["act"] * 2 == per_kind["cot"]  # bf16 activations forward, fp32 cotangents back
    assert rel_err(loss, reference(2 * MB)[0]) < 1e-2  # bf16 boundary: close, not exact
