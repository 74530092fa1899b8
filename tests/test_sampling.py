"""Generation: the KV cache against recomputing, pipelined against one device, seeds, errors, loading, the CLI.

bfloat16 tolerance (TINY, PROMPT, N = 9 greedy tokens, CPU): first-step logits within rel 6.7e-3 of the float32 ones
(max |a-b| / max |b|; the mixed 2-site forward 7.3e-3), asserted <= 2e-2 and > 1e-4 (a bf16 run as exact as fp32
did not compute in bf16). Cached against recomputed bf16 logits differ by at most 0.0039 (2 bf16 ulps at the
logits' scale ~0.4) while the top-1 margins are >= 0.0078, except row 0 step 5 where the cached logits of tokens
24 and 194 tie (argmax takes the lower id in both runs, but a change in XLA's rounding could flip it). So the bf16
cache test compares the first 4 greedy tokens only, where every margin is above the difference.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hxtrain import cli
from hxtrain.checkpoints.checkpoint import CheckpointError
from hxtrain.checkpoints.export import export
from hxtrain.config.topology import uniform
from hxtrain.core.parts import ProtocolError, has_generation
from hxtrain.data.tokenizer import ByteTokenizer
from hxtrain.generation import GenerationError, Stages, generate, load_model, sample_text
from models import gpt, toy
from tests.helpers import assert_trees_close, model, rel_err

PROMPT = [[72, 101, 108, 108, 111], [87, 111, 114, 108, 100]]  # "Hello", "World": [2, 5]
N = 9  # 5 + 9 = 14 of TINY's 16 positions
SAMPLED = dict(temperature=0.8, top_k=40, top_p=0.9)


@pytest.fixture(scope="module")
def local():
    return Stages.local(model())


def test_embedding_at_an_offset_equals_slicing_the_full_one():
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
    embed = model().embed

    @jax.jit
    def errors(tokens, start):  # one program (eager ops would compile one by one)
        whole = embed(tokens)[:, 5:9]
        return jnp.abs(embed(tokens[:, 5:9], 5) - whole).max(), jnp.abs(embed(tokens[:, 5:9], start) - whole).max()

    assert [float(e) for e in errors(tokens, jnp.int32(5))] == [0.0, 0.0]  # a fixed and a traced offset


def test_block_decode_in_pieces_equals_the_training_forward():
    block = model().blocks[0]

    @jax.jit
    def pieces(h):
        cache = block.init_cache(2, 16)
        first, cache = block.decode(h[:, :10], cache, 0)
        second, cache = block.decode(h[:, 10:12], cache, jnp.int32(10))
        return first, second, cache, block(h)

    first, second, cache, whole = pieces(jax.random.normal(jax.random.key(1), (2, 16, 32)))
    assert cache["k"].shape == (2, 16, 4, 8) and float(jnp.abs(cache["v"][:, 12:]).max()) == 0
    assert rel_err(first, whole[:, :10]) <= 1e-6 and rel_err(second, whole[:, 10:12]) <= 1e-6


def test_greedy_with_the_cache_equals_recomputing_every_step(local):
    cached, logits = generate(local, PROMPT, N, temperature=0, return_logits=True)
    full, full_logits = generate(local, PROMPT, N, temperature=0, cache=False, return_logits=True)
    assert cached.shape == (2, N) and cached.dtype == np.int32
    np.testing.assert_array_equal(cached, full)
    assert logits.shape == (2, N, 256) and rel_err(logits, full_logits) <= 1e-5
    # and the first token is the argmax of the plain model's logits
    plain = jax.jit(lambda t: model()(t)[:, -1])(jnp.asarray(PROMPT))
    assert np.array_equal(cached[:, 0], np.argmax(np.asarray(plain), axis=-1))


def test_pipelined_sampling_equals_one_device(local):
    sites = Stages.pipelined(model(), uniform(2, tensor=2), partition=[5, 3])
    assert sites.ranges == ((0, 5), (5, 8)) and "stage 1: blocks[5:8] + head" in sites.describe()
    np.testing.assert_array_equal(generate(sites, PROMPT, N, temperature=0), generate(local, PROMPT, N, temperature=0))
    np.testing.assert_array_equal(generate(sites, PROMPT, N, seed=5, **SAMPLED),
                                  generate(local, PROMPT, N, seed=5, **SAMPLED))


def test_bf16_computes_in_bf16_and_greedy_with_the_cache_equals_recomputing(local):
    bf16 = Stages.local(model(), compute_dtype="bfloat16")
    assert bf16.compute_dtypes == ("bfloat16",) and bf16.describe().endswith("compute bfloat16")
    assert {c.dtype for c in jax.tree.leaves(bf16.init_caches(2, 14))} == {jnp.dtype(jnp.bfloat16)}
    cached, logits = generate(bf16, PROMPT, 4, temperature=0, return_logits=True)  # 4: see the module doc
    full, full_logits = generate(bf16, PROMPT, 4, temperature=0, cache=False, return_logits=True)
    np.testing.assert_array_equal(cached, full)
    assert logits.dtype == np.float32 and rel_err(logits, full_logits) <= 2e-2  # sampling reads fp32 logits
    fp32 = generate(local, PROMPT, 1, temperature=0, return_logits=True)[1]
    assert 1e-4 < rel_err(logits[:, 0], fp32[:, 0]) <= 2e-2


def test_pipelined_stages_compute_in_their_sites_dtype_unless_one_is_given(local):
    base = uniform(2, tensor=2)
    mixed = dataclasses.replace(base, sites=(dataclasses.replace(base.sites[0], compute_dtype="bfloat16"),
                                             base.sites[1]))
    sites = Stages.pipelined(model(), mixed, partition=[5, 3])
    assert sites.compute_dtypes == ("bfloat16", "float32")  # as training resolves them (site_compute_dtype)
    assert [{c.dtype for c in jax.tree.leaves(c)} for c in sites.init_caches(2, 14)] == [
        {jnp.dtype(jnp.bfloat16)}, {jnp.dtype(jnp.float32)}]
    logits = generate(sites, PROMPT, 1, temperature=0, return_logits=True)[1]
    fp32 = generate(local, PROMPT, 1, temperature=0, return_logits=True)[1]
    assert 1e-4 < rel_err(logits, fp32) <= 2e-2
    explicit = Stages.pipelined(model(), mixed, partition=[5, 3], compute_dtype="float32")
    assert explicit.compute_dtypes == ("float32", "float32")  # an explicit dtype is honoured on every site
    with pytest.raises(GenerationError, match=r"^--compute-dtype: float32 asked for, but the given Stages compute "
                                              r"in bfloat16, float32; build them with compute_dtype='float32'$"):
        generate(sites, PROMPT, 1, compute_dtype="float32")


def test_a_seed_gives_the_same_tokens_and_another_seed_others(local):
    a = generate(local, PROMPT, N, seed=1, **SAMPLED)
    np.testing.assert_array_equal(a, generate(local, PROMPT, N, seed=1, **SAMPLED))
    assert not np.array_equal(a, generate(local, PROMPT, N, seed=2, **SAMPLED))
    np.testing.assert_array_equal(generate(local, PROMPT, N, temperature=1.0, top_k=1, seed=3),
                                  generate(local, PROMPT, N, temperature=0))
    # a tiny nucleus keeps only the most likely token: greedy again
    np.testing.assert_array_equal(generate(local, PROMPT, N, top_p=1e-6, seed=3),
                                  generate(local, PROMPT, N, temperature=0))


@pytest.mark.parametrize("prompt,n,kw,match", [
    ([], 3, {}, r"^--prompt: empty; give at least one token of text$"),
    ([1, 2, 300], 3, {}, r"^--prompt: token 300 at position 2 is outside the model's vocabulary of 256 \(0\.\.255\)$"),
    ([1] * 10, 8, {}, r"^--tokens: prompt of 10 tokens \+ 8 new tokens = 18 exceeds the model's context of 16 "
                      r"tokens \(seq_len\); ask for at most 6$"),
    ([1], 0, {}, r"^--tokens: expected a whole number >= 1 of new tokens, got 0$"),
    ([1], 3, {"temperature": -0.5}, r"^--temperature: expected a finite number >= 0 \(0 = greedy\), got -0\.5$"),
    ([1], 3, {"top_k": 0}, r"^--top-k: expected a whole number >= 1 \(1 = greedy\), got 0$"),
    ([1], 3, {"top_p": 0.0}, r"^--top-p: expected a number in \(0, 1\] \(1 = off\), got 0\.0$"),
    ([1], 3, {"top_p": 1.5}, r"^--top-p: expected a number in \(0, 1\] \(1 = off\), got 1\.5$"),
    ([1], 3, {"compute_dtype": "bf16"}, r"^--compute-dtype: expected one of float32, bfloat16, float16, got 'bf16'$"),
])
def test_bad_requests_are_one_line_errors(local, prompt, n, kw, match):
    with pytest.raises(GenerationError, match=match):
        generate(local, prompt, n, **kw)


def test_a_model_without_the_generation_protocol_is_named():
    mixer = toy.Mixer(toy.ToyConfig(width=8, hidden=8, n_layers=1), nnx.Rngs(0))
    with pytest.raises(ProtocolError, match=r"^Mixer.blocks\[0\] lacks init_cache: generation needs blocks\[0\]"):
        has_generation(mixer)
    assert has_generation(model())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run folder of 2 steps of TINY on one device (the `hxtrain train` CLI) and its export."""
    root = tmp_path_factory.mktemp("sampling")
    (root / "one.toml").write_text('name = "one"\n[[sites]]\nname = "a"\nbackend = "cpu"\n'
                                   'devices = 1\ndata = 1\ntensor = 1\n')
    (root / "text.txt").write_bytes(bytes(range(32, 127)) * 300)
    assert cli.main(["train", "--mesh", str(root / "one.toml"), "--model", "tiny", "--microbatches", "2",
                     "--batch-size", "8", "--data", str(root / "text.txt"), "--no-progress", "--steps", "2",
                     "--sample-tokens", "0", "--out", str(root / "run")]) == 0
    return dict(run=root / "run", export=export(root / "run", root / "export"), root=root)


