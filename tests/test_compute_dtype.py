"""Per-site compute dtype: a site whose policy is bfloat16 really computes in bf16, with float32 master weights.

Tolerance against the fp32 single-device reference: bf16 keeps 8 significant bits (each rounding up to 2**-9 ~
2e-3 relative), and a gradient leaf of the bf16 site goes through ~20 rounded ops (4 blocks of matmuls and layer
norms, the head, and their transposes). Measured on TINY: per-leaf max|a-b| / max|b| up to ~3e-2 (the smallest
leaves, layer-norm scales of 32 values), the loss within ~3e-5. So grads rel <= 6e-2, loss rel <= 2e-3; fp32 stays
at <= 1e-5, and the bf16 run must be *worse* than 1e-4 somewhere (it is not secretly fp32).
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import hxtrain
from hxtrain.core import placement
from hxtrain.engine import spmd
from hxtrain.core import programs as stage
from hxtrain.config import topology as T
from hxtrain.backends import BackendError
from hxtrain.core.optim import OptimizerConfig, SiteOptimizer
from models import gpt
from tests.helpers import assert_trees_close, chunked_reference, rel_err

MB, M = 4, 2  # microbatch size and count: batch 8
SEQ, WIDTH = gpt.TINY.seq_len, gpt.TINY.d_model
BF16_DOT = re.compile(r"dot_general[^\n]*bf16")


@functools.cache
def model():
    return gpt.build(gpt.TINY, seed=0)


@functools.cache
def batch() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (M * MB, SEQ + 1)).astype(np.int32)


@functools.cache
def reference():
    return chunked_reference(gpt.loss, model(), batch(), MB)


def topo(dtypes=(None, None), codec="none") -> T.Topology:
    """2 CPU sites x data 2; site i's compute_dtype = dtypes[i] (None: the policy's default, float32 on CPU)."""
    base = T.uniform(2, data=2)
    sites = tuple(dataclasses.replace(s, compute_dtype=d) for s, d in zip(base.sites, dtypes))
    links = tuple(dataclasses.replace(ln, activations=codec, cotangents=codec) for ln in base.links)
    return dataclasses.replace(base, sites=sites, links=links)


def _forward_text(pipe, i: int) -> str:
    """StableHLO of stage i's forward program, lowered (not run) on its own input: tokens on stage 0."""
    s = pipe.stages[i]
    x = (jax.ShapeDtypeStruct((MB, SEQ), jnp.int32) if s.role.first else
         jax.ShapeDtypeStruct((MB, SEQ, WIDTH), jnp.dtype(pipe.stages[i - 1].role.compute_dtype)))
    return stage.forward.lower(s.role, s.params, x).as_text()


def test_policy_lookup_per_site():
    meshes = placement.site_meshes(topo())
    assert placement.site_compute_dtype(topo().sites[0], meshes[0]) == "float32"  # CPU default
    assert placement.site_compute_dtype(topo(("bfloat16", None)).sites[0], meshes[0]) == "bfloat16"
    h100 = dataclasses.replace(topo().sites[0], backend="cuda", device_kind="H100")  # another process's site
    assert placement.site_compute_dtype(h100) == "bfloat16"
    assert placement.site_compute_dtype(dataclasses.replace(h100, compute_dtype="float32")) == "float32"
    with pytest.raises(BackendError, match=r"compute_dtype 'bfloat16' is not supported by device 'Ascend 910A'"):
        placement.site_compute_dtype(dataclasses.replace(h100, device_kind="Ascend910A", compute_dtype="bfloat16"))
    pipe = hxtrain.Pipeline(model(), topo(("bfloat16", None)), schedule="gpipe", microbatches=M)
    assert [s.role.compute_dtype for s in pipe.stages] == ["bfloat16", "float32"]
    assert "compute bfloat16" in pipe.describe()


def test_fp32_default_on_cpu_has_no_bf16_in_its_programs():
    pipe = hxtrain.Pipeline(model(), topo(), schedule="gpipe", microbatches=M)
    assert [s.role.compute_dtype for s in pipe.stages] == ["float32", "float32"]
    text = _forward_text(pipe, 0)
    # no 16-bit float anywhere (newer JAX lowers some f32 -> f32 / i32 converts of constants, so not "no convert")
    assert "dot_general" in text and "bf16" not in text and "f16>" not in text


