"""`hxtrain profile` (timing the real stage programs), `hxtrain plan --profile`, `hxtrain train --plan`."""

import dataclasses
import math

import pytest

from hxtrain import cli
from hxtrain.planning import plan_file
from hxtrain.planning import planner
from hxtrain.planning import profile as prof
from hxtrain.planning.costmodel import SiteProfile
from hxtrain.config.topology import load_topology, uniform
from models import gpt

# A microbatch big enough that one TINY block's work stands above the timing noise of a shared 2-core machine.
MB = 32


@pytest.fixture(scope="module")
def two_block_tiny():
    return gpt.build(dataclasses.replace(gpt.TINY, n_layers=2))


@pytest.fixture(scope="module")
def measured(two_block_tiny):
    # 9 rounds: a per-block time is a median of paired differences, and fewer let another worker's load make one
    # negative (the profile then refuses it, rightly)
    return prof.profile_sites(two_block_tiny, uniform(2, 1, 1), microbatch=MB, repeats=9)


def _times(**kw) -> prof.StageTimes:
    base = dict(site="a", backend="cpu", data=2, tensor=1, microbatch=8, seq=16, fwd_block=1e-3, bwd_block=3e-3,
                fwd_fixed=2e-4, bwd_fixed=5e-4, embed_fwd=1e-4, embed_bwd=2e-4, head=4e-3, repeats=5)
    return prof.StageTimes(**{**base, **kw})


# ---- measuring on the sites ----------------------------------------------------------------------------------


def test_profile_gives_positive_per_block_times_for_every_site(measured):
    assert [t.site for t in measured] == ["s0", "s1"]
    for t in measured:
        assert t.fwd_block > 0 and t.bwd_block > 0, t
        assert (t.microbatch, t.seq, t.data, t.tensor, t.tokens) == (MB, gpt.TINY.seq_len, 1, 1, MB * 16)
        # No timing comparisons between programs here (a shared 2-core machine makes them flaky): the last stage's
        # backward is the middle one plus the measured head, whatever the head measured.
        assert math.isfinite(t.head)
        last, middle = (t.task_seconds("B", 2, first=False, last=x) for x in (True, False))
        assert last == pytest.approx(middle + t.head)
    # Identical sites (same backend, kind, data x tensor) share one measurement.
    assert dataclasses.replace(measured[1], site="s0") == measured[0]


def test_planner_accepts_the_measured_profile_and_follows_it(measured):
    profiles = prof.site_profiles(measured)
    assert set(profiles) == {"s0", "s1"} and all(isinstance(p, SiteProfile) for p in profiles.values())
    topo = uniform(2, 1, 1)
    even = planner.plan(topo, gpt.TINY, global_batch=MB, profiles=profiles, schedules=("1f1b",))
    # Not asserting (4, 4): the measured embed/head costs (timing noise on a shared machine) may tip one block.
    assert sum(even.layers) == gpt.TINY.n_layers
    # The same measurement, but s1's blocks 4x slower: the planner gives s1 fewer layers.
    slow = dict(profiles, s1=dataclasses.replace(profiles["s1"], fwd_s=4 * profiles["s1"].fwd_s,
                                                   bwd_s=4 * profiles["s1"].bwd_s))
    skewed = planner.plan(topo, gpt.TINY, global_batch=MB, profiles=slow, schedules=("1f1b",))
    layers = lambda p: {s.name: s.layers for s in p.predicted.sites}  # noqa: E731 (the plan may reverse the order)
    assert layers(skewed)["s1"] < layers(skewed)["s0"] and layers(skewed)["s1"] < layers(even)["s1"]
    assert skewed.predicted.step_s > even.predicted.step_s


def test_profile_errors(two_block_tiny):
    with pytest.raises(prof.ProfileError, match=r"microbatch: 3 sequences do not split over site 's0' data = 2"):
        prof.profile_sites(two_block_tiny, uniform(2, 2, 1), microbatch=3)
    with pytest.raises(prof.ProfileError, match=r"repeats: expected a whole number >= 1, got 0"):
        prof.profile_sites(two_block_tiny, uniform(2, 1, 1), microbatch=2, repeats=0)
    with pytest.raises(prof.ProfileError, match=r"seq: expected a whole number of tokens >= 1, got -1"):
        prof.profile_sites(two_block_tiny, uniform(2, 1, 1), microbatch=2, seq=-1)
    one_block = gpt.build(dataclasses.replace(gpt.TINY, n_layers=1))
    with pytest.raises(prof.ProfileError, match=r"needs at least 2 blocks .* the model has 1"):
        prof.profile_sites(one_block, uniform(2, 1, 1), microbatch=2)