def test_load_from_a_run_and_from_its_export(saved):
    m_run, tok, info = load_model(saved["run"])
    m_exp, _, info_exp = load_model(saved["export"])
    assert (info["kind"], info["model"], info["step"]) == ("run", "GPT", 2) and info_exp["kind"] == "export"
    assert isinstance(m_run, gpt.GPT) and m_run.cfg == gpt.TINY and isinstance(tok, ByteTokenizer)
    assert_trees_close(nnx.state(m_exp, nnx.Param), nnx.state(m_run, nnx.Param), rtol=0, what="params")
    text = sample_text(m_exp, tok, "Hello", 6, temperature=0)
    assert text.startswith("Hello") and text == tok.decode(list(b"Hello") + generate(m_run, list(b"Hello"), 6,
                                                                                          temperature=0)[0].tolist())


def test_sample_cli_prints_the_prompt_and_its_continuation(saved, capsys):
    knobs = ["--prompt", "Hi there", "--tokens", "5", "--temperature", "0.7", "--top-k", "20", "--top-p", "0.9",
             "--seed", "4"]
    assert cli.main(["sample", "--from", str(saved["export"]), *knobs]) == 0
    got = capsys.readouterr()
    assert got.out.startswith("Hi there") and "5 tokens in" in got.err and "GPT from export" in got.err
    assert cli.main(["sample", "--from", str(saved["run"]), "--step", "2", "--mesh", "local", "--no-cache",
                     *knobs]) == 0
    again = capsys.readouterr()
    assert "stage 1: blocks[4:8] + head" in again.err and again.err.count("compute float32") == 2  # CPU policy
    assert again.out == got.out  # the run and its export, one device or two sites, cached or not: the same text
    assert cli.main(["sample", "--from", str(saved["export"]), "--mesh", "local", "--compute-dtype", "bfloat16",
                     "--no-cache", *knobs]) == 0
    bf16 = capsys.readouterr()
    assert bf16.out.startswith("Hi there") and bf16.err.count("compute bfloat16") == 2