def test_bf16_site_computes_in_bf16_keeps_fp32_masters_and_matches_the_reference():
    pipe = hxtrain.Pipeline(model(), topo(("bfloat16", None)), schedule="gpipe", microbatches=M)
    assert BF16_DOT.search(_forward_text(pipe, 0)), "site s0 (bfloat16) has no bf16 matmul"
    assert jax.tree.leaves(pipe.stages[0].params)[0].dtype == jnp.float32  # masters stay fp32 on the bf16 site

    loss, grads = pipe.loss_and_grads(batch(), poison=True)  # poisoned slots are bf16 too: results unchanged
    ref_loss, ref_grads = reference()
    assert loss.dtype == jnp.float32 and rel_err(loss, ref_loss) <= 2e-3
    assert {a.dtype for a in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
    assert_trees_close(grads, ref_grads, rtol=6e-2)
    worst = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    assert worst > 1e-4, f"max leaf error {worst:.2g}: as exact as fp32, so the bf16 site did not compute in bf16"

    # bf16 activations cross s0 -> s1 with codec "none": 2 bytes a value, half of fp32; the cotangent of a bf16
    # input comes back in bf16 too.
    half = M * MB * SEQ * WIDTH * 2
    stats = pipe.transport.stats
    assert (stats[(0, 1, "act")].bytes, stats[(1, 0, "cot")].bytes) == (half, half)


def _train(topology, steps=4):
    pipe = hxtrain.Pipeline(model(), topology, schedule="1f1b", microbatches=M)
    opt = SiteOptimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=steps), pipe.stages)
    losses = []
    for _ in range(steps):
        loss, grads, sqs = pipe.grads(batch())
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}
        pipe.set_params(opt.step(pipe.stages, grads, sqs)[0])
        losses.append(float(loss))
    return pipe, opt, losses


@pytest.mark.parametrize("dtypes,codec", [(("bfloat16", None), "none"), (("bfloat16", "bfloat16"), "none"),
                                          (("bfloat16", "bfloat16"), "int8")], ids=["mixed-none", "bf16-none",
                                                                                   "bf16-int8"])
def test_bf16_sites_still_train_with_fp32_params_and_optimizer_state(dtypes, codec):
    pipe, opt, losses = _train(topo(dtypes, codec))
    assert losses[-1] < losses[0] - 0.2, f"loss did not fall: {losses}"
    floats = [a for a in jax.tree.leaves(([s.params for s in pipe.stages], opt.states))
              if jnp.issubdtype(a.dtype, jnp.floating)]
    assert floats and all(a.dtype == jnp.float32 for a in floats)
    per_step = M * MB * SEQ * WIDTH * 2 if codec == "none" else M * MB * SEQ * (WIDTH + 4)  # int8: + fp32 scale/row
    assert pipe.transport.stats[(0, 1, "act")].bytes == len(losses) * per_step


# ---- the SPMD executor: one program, so one compute dtype for every site ----------------------------------------


def test_spmd_refuses_sites_with_different_compute_dtypes():
    with pytest.raises(ValueError, match=r"<code>: sites\[1\] \('s1'\) compute_dtype: the SPMD executor compiles "
                                         r"one program over every site, so every site computes in one dtype; "
                                         r"expected 'float32' like sites\[0\] \('s0'\), got 'bfloat16'; .*"
                                         r"--executor mpmd"):
        spmd.SpmdPipeline(model(), topo((None, "bfloat16")), microbatches=M)


def test_spmd_computes_in_the_shared_dtype_and_matches_the_reference():
    def pipe_and_text(dtypes):
        p = spmd.SpmdPipeline(model(), topo(dtypes), microbatches=M)
        tokens = jax.ShapeDtypeStruct((M, MB, SEQ + 1), jnp.int32, sharding=NamedSharding(p.mesh, P(None, "data")))
        return p, spmd._step.lower(p._program, p.params, tokens, np.asarray(p.counts, np.int32),
                                   np.bool_(False)).as_text()

    p, text = pipe_and_text((None, None))
    assert p._program.dtype == jnp.float32 and "bf16" not in text
    p, text = pipe_and_text(("bfloat16", "bfloat16"))
    assert p._program.dtype == jnp.bfloat16 and BF16_DOT.search(text)
    loss, grads = p.loss_and_grads(batch())
    ref_loss, ref_grads = reference()
    assert loss.dtype == jnp.float32 and rel_err(loss, ref_loss) <= 2e-3
    assert {a.dtype for a in jax.tree.leaves(grads)} == {np.dtype(np.float32)}
    assert_trees_close(grads, ref_grads, rtol=6e-2)
    ticks = M + 2 - 1  # every tick ppermutes one bf16 activation each way, bubbles included
    assert p.transport.bytes_per_link() == {"0->1": ticks * MB * SEQ * WIDTH * 2, "1->0": ticks * MB * SEQ * WIDTH * 2}
