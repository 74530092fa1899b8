"""DiLoCo replicas that are groups of site processes (`hxtrain launch --strategy diloco` with `[diloco] replicas`):
each replica pipelines the model over its own sites, and site j of one replica syncs the stages it holds with
site j of the other; the same run in one process is the reference. Plus what is refused before anything starts."""

import dataclasses
import json
import re
import subprocess
import sys

import pytest

import hxtrain
from helpers import cpu_topology_toml, rel_err
from hxtrain import cli
from hxtrain.core.optim import OptimizerConfig
from hxtrain.training import diloco as dl
from models import gpt

# a+b and c+d pipeline the model; a-c and b-d link the counterparts; b-c is the chain's own link (unused)
_LINKS = ("ab", "bc", "cd", "ac", "bd")
_RUN = dict(model="tiny", schedule="1f1b", microbatches=2, batch_size=8, steps=3)
_DILOCO = dict(replicas=[["a", "b"], ["c", "d"]], sync_every=2, fragments=2, shares=[3, 1], codec="int8")
_FOUR = cpu_topology_toml("four", "abcd", _LINKS, _RUN, _DILOCO)


def test_two_replicas_of_two_site_processes_match_the_in_process_run_and_resume(tmp_path):
    """4 site processes, 2 replicas x 2 pipeline stages, stopped after step 2 and launched again from the step
    every site sealed: every step's loss of each replica (on its last site) equals the in-process DilocoTrainer's
    on the same topology, counterparts hold the same global params of their stages (their digests agree), and
    replica 0 takes the held-out loss of the global params at steps 2 and 3 as in one process."""
    mesh = tmp_path / "four.toml"
    mesh.write_text(_FOUR)

    def launch(out, *extra):
        return subprocess.Popen([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy",
                                 "diloco", "--out", str(tmp_path / out), "--timeout", "120", "--checkpoint-dir",
                                 str(tmp_path / "ckpt"), "--eval-every", "2", "--eval-batches", "1", *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = launch("one", "--stop-at", "2", "--save-every", "2")
    topo = hxtrain.load_topology(mesh)  # meanwhile, the whole run in this process
    ref = dl.DilocoTrainer(gpt.build(gpt.TINY, seed=0), topo, microbatches=2, batch_size=8,
                           optimizer=OptimizerConfig.for_steps(3, 3e-3), eval_batches=1)
    ref_rows = ref.fit(3, progress=False, eval_every=2)
    outs = {}
    try:
        outs["one"] = first.communicate(timeout=400)[0]
        assert first.returncode == 0, outs["one"][-6000:]
        second = launch("two", "--resume", "must")
        outs["two"] = second.communicate(timeout=400)[0]
    finally:
        first.kill()
        if "second" in locals():
            second.kill()
    assert second.returncode == 0, outs["two"][-6000:]
    assert "diloco replica 1 of 2, stage 2 of 2, rows 6..7 of each batch (shares given)" in outs["one"]
    for s in "abcd":
        assert f"site {s!r}: resumed from step 2" in outs["two"], outs["two"][-4000:]
    for last, replica in (("b", "a+b"), ("d", "c+d")):
        rows = [json.loads(line) for run in ("one", "two")
                for line in (tmp_path / run / f"metrics-{last}.jsonl").read_text().splitlines()]
        # streaming, H 2 in 2 fragments: one fragment syncs every step, an outer step ends at every second one
        assert [r["step"] for r in rows] == [1, 2, 3] and [r["outer_step"] for r in rows] == [0, 1, 1]
        assert all(r["sync_bytes"] > 0 for r in rows)
        for got, want in zip(rows, ref_rows):
            assert rel_err(got["loss"], want["replica_loss"][replica]) <= 1e-5, (last, got["loss"], want)
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
        want = [(r["step"], r["eval_loss"]) for r in ref_rows if "eval_loss" in r] if last == "b" else []
        assert [k for k, _ in evals] == [k for k, _ in want] == ([2, 3] if last == "b" else []), (last, evals)
        assert all(rel_err(g, w) <= 1e-5 for (_, g), (_, w) in zip(evals, want)), (evals, want)
    digests = dict(re.findall(r"\[(\w)\] site '\w': global params after outer step 1: sha256 (\w+)", outs["two"]))
    assert sorted(digests) == list("abcd"), outs["two"][-3000:]
    assert digests["a"] == digests["c"] and digests["b"] == digests["d"] and digests["a"] != digests["b"]


def test_replica_groups_deal_measured_shares_the_same_on_every_site(tmp_path):
    """`shares = "measured"` with replica groups: at the outer step every site sends its peers each replica's
    seconds per row (a group's slowest site's) for as many rounds as there are sites, so all four deal the same
    rows, and both sites of a replica read them from the next step on."""
    mesh = tmp_path / "four.toml"
    mesh.write_text(cpu_topology_toml("four", "abcd", _LINKS, _RUN, {**_DILOCO, "shares": "measured", "fragments": 1}))
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--strategy", "diloco",
                          "--steps", "4", "--out", str(out), "--timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=400)
    assert run.returncode == 0, run.stdout[-6000:]
    deals = {}
    for site, step, rows in re.findall(r"\[(\w)\] site '\w': step (\d+): rows per second of inner step [^>]*-> rows "
                                       r"(\[\d+, \d+\])", run.stdout):
        deals.setdefault(int(step), {})[site] = rows
    assert sorted(deals) == [2, 4] and all(sorted(d) == list("abcd") for d in deals.values()), run.stdout[-4000:]
    assert all(len(set(d.values())) == 1 for d in deals.values()), deals  # the same rows on every site
    rows = {s: [json.loads(x)["replica_rows"] for x in (out / f"metrics-{s}.jsonl").read_text().splitlines()]
            for s in "abcd"}
    assert rows["a"] == rows["b"] and rows["c"] == rows["d"], rows
    assert all(x + y == 8 for x, y in zip(rows["a"], rows["c"])), rows


@pytest.mark.parametrize("change, message", [
    ('replicas = [["a"], ["b", "c", "d"]]', "two replicas of as many sites each for now (site j of one syncs with "
                                            "site j of the other), got ['a', 'b+c+d']"),
])
def test_what_replica_groups_of_site_processes_refuse(tmp_path, capsys, change, message):
    key = change.split(" =")[0]
    text = re.sub(rf"^{key} = .*$", change, _FOUR, flags=re.M) if key in _FOUR else _FOUR + change + "\n"
    mesh = tmp_path / "four.toml"
    mesh.write_text(text)
    assert cli.main(["site", "--mesh", str(mesh), "--site", "a", "--strategy", "diloco"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_counterparts_need_a_link(tmp_path, capsys):
    mesh = tmp_path / "four.toml"
    mesh.write_text(cpu_topology_toml("four", "abcd", [x for x in _LINKS if x != "bd"], _RUN, _DILOCO))
    assert cli.main(["site", "--mesh", str(mesh), "--site", "c", "--strategy", "diloco"]) == 2
    assert ("sites 'b' and 'd' hold the same stages of the two replicas and exchange their pseudo-gradients, but "
            "the topology has no link between them; add [[links]] between = [\"b\", \"d\"]") in capsys.readouterr().err


def test_peers_are_the_pipeline_neighbours_and_the_counterpart(tmp_path):
    from hxtrain.sites import replicas

    mesh = tmp_path / "four.toml"
    mesh.write_text(_FOUR)
    topo = hxtrain.load_topology(mesh)
    d = dataclasses.replace(topo.diloco)
    assert [replicas.peers(topo, d, i) for i in range(4)] == [[1, 2], [0, 3], [3, 0], [2, 1]]
    assert [replicas.place(topo, d, i) for i in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
