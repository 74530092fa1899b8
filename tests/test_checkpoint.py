"""Checkpoints: exact resume, restore onto other topologies, damage and kill safety, shape refusal, NaN stop.

One base run (TINY on the local topology, 2 sites x (2 x 2)) trains 4 steps saving at 2 and 4; its folder is
copied read-only as a snapshot, then the same trainer runs 2 more steps to give the uninterrupted losses.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import hxtrain
from hxtrain.checkpoints import logical
from hxtrain.checkpoints import manifest
from hxtrain.checkpoints.checkpoint import (CheckpointError, CheckpointMismatch, Checkpoints, CheckpointWarning)
from models import gpt
from tests import _ckpt_child as child
from tests.helpers import assert_trees_close, rel_err

# One worker runs this module, so its costly shared run (the session fixture below) is computed once.
pytestmark = pytest.mark.xdist_group("checkpoint")

ROOT = Path(__file__).resolve().parents[1]
KW = dict(microbatches=2, batch_size=8, max_corpus_bytes=200_000)  # microbatch 4: the same programs as the suite
FIXED = np.random.default_rng(7).integers(0, 256, (8, gpt.TINY.seq_len + 1)).astype(np.int32)


def _loss(trainer) -> float:
    return float(trainer.pipeline.grads(FIXED)[0])


def _logical_np(trainer) -> dict:
    t = logical.to_logical(trainer.pipeline, trainer.optimizer.states)
    return jax.tree.map(np.asarray, t)


@pytest.fixture(scope="session")  # not torn down when xdist runs another module in between
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=0), "local", out=root / "run", save_every=2, keep=2, **KW)
    first = [r["loss"] for r in trainer.fit(4, progress=False)]
    saved = _logical_np(trainer)
    saved_loss = _loss(trainer)
    shutil.copytree(root / "run", root / "snapshot")
    later = [r["loss"] for r in trainer.fit(2, progress=False)]
    return dict(snapshot=root / "snapshot", first=first, later=later, saved=saved, loss=saved_loss)


def _copy(base, tmp_path) -> Path:
    shutil.copytree(base["snapshot"], tmp_path / "run")
    return tmp_path / "run"


def test_layout_is_logical_and_sealed(base):
    folder = base["snapshot"] / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["2", "4"]
    meta = json.loads((folder / "4" / "meta" / "metadata").read_text())
    assert meta["step"] == 4 and meta["ranges"] == [[0, 4], [4, 8]]
    assert list(meta["shapes"])[:3] == ["embed/wpe", "embed/wte", "blocks/0/b1"]
    assert meta["shapes"]["blocks/7/w1"] == [[32, 64], "float32"]
    saved = base["saved"]
    assert sorted(saved["params"]["blocks"]) == [str(i) for i in range(8)]
    assert saved["opt"]["0"]["mu"]["blocks"]["5"]["w2"].shape == (64, 32)
    assert int(saved["opt"]["0"]["count"]) == 4
    files = json.loads((folder / "4" / manifest.MANIFEST).read_text())["files"]
    assert any(f.startswith("params/") for f in files) and "meta/metadata" in files


def test_resume_same_topology_is_bit_identical(base, tmp_path):
    run = _copy(base, tmp_path)
    resumed = hxtrain.Trainer(gpt.build(gpt.TINY, seed=5), "local", out=run, keep=2, **KW)  # other init: overwritten
    assert resumed.resumed_from == 4 and resumed.step == 4
    assert [r["loss"] for r in resumed.fit(2, progress=False)] == base["later"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["4", "6"]


@pytest.mark.parametrize("topology,partition", [
    (hxtrain.uniform(4, data=2, tensor=1), None),
    (hxtrain.uniform(1, data=1, tensor=1), None),
    (hxtrain.uniform(4, data=2, tensor=1), [3, 2, 2, 1]),
], ids=["4sites-2x1", "1site-1x1", "4sites-uneven-3-2-2-1"])
def test_restore_onto_other_topology(base, tmp_path, topology, partition):
    run = _copy(base, tmp_path)
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=5), topology, partition=partition, out=run,
                              resume="must", **KW)
    assert trainer.step == 4
    got = _logical_np(trainer)
    assert_trees_close(got, base["saved"], rtol=0, what="restored")  # exactly the saved values
    assert rel_err(_loss(trainer), base["loss"]) <= 1e-6
    (row,) = trainer.fit(1, progress=False)
    assert row["step"] == 5 and np.isfinite(row["loss"])
    assert abs(row["loss"] - base["later"][0]) <= 1e-5 * abs(base["later"][0])  # same data, same update


def test_restore_in_bf16_keeps_the_fp32_checkpoint(base):
    from hxtrain.checkpoints.export import load_params

    pipe = hxtrain.Pipeline(gpt.build(gpt.TINY, seed=5), hxtrain.uniform(1), microbatches=2)
    what = load_params(pipe, base["snapshot"], dtype=jax.numpy.bfloat16)
    assert "checkpoint step 4" in what
    got = jax.tree.map(np.asarray, logical.to_logical(pipe)["params"])
    assert {str(x.dtype) for x in jax.tree.leaves(got)} == {"bfloat16"}
    want = jax.tree.map(lambda a: a.astype(jax.numpy.bfloat16), base["saved"]["params"])
    assert_trees_close(got, want, rtol=0, what="bf16")  # the fp32 values, rounded once
    meta = json.loads((base["snapshot"] / "checkpoints" / "4" / "meta" / "metadata").read_text())
    assert meta["shapes"]["head/w_out"][1] == "float32"


def _one_file(step_dir: Path) -> Path:
    return max((p for p in step_dir.rglob("*") if p.is_file() and "params" in p.parts), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "alter"])
def test_damaged_checkpoint_is_detected_and_the_previous_used(base, tmp_path, damage):
    run = _copy(base, tmp_path)
    victim = _one_file(run / "checkpoints" / "4")
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1]))
    rel = victim.relative_to(run / "checkpoints" / "4")
    expect = "bytes" if damage == "truncate" else "another sha256"
    with pytest.warns(CheckpointWarning, match=rf"checkpoint step 4: file {rel}.*{expect}.*restoring step 2"):
        trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=5), "local", out=run, **KW)
    assert trainer.resumed_from == 2 and trainer.step == 2
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == ["2"]
    assert len(list((run / "checkpoints" / "rejected").iterdir())) == 1  # set aside, not deleted


def test_unsealed_checkpoint_is_skipped(base, tmp_path):
    run = _copy(base, tmp_path)
    (run / "checkpoints" / "4" / manifest.MANIFEST).unlink()
    ckpts = Checkpoints(run / "checkpoints")
    assert ckpts.all_steps() == [2, 4] and ckpts.steps() == [2] and ckpts.latest() == 2


def test_wrong_model_shape_is_refused(base, tmp_path):
    run = _copy(base, tmp_path)
    other = gpt.GPTConfig(seq_len=16, d_model=32, n_heads=4, n_layers=8, d_ff=128)
    with pytest.raises(CheckpointMismatch, match=r"parameter blocks/0/b1 has shape \(64,\) in the checkpoint but "
                                                 r"\(128,\) in the model"):
        hxtrain.Trainer(gpt.build(other), "local", out=run, **KW)
    deeper = gpt.GPTConfig(seq_len=16, d_model=32, n_heads=4, n_layers=10, d_ff=64)
    with pytest.raises(CheckpointMismatch, match=r"parameter blocks/8/b1 \(64,\) is not in the checkpoint"):
        hxtrain.Trainer(gpt.build(deeper), "local", out=run, **KW)


def test_resume_modes(base, tmp_path):
    run = _copy(base, tmp_path)
    with pytest.raises(CheckpointError, match=r"resume=never but .* already holds checkpoints \(steps \[2, 4\]\)"):
        Checkpoints(run / "checkpoints").resume(None, "never")
    with pytest.raises(CheckpointError, match="resume=must but there is no checkpoint in"):
        Checkpoints(tmp_path / "empty").resume(None, "must")
    with pytest.raises(ValueError, match=r"resume: expected one of \('never', 'auto', 'must'\), got 'sometimes'"):
        Checkpoints(run / "checkpoints").resume(None, "sometimes")
    assert Checkpoints(tmp_path / "empty2").resume(None, "auto") is None
    with pytest.raises(ValueError, match="save_every: expected a whole number >= 0"):
        Checkpoints(tmp_path / "x", save_every=-1)
    with pytest.raises(ValueError, match="keep: expected a whole number >= 1"):
        Checkpoints(tmp_path / "x", keep=0)


def test_non_finite_loss_stops_with_last_good_checkpoint(base, tmp_path):
    trainer = hxtrain.Trainer(gpt.build(gpt.TINY, seed=0), "local", out=tmp_path / "run", save_every=2, **KW)
    step = trainer.train_step

    def poisoned(tokens, **kw):  # step 3 runs with NaN weights on the first stage
        if trainer.step == 2:
            pipe = trainer.pipeline
            poison = jax.tree.map(lambda a: a * np.float32("nan"), pipe.stages[0].params)
            pipe.set_params([poison] + [s.params for s in pipe.stages[1:]])
        return step(tokens, **kw)

    trainer.train_step = poisoned
    with pytest.raises(hxtrain.NonFiniteLoss, match="step 3: loss is nan"):
        trainer.fit(5, progress=False)
    ckpts = Checkpoints(tmp_path / "run" / "checkpoints")
    assert ckpts.all_steps() == [2] and ckpts.latest() == 2
    fresh = hxtrain.Trainer(gpt.build(gpt.TINY, seed=5), "local", out=tmp_path / "run", resume="must", **KW)
    assert fresh.step == 2
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(_logical_np(fresh)))
    assert [r["loss"] for r in fresh.fit(2, progress=False)] == base["first"][2:4]  # same run as the base


def _spawn(out: Path, point: str):
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "_ckpt_child.py"), str(out), "--kill-at", point,
                             "--kill-step", "3", "--steps", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def test_kill_during_save_restores_last_complete_checkpoint(tmp_path):
    points = ["during-write", "before-seal", "mid-seal"]
    procs = {p: _spawn(tmp_path / p, p) for p in points}  # in parallel: each pays its own JAX start-up
    results = {p: proc.communicate(timeout=300) for p, proc in procs.items()}
    for point in points:
        out, err = results[point]
        assert procs[point].returncode == -9, f"{point}: {err[-2000:]}"
        done = {int(w[1]): float(w[2]) for w in (line.split() for line in out.splitlines()) if w[:1] == ["done"]}
        assert sorted(done) == [1, 2], (point, out)
        folder = tmp_path / point / "checkpoints"
        if point == "during-write":  # orbax writes step 3 under a temporary name, or it lands unsealed
            listing = next(line for line in out.splitlines() if line.startswith("listing")).split()[1:]
            step3 = [n for n in listing if n.split(".")[0] == "3"]
            assert step3 and (step3[0] != "3" or not manifest.is_sealed(folder / "3")), listing
        else:
            assert (folder / "3").is_dir() and not manifest.is_sealed(folder / "3")
        with pytest.warns(CheckpointWarning, match="checkpoint step 3: not sealed") if (folder / "3").is_dir() \
                else _no_warning():
            trainer = child.make_trainer(tmp_path / point, seed=9)
        assert trainer.resumed_from == 2, point
        assert not (folder / "1").exists(), point  # keep=1 rotated step 1 out, but only after step 2 was sealed
        assert child.checksum(trainer) == done[2], point
        assert not any(".orbax-checkpoint-tmp" in p.name for p in folder.iterdir())  # cleaned up


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pipeline_without_per_site_stages_is_not_checkpointed(tmp_path):
    class SpmdLike:
        stages = [object()]

    trainer = type("T", (), {"pipeline": SpmdLike(), "step": 1})()
    ckpts = Checkpoints(tmp_path / "c", save_every=1)
    with pytest.warns(CheckpointWarning, match="step 1 not checkpointed: SpmdLike keeps its stages as one padded"):
        assert ckpts.save(trainer) is False
    with pytest.raises(CheckpointError, match="cannot restore into this trainer: SpmdLike"):
        ckpts.restore(trainer)