# ---- the numbers, the file -----------------------------------------------------------------------------------


def test_task_seconds_by_hand():
    t = _times()
    assert t.tokens == 4 * 16
    assert t.task_seconds("F", 3, first=False, last=False) == pytest.approx(2e-4 + 3e-3)
    assert t.task_seconds("F", 3, first=True, last=False) == pytest.approx(2e-4 + 3e-3 + 1e-4)
    assert t.task_seconds("F", 3, first=False, last=True) == 0.0  # fused into the last stage's B
    assert t.task_seconds("B", 2, first=True, last=False) == pytest.approx(5e-4 + 6e-3 + 2e-4)
    assert t.task_seconds("B", 2, first=False, last=True) == pytest.approx(5e-4 + 6e-3 + 4e-3)
    with pytest.raises(prof.ProfileError, match=r"task kind 'W': expected 'F' or 'B'"):
        t.task_seconds("W", 1, first=False, last=False)
    assert t.site_profile() == SiteProfile(fwd_s=1e-3, bwd_s=3e-3, tokens=64, tensor=1)


def test_site_profiles_refuse_a_block_below_the_noise():
    with pytest.raises(prof.ProfileError, match=r"site 'a': measured per-block forward -0.1 ms.*bigger --microbatch"):
        prof.site_profiles([_times(fwd_block=-1e-4)])


