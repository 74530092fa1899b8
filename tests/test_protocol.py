"""The pipeline protocol's errors, the partition checks and the batch checks: each message names what is wrong."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hxtrain
from hxtrain.core import parts
from hxtrain.core import placement
from hxtrain.config import topology as T
from models import gpt, toy
from tests.helpers import assert_trees_close, rel_err

CFG = gpt.GPTConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_ff=32)


def test_tied_embeddings_are_refused_with_the_shared_path():
    tied = gpt.build(gpt.GPTConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32, tie_embeddings=True))
    with pytest.raises(parts.ProtocolError, match=r"model\.embed\.wte is also model\.head\.wte \(tied embeddings\)"):
        parts.split_model(tied)


def test_missing_parts_are_named():
    class NoHead(nnx.Module):
        def __init__(self):
            self.embed = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
            self.blocks = nnx.List([nnx.Linear(2, 2, rngs=nnx.Rngs(0))])

    with pytest.raises(parts.ProtocolError, match=r"NoHead lacks \['head'\]"):
        parts.split_model(NoHead())


def test_blocks_of_different_shapes_are_refused():
    model = gpt.build(CFG)
    with nnx.use_eager_sharding(False):
        model.blocks[2] = gpt.Block(gpt.GPTConfig(seq_len=8, d_model=16, n_heads=2, n_layers=4, d_ff=64), nnx.Rngs(1))
    with pytest.raises(parts.ProtocolError, match=r"model\.blocks\[2\] differs"):
        parts.split_model(model)


@pytest.mark.parametrize("blocks,match", [
    ([3, 2], r"\[3, 2\] adds up to 5 blocks but the model has 4"),
    ([4, 0], r"every stage needs a whole number >= 1 of blocks, got \[4, 0\]"),
    ([1, 1, 2], r"expected 2 entries \(one per stage\), got 3"),
])
def test_bad_partitions(blocks, match):
    with pytest.raises(placement.PlacementError, match=match):
        hxtrain.Pipeline(gpt.build(CFG), T.uniform(2), microbatches=2, partition=blocks)


def test_more_sites_than_blocks():
    small = gpt.build(gpt.GPTConfig(seq_len=8, d_model=16, n_heads=2, n_layers=2, d_ff=32))
    with pytest.raises(placement.PlacementError, match="4 pipeline stages but the model has 2 blocks"):
        hxtrain.Pipeline(small, T.uniform(4), microbatches=2)


def test_batch_checks_name_the_site_and_the_fix():
    pipe = hxtrain.Pipeline(gpt.build(CFG), T.uniform(2, data=2), microbatches=2)
    tokens = np.zeros((6, 9), np.int32)
    with pytest.raises(ValueError, match=r"microbatch size 3 .* not divisible by site 's0' data=2; use a batch "
                                         r"that is a multiple of 4"):
        pipe.loss_and_grads(tokens)
    with pytest.raises(ValueError, match=r"tokens: expected an integer array \[batch, seq\+1\], got float32"):
        pipe.loss_and_grads(np.zeros((4, 9), np.float32))


def test_microbatches_must_be_positive():
    with pytest.raises(ValueError, match="microbatches: expected a whole number >= 1, got 0"):
        hxtrain.Pipeline(gpt.build(CFG), T.uniform(2), microbatches=0)


def test_layer_shares_from_the_topology_are_used():
    topo = T.uniform(2, layers=[3, 1])
    pipe = hxtrain.Pipeline(gpt.build(CFG), topo, microbatches=2)
    assert pipe.ranges == ((0, 3), (3, 4))


class _LogitsReadout(toy.Readout):
    """A head as most Flax decoders have one: it returns logits, and the loss is computed elsewhere."""

    def __call__(self, h):  # [B, T, D] -> [B, T, V]
        return h @ self.proj[...]


def test_a_head_that_returns_logits_is_pipelined_and_samples_without_rewriting_it():
    cfg = toy.ToyConfig(n_layers=4)
    model = toy.Mixer(cfg, nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model.head = _LogitsReadout(cfg, nnx.Rngs(1))
    model.cfg = cfg  # context and vocabulary, for sampling

    def reference(model, tokens):  # the user's own loss: cross-entropy of the logits
        h = model.embed(tokens[:, :-1])
        for block in model.blocks:
            h = block(h)
        return optax.softmax_cross_entropy_with_integer_labels(model.head(h), tokens[:, 1:]).mean()

    tokens = np.random.default_rng(0).integers(0, 256, (8, cfg.seq_len + 1)).astype(np.int32)
    ref_loss, ref_grads = nnx.value_and_grad(reference)(model, jnp.asarray(tokens))
    loss, grads = hxtrain.Pipeline(model, T.uniform(2), schedule="1f1b", microbatches=2).loss_and_grads(tokens)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)
    greedy = hxtrain.generate(model, [1, 2, 3], 4, temperature=0, cache=False)[0]
    seq = [1, 2, 3]
    for token in greedy:  # each greedy token is the argmax of the model's own logits on the text so far
        h = model.embed(jnp.asarray([seq]))
        for block in model.blocks:
            h = block(h)
        assert token == int(jnp.argmax(model.head(h)[0, -1]))
        seq.append(int(token))
    with pytest.raises(hxtrain.ProtocolError, match="blocks\\[0\\] lacks init_cache"):
        hxtrain.generate(model, [1, 2, 3], 4, temperature=0)  # a KV cache needs the blocks' decode


class _ScannedMixer(nnx.Module):
    """The usual Flax layer stack: one GatedBlock made under nnx.vmap (every param [L, ...]), run with nnx.scan.
    `layer_axis` names the stack's axis in the params' metadata; without it, `cfg` is what confirms L."""

    def __init__(self, cfg: toy.ToyConfig, rngs: nnx.Rngs, *, layer_axis: bool):
        self.meta = {nnx.PARTITION_NAME: "layers"} if layer_axis else {}

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=self.meta)
        def stack(rngs):
            return toy.GatedBlock(cfg, rngs)

        with nnx.use_eager_sharding(False):
            self.embed, self.blocks, self.head = toy.Embed(cfg, rngs), stack(rngs), toy.Readout(cfg, rngs)
        if not layer_axis:
            self.cfg = cfg

    def __call__(self, tokens):  # [B, T+1] -> scalar mean loss
        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata=self.meta)
        def run(h, block):
            return block(h)

        return self.head(run(self.embed(tokens[:, :-1]), self.blocks), tokens[:, 1:])


@pytest.mark.parametrize("layer_axis", [True, False], ids=["layer-axis-name", "cfg-n_layers"])
def test_a_scanned_stack_pipelines_unchanged(layer_axis):
    cfg = toy.ToyConfig(n_layers=4)
    model = _ScannedMixer(cfg, nnx.Rngs(0), layer_axis=layer_axis)
    split = hxtrain.split_model(model)
    with nnx.use_eager_sharding(False):
        unstacked = parts.split_model(toy.Mixer(cfg, nnx.Rngs(0)))
    assert split.scanned and split.n_layers == 4 and not unstacked.scanned
    assert split.block_axes == unstacked.block_axes  # the layer axis's name is dropped per block
    tokens = np.random.default_rng(0).integers(0, 256, (8, cfg.seq_len + 1)).astype(np.int32)
    ref_loss, ref_grads = nnx.value_and_grad(lambda m, t: m(t))(model, jnp.asarray(tokens))
    pipe = hxtrain.Pipeline(model, T.uniform(2, data=2, tensor=2), schedule="1f1b", microbatches=2)
    loss, grads = pipe.loss_and_grads(tokens)  # grads stacked [L, ...] like the model's own
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)
    assert_trees_close(pipe.params_state(), nnx.state(model, nnx.Param), rtol=0, what="params")
    trained = pipe.trained_model()
    assert trained.blocks.gate.shape == (4, cfg.width, cfg.hidden)
    assert rel_err(trained(jnp.asarray(tokens)), ref_loss) <= 1e-5
    if layer_axis:  # the SPMD path takes the same parts, and loads a stacked state back into its layout
        from hxtrain.engine.spmd import SpmdPipeline

        spmd = SpmdPipeline(model, T.uniform(2), microbatches=2)
        loss, grads = spmd.loss_and_grads(tokens)
        assert rel_err(loss, ref_loss) <= 1e-5
        assert_trees_close(grads, ref_grads, rtol=1e-5)
        state = nnx.state(model, nnx.Param)
        assert_trees_close(spmd.as_state(spmd.stack_state(state)), state, rtol=0, what="params")


def test_a_single_module_that_is_not_a_stack_is_refused():
    cfg = toy.ToyConfig(n_layers=2)
    model = toy.Mixer(cfg, nnx.Rngs(0))
    with nnx.use_eager_sharding(False):
        model.blocks = toy.GatedBlock(cfg, nnx.Rngs(0))  # gain [24], down [48, 24]: no common layer axis
    with pytest.raises(hxtrain.ProtocolError, match=r"Mixer\.blocks is one GatedBlock module, not an nnx\.List of "
                                                     r"blocks nor a scanned stack: .* got \{'down': 48, 'gain': 24"):
        hxtrain.split_model(model)
    with nnx.use_eager_sharding(False):  # a stack, but nothing confirms that the 2 in front counts layers
        model.blocks = nnx.vmap(lambda r: toy.GatedBlock(cfg, r))(nnx.Rngs(0).split(2))
    with pytest.raises(hxtrain.ProtocolError, match=r"Mixer\.blocks is one GatedBlock module whose params all lead "
                                                     r"with 2, but neither Mixer\.cfg\.n_layers nor a layer axis"):
        hxtrain.split_model(model)


def _scanned_llama(seed: int = 0):
    """llama-tiny whose blocks are one nnx.vmap-ed stack holding the nnx.List model's params, stacked."""
    from models import llama

    listed = llama.build("llama-tiny", seed=seed)
    cfg = listed.cfg

    @nnx.split_rngs(splits=cfg.n_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stack(rngs):
        return llama.Block(cfg, rngs)

    scanned = llama.build("llama-tiny", seed=seed)
    with nnx.use_eager_sharding(False):
        scanned.blocks = stack(nnx.Rngs(seed))
    state = nnx.state(scanned.blocks, nnx.Param)
    nnx.replace_by_pure_dict(state, parts.stack([nnx.to_pure_dict(nnx.state(b, nnx.Param)) for b in listed.blocks]))
    nnx.update(scanned.blocks, state)
    return listed, scanned


def test_a_scanned_stack_samples_with_its_kv_cache_as_the_listed_model_does():
    from hxtrain.generation.forward import Stages

    listed, scanned = _scanned_llama()
    assert parts.split_model(scanned).scanned and parts.n_blocks(scanned) == listed.cfg.n_layers
    assert parts.has_generation(scanned)  # the stack's block class has init_cache and decode
    for stages in (Stages.local, lambda m: Stages.pipelined(m, T.uniform(2, tensor=2))):
        want = hxtrain.generate(stages(listed), [5, 6, 7], 6, temperature=0)
        got = hxtrain.generate(stages(scanned), [5, 6, 7], 6, temperature=0)
        np.testing.assert_array_equal(got, want)