def test_sample_cli_refuses_what_it_cannot_load(saved, tmp_path, capsys):
    def error(path, *more):
        assert cli.main(["sample", "--from", str(path), "--prompt", "x", "--tokens", "2", *more]) == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    hint = "give a run folder (hxtrain train --out) or an export folder (hxtrain export --out)"
    assert error(tmp_path / "nope") == f"hxtrain sample: error: --from: {str(tmp_path / 'nope')!r} does not exist; {hint}"
    (tmp_path / "empty").mkdir()
    assert error(tmp_path / "empty") == (f"hxtrain sample: error: --from: {str(tmp_path / 'empty')!r} is neither a "
                                         f"run folder (no checkpoints/ in it) nor an export folder (no model.json + "
                                         f"params/); {hint}")
    (tmp_path / "dead" / "checkpoints").mkdir(parents=True)  # a run that died before its first checkpoint
    assert error(tmp_path / "dead").startswith("hxtrain sample: error: no complete checkpoint in ")
    assert error(saved["export"], "--tokens", "30").endswith("exceeds the model's context of 16 tokens (seq_len); "
                                                            "ask for at most 15")
    assert error(saved["export"], "--compute-dtype", "fp8") == ("hxtrain sample: error: --compute-dtype: expected "
                                                                "one of float32, bfloat16, float16, got 'fp8'")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        load_model(tmp_path / "dead")
