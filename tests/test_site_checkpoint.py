"""Checkpoints of site processes (`hxtrain launch --checkpoint-dir`): each site saves its own stages, a resumed run
agrees on the newest step every site has sealed and continues with exactly the losses of the uninterrupted run.

Run A trains the 2-site tiny topology 6 steps, saving every 2. Its folder is copied without step 6, and site b's
step 4 is unsealed (its manifest deleted, as if b died while sealing): run B must resume both sites from step 2.
"""

import json
import re
import shutil
import types

import numpy as np
import pytest

from hxtrain.checkpoints import manifest
from hxtrain.checkpoints.checkpoint import CheckpointError, CheckpointMismatch
from hxtrain.checkpoints.site import SiteCheckpoints, agree, check_meta, exchange_steps
from tests.test_multiprocess import _launch, _topology

# One worker runs this module, so its costly shared run (the session fixture below) is computed once.
pytestmark = pytest.mark.xdist_group("site_checkpoint")


def _losses(out, site="b"):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / f"metrics-{site}.jsonl").read_text().splitlines())}


@pytest.fixture(scope="session")  # not torn down when xdist runs another module in between
def run_a(tmp_path_factory):
    root = tmp_path_factory.mktemp("site_ckpt")
    mesh = _topology(root, steps=6)
    run = _launch(mesh, "--save-every", 2, "--checkpoint-dir", root / "D1", "--out", root / "out1")
    assert run.finish(240) == 0, run.text()
    return types.SimpleNamespace(root=root, mesh=mesh, folder=root / "D1", losses=_losses(root / "out1"),
                                 text=run.text())


def test_each_site_saves_its_own_stages_with_logical_keys(run_a):
    for site, stage, part in (("a", 0, "embed"), ("b", 1, "head")):
        folder = run_a.folder / site
        assert sorted(p.name for p in folder.iterdir()) == ["2", "4", "6"]
        assert all(manifest.is_sealed(folder / s) for s in ("2", "4", "6"))
        meta = json.loads((folder / "4" / "meta" / "metadata").read_text())
        assert meta["site"] == site and meta["stages"] == [stage] and meta["step"] == 4
        assert meta["ranges"] == [[0, 4], [4, 8]]
        blocks = range(0, 4) if site == "a" else range(4, 8)
        assert {k.split("/")[0] for k in meta["shapes"]} == {"blocks", part}
        assert {int(k.split("/")[1]) for k in meta["shapes"] if k.startswith("blocks/")} == set(blocks)
        assert (folder / "4" / "opt").is_dir() and (folder / "4" / "data").is_dir()
        assert f"[{site}] site '{site}': saved step 4 ({folder / '4'})" in run_a.text


def test_resume_agrees_on_the_oldest_newest_step_and_continues_exactly(run_a):
    d2 = run_a.root / "D2"
    shutil.copytree(run_a.folder, d2)
    for site in ("a", "b"):
        shutil.rmtree(d2 / site / "6")
    (d2 / "b" / "4" / manifest.MANIFEST).unlink()  # site b died before sealing step 4: a has 4, b only 2
    run = _launch(run_a.mesh, "--save-every", 2, "--checkpoint-dir", d2, "--resume", "auto",
                  "--out", run_a.root / "out2")
    assert run.finish(240) == 0, run.text()
    text = run.text()
    for site in ("a", "b"):
        assert f"[{site}] site '{site}': resumed from step 2 ({d2 / site / '2'})" in text
    got = _losses(run_a.root / "out2")
    assert sorted(got) == [3, 4, 5, 6]
    for step, loss in got.items():
        assert abs(loss - run_a.losses[step]) <= 1e-6 * abs(run_a.losses[step]), (step, loss, run_a.losses[step])
    assert not re.search(r"\] step [12] ", text)  # steps 1 and 2 are not run again
    assert sorted(p.name for p in (d2 / "b").iterdir()) == ["2", "4", "6", "rejected"]  # b's unsealed 4 set aside


def _fake_site(name="b"):
    return types.SimpleNamespace(site=types.SimpleNamespace(name=name))


def test_resume_errors(run_a, tmp_path):
    with pytest.raises(CheckpointError, match=rf"resume=must but there is no complete checkpoint in "
                                              rf"{tmp_path / 'b'}; train once with --resume auto"):
        agree([4, -1], ["a", "b"], tmp_path, "must")
    assert agree([4, -1], ["a", "b"], tmp_path, "auto") is None
    assert agree([6, 4], ["a", "b"], tmp_path, "auto") == 4
    with pytest.raises(CheckpointError, match=rf"site 'b': resume=never but {run_a.folder / 'b'} already holds "
                                              rf"checkpoints \(steps \[2, 4, 6\]\)"):
        SiteCheckpoints(_fake_site(), run_a.folder, resume="never").newest()
    copy = tmp_path / "keep1"
    shutil.copytree(run_a.folder / "b", copy / "b", ignore=shutil.ignore_patterns("2"))
    ckpt = SiteCheckpoints(_fake_site(), copy, keep=1)
    with pytest.raises(CheckpointError, match=rf"site 'b': the sites agreed to resume from step 2 \(x\), but "
                                              rf"{copy / 'b'} no longer holds it intact \(its steps: \[4, 6\]\); "
                                              rf"with --keep 1"):
        ckpt.restore(2, why="x")
    with pytest.raises(ValueError, match=r"--resume: expected one of \('never', 'auto', 'must'\), got 'sometimes'"):
        SiteCheckpoints(_fake_site(), copy, resume="sometimes")


def test_a_checkpoint_of_another_run_is_refused_naming_what_differs(run_a):
    saved = json.loads((run_a.folder / "b" / "4" / "meta" / "metadata").read_text())
    where = "site 'b': checkpoint step 4"
    check_meta(saved, dict(saved), where)  # the same run: accepted
    with pytest.raises(CheckpointMismatch, match=r"site 'b': checkpoint step 4: saved with ranges = \[\[0, 4\], "
                                                 r"\[4, 8\]\], this run has ranges = \[\[0, 5\], \[5, 8\]\]; resume "
                                                 r"with the same --partition"):
        check_meta(saved, {**saved, "ranges": [(0, 5), (5, 8)]}, where)
    with pytest.raises(CheckpointMismatch, match=r"saved with batch_size = 4, this run has batch_size = 8"):
        check_meta(saved, {**saved, "batch_size": 8}, where)
    wider = {**saved, "shapes": {**saved["shapes"], "head/w_out": [[64, 256], "float32"]}}
    with pytest.raises(CheckpointMismatch, match=r"parameter head/w_out has shape \(32, 256\) in the checkpoint "
                                                 r"but \(64, 256\) in the model"):
        check_meta(saved, wider, where)


def test_sites_exchange_their_steps_exactly_over_the_float32_control_exchange():
    steps = [2**30 + 5, -1, 7]  # float32 alone would round the first to 2**30
    assert int(np.float32(steps[0])) != steps[0]
    sent = {}

    class Record:  # what each site puts into the CONTROL vector
        def exchange_norms(self, local, n):
            sent.update(local)
            return np.zeros(n, np.float32)

    class Chain:  # what every site gets back: the float32 vector with every site's slots filled
        def exchange_norms(self, local, n):
            vec = np.zeros(n, np.float32)
            for k, v in {**sent, **local}.items():
                vec[k] = np.float32(v)
            return vec

    for i, s in enumerate(steps):
        exchange_steps(Record(), i, s, len(steps))
    assert exchange_steps(Chain(), 0, steps[0], len(steps)) == steps
