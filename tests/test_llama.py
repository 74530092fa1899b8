"""The Llama-style decoder (models/llama.py): its config checks, cached decoding equal to the full forward, the
pipeline under zero-bubble and with fewer KV heads than tensor shards equal to the single-device reference (the rest
of the equivalence matrix is test_pipeline's), the model registry and the cost model's count of its parameters."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import hxtrain
from hxtrain.config import topology as T
from hxtrain.core import model_registry
from hxtrain.planning import costmodel as cm
from models import llama
from tests.helpers import chunked_reference, assert_trees_close, batch, rel_err

MB = 4  # microbatch size, as in test_pipeline
TINY = llama.PRESETS["llama-tiny"]


@functools.cache
def _model(**changes):
    return llama.build(dataclasses.replace(TINY, **changes), seed=0)


@functools.cache
def _reference(n: int, **changes):
    """(loss, grads) of the plain model on batch(n), on one device, one compiled program per model."""
    return chunked_reference(llama.loss, _model(**changes), batch(n), MB)


@pytest.mark.parametrize("changes,match", [
    ({"d_model": 30}, "d_model=30 must be divisible by n_heads=4"),
    ({"n_kv_heads": 3}, "n_heads=4 must be divisible by n_kv_heads=3"),
    ({"d_model": 12, "n_heads": 4, "n_kv_heads": 1}, "head_dim = d_model / n_heads = 3 must be even"),
])
def test_config_errors_name_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(TINY, **changes)


def test_cached_decoding_equals_the_full_forward():
    """Prefill 6 tokens, a chunk of 4 at a traced start, then one token at a time (a scan, so `start` is traced
    there too): the logits of model(tokens). One jitted program, so one compile."""
    graphdef, state = nnx.split(_model(n_layers=2))  # 2 blocks: each keeps its own cache; fewer to compile
    tokens = jnp.asarray(batch(2)[:, :TINY.seq_len])  # [2, 16]

    @jax.jit
    def run(state, tokens, start):  # start: int32 6, traced
        model = nnx.merge(graphdef, state)

        def step(caches, chunk, start):
            h = model.embed(chunk, start)
            caches = list(caches)
            for i, block in enumerate(model.blocks):
                h, caches[i] = block.decode(h, caches[i], start)
            return caches, model.head.logits(h)

        caches = [b.init_cache(2, TINY.seq_len) for b in model.blocks]
        caches, first = step(caches, tokens[:, :6], 0)
        caches, second = step(caches, jax.lax.dynamic_slice_in_dim(tokens, start, 4, axis=1), start)
        singles = jnp.arange(10, TINY.seq_len)  # positions 10..15, one token each
        caches, rest = jax.lax.scan(lambda c, p: step(c, jax.lax.dynamic_slice_in_dim(tokens, p, 1, axis=1), p),
                                    caches, singles)  # rest [6, 2, 1, V]
        rest = jnp.moveaxis(rest[:, :, 0], 0, 1)  # [2, 6, V]
        return model(tokens), jnp.concatenate([first, second, rest], axis=1), caches

    full, decoded, caches = run(state, tokens, jnp.int32(6))
    assert rel_err(decoded, full) <= 1e-5
    assert caches[0]["k"].shape == (2, TINY.seq_len, TINY.n_kv_heads, TINY.head_dim)


# test_pipeline's matrix runs llama-tiny under gpipe and 1f1b on every site count and device shape; here the split
# backward of zero-bubble. 5 blocks instead of llama-tiny's 8, so that it compiles small programs: each compile
# costs seconds on 2 cores.
CASES = [  # sites, data, tensor, partition, schedule, microbatches (gpipe and 1f1b: test_pipeline's matrix)
    pytest.param(2, 1, 2, [3, 2], "zb-h1", 3, id="zbh1-S2-d1t2-uneven-M3"),
]


@pytest.mark.parametrize("sites,data,tensor,partition,schedule,m", CASES)
def test_pipeline_matches_single_device(sites, data, tensor, partition, schedule, m):
    pipe = hxtrain.Pipeline(_model(n_layers=5), T.uniform(sites, data=data, tensor=tensor), schedule=schedule,
                            microbatches=m, partition=partition)
    loss, grads = pipe.loss_and_grads(batch(m * MB))
    ref_loss, ref_grads = _reference(m * MB, n_layers=5)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)
    if tensor == 2:  # kv heads split over tensor with their query groups (n_kv_heads = 2)
        blocks = pipe.stages[0].params["blocks"]
        assert blocks["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
        assert blocks["wk"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)


def test_tensor_parallel_with_fewer_kv_heads_than_tensor_shards():
    """n_kv_heads = 1 on data 2 x tensor 2: the kv weights stay whole while the query heads are split. The stage
    programs leave `tensor` to GSPMD, so the model computes with global shapes and the grouping stays right."""
    pipe = hxtrain.Pipeline(_model(n_kv_heads=1, n_layers=2), T.uniform(1, data=2, tensor=2), schedule="1f1b",
                            microbatches=2)
    blocks = pipe.stages[0].params["blocks"]
    assert blocks["wq"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    assert blocks["wk"].sharding.spec == jax.sharding.PartitionSpec(None, None, None, None)  # 1 kv head: whole
    loss, grads = pipe.loss_and_grads(batch(2 * MB))
    ref_loss, ref_grads = _reference(2 * MB, n_kv_heads=1, n_layers=2)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)


def test_registry_builds_and_rebuilds_llama():
    model = model_registry.build("llama-tiny", n_layers=2)
    assert isinstance(model, llama.Llama) and len(model.blocks) == 2
    assert model_registry.find(" LLAMA-8B ") is llama.PRESETS["llama-8b"]
    assert model_registry.reference_loss(model) is llama.loss
    # What a checkpoint's metadata records (checkpoints.checkpoint.run_meta): class name and asdict(config).
    again = model_registry.from_config(type(model).__name__, dataclasses.asdict(model.cfg))
    assert again.cfg == model.cfg
    assert_trees_close(nnx.state(again, nnx.Param), nnx.state(model, nnx.Param), rtol=0.0, what="params")
    assert type(model_registry.find("tiny")).__name__ == "GPTConfig"  # gpt presets keep their names
    with pytest.raises(ValueError, match=r"--model: unknown model 'llama-3'; choose one of tiny, .*llama-tiny, "
                                         r"llama-small, llama-1b, llama-7b, llama-8b, llama-70b"):
        model_registry.preset("llama-3")
    with pytest.raises(ValueError, match="model 'Mamba': unknown model class; known: GPT, Llama"):
        model_registry.from_config("Mamba", {})
    with pytest.raises(ValueError, match="model 'Llama': config .* does not fit LlamaConfig"):
        model_registry.from_config("Llama", {"n_experts": 8})


def test_cost_model_counts_llama_parameters():
    counted = sum(x.size for x in jax.tree.leaves(nnx.state(_model(), nnx.Param)))
    assert cm.ModelShape.of(TINY).params == counted  # GQA k/v, SwiGLU, RMSNorm + qk-norm scales, no positions
    seven = cm.ModelShape.of(llama.PRESETS["llama-7b"])
    assert abs(seven.params - 6.74e9) / 6.74e9 < 0.01
    eight = cm.ModelShape.of(llama.PRESETS["llama-8b"])
    assert abs(eight.params - 8.03e9) / 8.03e9 < 0.01
    mm, _ = eight.block_flops(1)
    assert mm == 2 * eight.block_params - 2 * 2 * 4096  # 2 FLOPs per matmul weight, norm scales excluded
    # Tensor parallelism must split the kv heads too: 8 kv heads allow tensor 8, 2 kv heads only tensor 2.
    assert eight.splits_over(8) and not cm.ModelShape.of(TINY).splits_over(4)
