"""The pipeline protocol's errors, the partition checks and the batch checks: each message names what is wrong."""

import numpy as np
import pytest
from flax import nnx

import hxtrain
from hxtrain.core import parts
from hxtrain.core import placement
from hxtrain.config import topology as T
from models import gpt

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
