"""Elastic pipeline runs (`hxtrain launch --elastic`): a site killed mid-run, the survivors re-planned from the newest
step every site sealed, the lost site brought back at the next checkpoint; and the losses of every step, before and
after the rollback, those of the uninterrupted run in one process (fp32, <= 1e-5 relative).

The kill is a real SIGKILL from outside, sent when the site logs step 5 (save every 2 of 8 steps), so the step the
run goes back to depends on timing (2 or 4); the assertions hold for either.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import types

import pytest

import hxtrain
from hxtrain import cli
from hxtrain.checkpoints import manifest, steps as ckpt_steps
from hxtrain.sites import elastic
from hxtrain.sites.launch import LOST_PEER, SiteExit
from tests.helpers import rel_err
from tests.test_multihost_site import _topology as _multihost
from tests.test_multiprocess import _launch, _pid, _reference

STEPS = 8


def _three(tmp_path):
    """3 one-device sites a-b-c, with a link a-c so that a and c can go on without b."""
    text = "".join(f'[[sites]]\nname = "{s}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n' for s in "abc")
    for x, y in ("ab", "bc", "ac"):
        text += f'[[links]]\nbetween = ["{x}", "{y}"]\nbandwidth_gbps = 100\nlatency_ms = 1.0\n'
    text += f'[run]\nmodel = "tiny"\nschedule = "1f1b"\nmicrobatches = 2\nbatch_size = 4\nsteps = {STEPS}\n'
    path = tmp_path / "three.toml"
    path.write_text(text)
    return path


def _losses(out) -> dict[int, list[float]]:
    """Every loss any site logged, per step (a step after the rollback is logged twice)."""
    got: dict[int, list[float]] = {}
    for f in sorted(out.glob("metrics-*.jsonl")):
        for row in map(json.loads, f.read_text().splitlines()):
            if row["loss"] is not None:
                got.setdefault(row["step"], []).append(row["loss"])
    return got


def _check_losses(got: dict, ref: list[dict]) -> None:
    assert sorted(got) == list(range(1, STEPS + 1)), sorted(got)
    for row in ref:
        for loss in got[row["step"]]:
            assert rel_err(loss, row["loss"]) <= 1e-5, (row["step"], loss, row["loss"])


def _elastic_run(mesh, tmp_path, kill: str, *extra):
    run = _launch(mesh, "--elastic", "--save-every", 2, "--checkpoint-dir", tmp_path / "D", "--out",
                  tmp_path / "out", *extra, timeout=10)
    pid = _pid(run, kill)
    run.wait_for(rf"^\[{kill}\] step 5 ", 240)
    os.kill(pid, signal.SIGKILL)
    assert run.finish(300) == 0, run.text()
    text = run.text()
    pids = [int(p) for p in re.findall(r"^\[launch\] site '\w+': pid (\d+)", text, re.M)]
    for p in pids:  # nothing outlives the launcher
        with pytest.raises(ProcessLookupError):
            os.kill(p, 0)
    lost = re.search(rf"\[launch\] elastic: lost site '{kill}' was killed by SIGKILL \(from outside\) at step "
                     rf"(\d+); going on from step (\d+), the newest step every site sealed \((\d+) steps lost\), on "
                     rf"\[([^\]]*)\] with partition ([\d,]+)", text)
    assert lost, text
    reached, start, n_lost = map(int, lost.groups()[:3])
    assert start in (2, 4) and reached >= 5 and n_lost == reached - start
    events = [json.loads(x) for x in (tmp_path / "out" / "events.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "site_lost" and events[0]["sites"] == [kill] and events[0]["step"] == start
    assert events[0]["steps_lost"] == n_lost
    return types.SimpleNamespace(text=text, start=start, events=events, partition=lost[5],
                                 survivors=re.findall(r"'(\w+)'", lost[4]))


def test_two_sites_lose_one_go_on_alone_and_take_it_back(tmp_path):
    # Site a runs as 2 processes (data 2, one device each): alone, it restores b's blocks too, each process its
    # own shards; b, back, restores its blocks from a's folder.
    mesh = _multihost(tmp_path, steps=STEPS)
    ref = _reference(mesh, steps=STEPS)
    got = _elastic_run(mesh, tmp_path, "b")
    assert got.survivors == ["a"] and got.partition == "8"  # the whole model on a, as the planner chose
    for k in (0, 1):
        assert f"[a/{k}] site 'a': continued from step {got.start}, saved by sites ['a', 'b']" in got.text
    back = got.start + 2  # the next checkpoint boundary
    assert f"[launch] elastic: sites ['b'] rejoin at step {back}: the run goes on on ['a', 'b']" in got.text
    assert f"[b] site 'b': continued from step {back}, saved by sites ['a']" in got.text
    assert got.events[1] == {**got.events[1], "event": "rejoined", "step": back, "sites": ["b"],
                             "running": ["a", "b"]}
    _check_losses(_losses(tmp_path / "out"), ref)
    newest = ckpt_steps.newest_complete(tmp_path / "D")
    assert newest[0] == STEPS and sorted(newest[1]) == ["a", "b"]  # the run ended on the full topology


def test_three_sites_lose_the_middle_one_and_equal_a_restart_by_hand(tmp_path):
    mesh = _three(tmp_path)
    ref = _reference(mesh, steps=STEPS)
    got = _elastic_run(mesh, tmp_path, "b", "--no-rejoin", "--keep", 5)  # step 2 stays for the restart by hand
    assert got.survivors == ["a", "c"] and "rejoin" not in got.text
    _check_losses(_losses(tmp_path / "out"), ref)
    # The same continuation by hand: the survivors, the planner's partition, from the same step of a copy
    d2 = tmp_path / "D2"
    shutil.copytree(tmp_path / "D", d2)
    run = _launch(mesh, "--sites", "a,c", "--partition", got.partition, "--continue-step", got.start,
                  "--checkpoint-dir", d2, "--out", tmp_path / "out2", timeout=10)
    assert run.finish(240) == 0, run.text()
    by_hand = {r["step"]: r["loss"] for r in map(json.loads, (tmp_path / "out2" / "metrics-c.jsonl")
                                                      .read_text().splitlines())}
    assert sorted(by_hand) == list(range(got.start + 1, STEPS + 1))
    elastic_rows = [json.loads(x) for x in (tmp_path / "out" / "metrics-c.jsonl").read_text().splitlines()]
    after = {r["step"]: r["loss"] for r in elastic_rows[-(STEPS - got.start):]}  # the survivors' segment
    assert after == pytest.approx(by_hand, rel=1e-6)


# ---- what decides the next segment (no processes) ----------------------------------------------------------------


def _step(root, site, step, sites, ranges=((0, 4), (4, 8)), seal=True):
    folder = root / site / str(step)
    (folder / "meta").mkdir(parents=True)
    meta = {"step": step, "site": site, "sites": [[s, "cpu", 1, 1] for s in sites], "ranges": [list(r) for r in ranges]}
    (folder / "meta" / "metadata").write_text(json.dumps(meta))
    if seal:
        manifest.seal(folder)


def test_the_newest_complete_step_is_the_newest_every_site_of_its_topology_sealed(tmp_path):
    _step(tmp_path, "a", 2, "ab")
    _step(tmp_path, "b", 2, "ab")
    _step(tmp_path, "a", 4, "ab")
    _step(tmp_path, "b", 4, "ab", seal=False)  # b died while sealing 4
    assert ckpt_steps.newest_complete(tmp_path)[0] == 2
    _step(tmp_path, "a", 6, "a", ranges=((0, 8),))  # a alone went on from 2 and saved 6: complete by itself
    _step(tmp_path, "b", 6, "ab")  # a stale step of b's old topology at the same number does not count
    step, metas = ckpt_steps.newest_complete(tmp_path)
    assert step == 6 and list(metas) == ["a"]
    assert ckpt_steps.complete(tmp_path, 4) is None
    assert ckpt_steps.newest_complete(tmp_path, at_most=5)[0] == 2
    assert ckpt_steps.newest_complete(tmp_path / "none") is None


def test_the_lost_site_is_the_one_that_failed_by_itself():
    exits = [SiteExit("b", -9), SiteExit("a", LOST_PEER), SiteExit("c", LOST_PEER)]
    assert elastic._culprits(exits) == ["b"]
    stalled = [SiteExit("a", LOST_PEER), SiteExit("b", -9, killed=True)]  # killed after the grace period
    assert elastic._culprits(stalled) == ["b"]
    assert elastic._culprits([SiteExit("a", LOST_PEER), SiteExit("b", LOST_PEER)]) == []


def test_a_partition_over_survivors_that_do_not_hold_the_model_is_refused(tmp_path):
    topo = hxtrain.load_topology(_three(tmp_path))
    run = elastic.Run(model="llama-70b", schedule="1f1b", microbatches=2, batch_size=4, steps=8, save_every=2,
                      checkpoint_dir=str(tmp_path), partition=None, resume="auto", out=None)
    with pytest.raises(elastic.ElasticError, match=r"^the model does not fit on the survivors \['a', 'c'\]: "):
        elastic.replan(topo, ["a", "c"], run)
    part, why = elastic.replan(topo, ["a", "c"], dataclasses.replace(run, model="tiny"))
    assert sum(part) == 8 and len(part) == 2 and "ms/step" in why


@pytest.mark.parametrize("argv, message", [
    (["--elastic"], r"--elastic: needs --checkpoint-dir DIR and --save-every N > 0"),
    (["--elastic", "--checkpoint-dir", "{d}", "--save-every", "2", "--sites", "a"],
     r"--elastic chooses --sites itself; leave them out"),
])
def test_launch_elastic_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{d}", str(tmp_path / "D")) for a in argv]
    assert cli.main(["launch", "--mesh", str(_three(tmp_path)), *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(rf"hxtrain launch: error: {message}.*", err) and "\n" not in err, err


@pytest.mark.parametrize("argv, message", [
    (["--stop-at", "0"], r"--stop-at: expected a step in 1\.\.8 \(--steps\), got 0"),
    (["--continue-step", "2"], r"--continue-step 2: needs --checkpoint-dir, the folder that holds the step"),
    (["--checkpoint-dir", "{d}", "--continue-step", "4", "--stop-at", "4"],
     r"--stop-at 4: expected a step after --continue-step 4"),
    (["--sites", "a,x"], r"--sites a,x: .*no site named 'x'; sites: 'a', 'b', 'c'"),
    (["--elastic"], r"--elastic: a pipeline site does not re-plan by itself; `hxtrain launch --elastic` does"),
])
def test_site_segment_errors(tmp_path, capsys, argv, message):
    argv = [a.replace("{d}", str(tmp_path / "D")) for a in argv]
    code = cli.main(["site", "--mesh", str(_three(tmp_path)), "--site", "a", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and re.fullmatch(rf"hxtrain site 'a': error: {message}.*", err) and "\n" not in err, err