def test_profile_file_round_trip_and_errors(tmp_path):
    times = [_times(site="s0"), _times(site="s1", tensor=2, fwd_block=2e-3)]
    path = prof.write_profile(tmp_path / "p.toml", times, model="tiny", topology="x.toml")
    assert prof.load_profile(path) == times
    assert prof.load_site_profiles(path, uniform(2, 1, 1))["s1"] == SiteProfile(2e-3, 3e-3, 64, 2)
    with pytest.raises(prof.ProfileError, match=r"profiled sites \['s0', 's1'\] are not in topology 'local'"):
        prof.load_site_profiles(path, load_topology("local"))
    with pytest.raises(prof.ProfileError, match=r"cannot read the profile"):
        prof.load_profile(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text('[[sites]]\nsite = "a"\n')
    with pytest.raises(prof.ProfileError, match=r"sites\[0\]: missing \['backend', 'bwd_block'"):
        prof.load_profile(tmp_path / "bad.toml")
    (tmp_path / "none.toml").write_text('model = "tiny"\n')
    with pytest.raises(prof.ProfileError, match=r"expected \[\[sites\]\] tables"):
        prof.load_profile(tmp_path / "none.toml")


# ---- the command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    return path


def test_cli_profile_then_plan_with_the_profile(tmp_path, capsys):
    mesh = tmp_path / "two.toml"
    mesh.write_text(plan_file.topology_toml(uniform(2, 1, 1), "uniform 2 x 1 x 1"))
    out = tmp_path / "profile.toml"
    assert cli.main(["profile", "--mesh", str(mesh), "--model", "tiny", "--microbatch", str(MB), "--repeats", "9",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fwd/block" in text and "s0" in text and "s1" in text
    assert [t.site for t in prof.load_profile(out)] == ["s0", "s1"]
    assert cli.main(["plan", "--mesh", str(mesh), "--model", "tiny", "--global-batch", str(MB), "--profile",
                     str(out), "--out", str(tmp_path / "plan.toml")]) == 0
    assert f"block times measured ({out}) on sites s0, s1" in capsys.readouterr().out
    # A profile of other sites is refused with the topology's names.
    assert cli.main(["plan", "--mesh", "local", "--model", "tiny", "--profile", str(out), "--out", "-"]) == 2
    assert "profiled sites ['s0', 's1'] are not in topology 'local'" in capsys.readouterr().err


def test_cli_train_runs_a_plan_from_plan_local_tiny(tmp_path, capsys, corpus):
    plan_file = tmp_path / "plan.toml"
    assert cli.main(["plan", "--mesh", "local", "--model", "tiny", "--global-batch", "8",
                     "--out", str(plan_file)]) == 0
    plan = planner.Plan.load(plan_file)
    capsys.readouterr()
    assert cli.main(["train", "--plan", str(plan_file), "--steps", "2", "--data", str(corpus),
                     "--no-progress", "--sample-tokens", "0"]) == 0
    text = capsys.readouterr().out
    assert f"schedule={plan.schedule} microbatches={plan.microbatches} batch=8 steps=2" in text
    lo = 0
    for i, L in enumerate(plan.layers):  # the planned partition, from the plan's topology
        assert f"blocks[{lo}:{lo + L}]" in text
        lo += L
    assert "done: 2 steps" in text


def test_cli_train_runs_the_plans_diloco_row(tmp_path, capsys, corpus):
    """`hxtrain train --plan FILE --strategy diloco`: every site a replica at the data x tensor the plan's DiLoCo
    row chose, the batch split by the row's shares (each site's predicted speed), the plan's model and batch; an
    explicit --shares is honoured; a plan without a DiLoCo row is refused in one line."""
    topo = load_topology("local")  # two sites of 4 CPU devices; a 4x as fast on paper, so it reads more rows
    mesh = tmp_path / "mesh.toml"
    mesh.write_text(plan_file.topology_toml(topo.replace_site("a", peak_tflops=0.2).replace_site(
        "b", peak_tflops=0.05).replace_sites(data=2, tensor=2), "a 4x as fast as b, each 2 x 2 to begin with"))
    path = tmp_path / "plan.toml"
    assert cli.main(["plan", "--mesh", str(mesh), "--model", "tiny", "--global-batch", "24", "--out", str(path)]) == 0
    plan = planner.Plan.load(path)
    row = plan.diloco
    assert row.shares[0] > row.shares[1] and sum(row.shares) == pytest.approx(1.0), row.shares  # by speed
    from hxtrain.training.diloco import replica_batches

    rows = replica_batches(24, row.shares, [s.data for s in row.sites])  # whole rows of 1 microbatch x data
    assert rows[0] > rows[1], rows
    capsys.readouterr()
    assert cli.main(["train", "--plan", str(path), "--strategy", "diloco", "--sync-every", "2", "--steps", "2",
                     "--data", str(corpus), "--no-progress", "--sample-tokens", "0"]) == 0
    text = capsys.readouterr().out
    assert "strategy=diloco model=tiny" in text and "microbatches=1 batch=24 steps=2" in text
    assert f"replica a: rows 0..{rows[0] - 1} of each batch" in text
    assert f"replica b: rows {rows[0]}..23 of each batch" in text
    assert "shares given" in text
    assert [(s.data, s.tensor) for s in row.sites] == [(4, 1), (4, 1)]  # the row's choice, not the mesh's 2 x 2
    for s in row.sites:  # each replica at the row's data x tensor
        assert f"site '{s.name}' (cpu, client 'cpu', data {s.data} x tensor {s.tensor}," in text, text
    assert "done: 2 inner steps, 1 outer steps" in text
    assert cli.main(["train", "--plan", str(path), "--strategy", "diloco", "--shares", "1,1", "--steps", "1",
                     "--data", str(corpus), "--no-progress", "--sample-tokens", "0"]) == 0
    assert "replica a: rows 0..11 of each batch" in capsys.readouterr().out  # the user's shares win
    one = tmp_path / "one.toml"  # a plan without the row (as one written before DiLoCo was planned)
    dataclasses.replace(plan, diloco=None).to_toml(one)
    assert cli.main(["train", "--plan", str(one), "--strategy", "diloco", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hxtrain train: error: --plan: this plan of ") and "has no DiLoCo row" in err[-1]


def test_cli_train_plan_refuses_overrides(tmp_path, capsys):
    plan_file = tmp_path / "plan.toml"
    assert cli.main(["plan", "--mesh", "local", "--model", "tiny", "--global-batch", "8",
                     "--out", str(plan_file)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--plan", str(plan_file), "--schedule", "gpipe", "--steps", "1"]) == 2
    assert "the plan fixes schedule; drop those options" in capsys.readouterr().err
