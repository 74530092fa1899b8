"""Cost model, planner, plan TOML and `hxtrain plan`: small hand-checked cases, no devices needed."""

import argparse
import dataclasses
import io
import re
import time

import pytest

from hxtrain.planning import costmodel as cm
from hxtrain.planning import planner as P
from hxtrain.planning.cli import run
from hxtrain.planning.problem import PlanError, make_context
from hxtrain.config.topology import Link, RunDefaults, Site, Topology, load_topology
from models.gpt import PRESETS, GPTConfig

SMALL = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_heads=4, n_layers=8, d_ff=256)


def _topo(n, *, devices=1, bandwidth=100.0, latency=1.0, batch=8, microbatches=4, data=None):
    sites = tuple(Site(f"s{i}", "cpu", devices, data or devices, 1 if data is None else devices // data)
                  for i in range(n))
    links = tuple(Link((f"s{i}", f"s{i + 1}"), bandwidth, latency) for i in range(n - 1))
    return Topology("t", sites, links, RunDefaults(batch_size=batch, microbatches=microbatches), "<code>")


def _hw(*peaks, memory=1e12):
    return {f"s{i}": cm.Hardware(peak_flops=p, memory_bytes=memory, compute_dtype="float32")
            for i, p in enumerate(peaks)}


# --- cost model ------------------------------------------------------------------------------------------------


def test_block_params_match_the_gpt_model():
    from flax import nnx

    from models.gpt import TINY, build

    model = build(TINY)
    block = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model.blocks[0], nnx.Param)))
    total = sum(x.size for x in __import__("jax").tree.leaves(nnx.state(model, nnx.Param)))
    shape = cm.ModelShape.of(TINY)
    assert shape.block_params == block
    assert shape.params == total  # untied: embedding (V + T) D, head 2 D + D V


def test_wire_bytes_and_link_time():
    assert cm.wire_bytes("none", 10, 8) == 320
    assert cm.wire_bytes("bf16", 10, 8) == 160
    assert cm.wire_bytes("int8", 10, 8) == 10 * (8 + 4)  # + one fp32 scale per row
    assert cm.wire_bytes("fp8", 10, 8) == 120
    assert cm.link_time(1.25e9, 10.0, 15.0) == pytest.approx(0.015 + 1.0)
    with pytest.raises(cm.CostModelError, match="codec 'zip'"):
        cm.wire_bytes("zip", 1, 1)
    with pytest.raises(cm.CostModelError, match="bandwidth_gbps.*no bandwidth"):
        cm.link_time(1, 0.0, 1.0)


def test_cost_model_bad_inputs():
    with pytest.raises(cm.CostModelError, match=r"d_model: expected a positive integer, got None"):
        cm.ModelShape.of(object())
    with pytest.raises(cm.CostModelError, match=r"Assumptions.efficiency: expected a number in \(0, 1\]"):
        cm.Assumptions(efficiency=0.0)
    with pytest.raises(cm.CostModelError, match="SiteProfile.fwd_s: expected a positive number"):
        cm.SiteProfile(fwd_s=-1.0, bwd_s=1.0, tokens=10)


def test_backward_is_twice_forward_and_recompute_adds_one():
    hw = cm.Hardware(peak_flops=1e12, memory_bytes=1e12, compute_dtype="float32")
    kw = dict(microbatch=4, seq=32, data=1, tensor=1, assumptions=cm.Assumptions(task_overhead_s=0.0))
    c = cm.stage_costs(cm.ModelShape.of(SMALL), hw, **kw)
    assert c.block_bwd_in + c.block_bwd_w == pytest.approx(2 * c.block_fwd)
    r = cm.stage_costs(cm.ModelShape.of(SMALL), hw, recompute=True, **kw)
    assert r.block_bwd_in + r.block_bwd_w == pytest.approx(3 * c.block_fwd)
    assert r.block_act_bytes < c.block_act_bytes


def test_a_split_backward_costs_the_forward_its_w_recomputes():
    """The engine's B and W each recompute the stage forward from the held input (`core.programs`), so a measured
    profile's split backward costs one forward more than the unsplit one; so does recompute. Held activations
    (the estimate without recompute) cost nothing extra."""
    hw = cm.Hardware(peak_flops=1e12, memory_bytes=1e12, compute_dtype="float32")
    kw = dict(microbatch=4, seq=32, data=1, tensor=1, assumptions=cm.Assumptions(task_overhead_s=0.0))
    measured = cm.SiteProfile(fwd_s=0.002, bwd_s=0.006, tokens=4 * 32)
    m = cm.stage_costs(cm.ModelShape.of(SMALL), hw, profile=measured, **kw)
    assert m.block_bwd_in + m.block_bwd_w == pytest.approx(0.006)  # unsplit B: what was measured
    assert m.block_split_extra == pytest.approx(0.002) and m.head_split_extra == pytest.approx(m.head_fwd)
    assert cm.stage_costs(cm.ModelShape.of(SMALL), hw, **kw).block_split_extra == 0.0
    r = cm.stage_costs(cm.ModelShape.of(SMALL), hw, recompute=True, **kw)
    assert r.block_split_extra == pytest.approx(r.block_fwd)
    # ... and the simulated ZB-H1 step carries it: every W task one forward of its stage's blocks longer
    topo = _topo(2, batch=8, latency=0.0)
    prof = {"s0": measured, "s1": measured}
    none = cm.Assumptions(task_overhead_s=0.0)  # ZB-H1 has M more tasks per site: no dispatch cost, to compare
    kw2 = dict(microbatch_choices=[4], profiles=prof, assumptions=none, hardware=_hw(1e12, 1e12))
    z = P.plan(topo, SMALL, schedules=("zb-h1",), **kw2).predicted
    f = P.plan(topo, SMALL, schedules=("1f1b",), **kw2).predicted
    busy = lambda pr: sum(s.busy_s for s in pr.sites)  # noqa: E731
    # M = 4 W tasks per site, each its blocks' forward (microbatches of 8 / 4 = 2 sequences), the head's on the last
    m2 = cm.stage_costs(cm.ModelShape.of(SMALL), hw, profile=measured, **{**kw, "microbatch": 2})
    extra = 4 * (SMALL.n_layers * m2.block_split_extra + m2.head_split_extra)
    assert m2.block_split_extra == pytest.approx(0.001)  # the profile's forward, scaled to 64 of its 128 tokens
    assert busy(z) - busy(f) == pytest.approx(extra, rel=1e-6)


def test_a_tie_goes_to_the_most_slack_then_to_fewer_stage_inputs():
    """When schedules predict the same step (all hide the link), the plan takes 1F1B's latency-aware variant with
    the most microbatches in flight, then the one holding fewer stage inputs over the sites."""
    from hxtrain.planning.search import _better
    from hxtrain.planning.problem import Cand, Option
    from hxtrain.schedules.tables import get_schedule

    def cand(name, rank, step=1.0):
        sched = get_schedule(name)
        live = tuple(live_activations(o) for o in sched.site_orders(2, 4))
        return Cand(Option(name, rank, sched, 4, False, (), live), (), (2, 2), ("none",), step, ())

    from hxtrain.schedules.tables import live_activations

    gpipe, zb, k1, k4 = cand("gpipe", 3), cand("zb-h1", 1), cand("1f1b:1", 4), cand("1f1b:4", 6)
    assert _better(k4, k1) and _better(k1, gpipe) and not _better(gpipe, k1)
    assert _better(zb, gpipe)  # no 1f1b:k among them: fewer inputs held (ZB-H1's min(S, M) vs GPipe's M)
    assert _better(gpipe, cand("1f1b:4", 6, step=1.01))  # a tie only within the margin


# --- planner ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_sites,n_layers,peaks,schedule,micro,bandwidth", [
    (2, 4, (1e9, 2e9), "1f1b", 4, 100.0),
    (2, 9, (1e9, 3e9), "gpipe", 2, 1.0),
    (3, 7, (2e9, 1e9, 5e9), "1f1b", 8, 10.0),
    (3, 12, (1e9, 1e9, 3e9), "zb-h1", 4, 100.0),
    (4, 10, (5e9, 1e9, 2e9, 3e9), "1f1b", 4, 1.0),
    (4, 12, (1e9, 2e9, 3e9, 5e9), "gpipe", 8, 100.0),
])
def test_fast_partition_equals_exhaustive(n_sites, n_layers, peaks, schedule, micro, bandwidth):
    cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_heads=4, n_layers=n_layers, d_ff=256)
    kw = dict(hardware=_hw(*peaks), schedules=(schedule,), codecs=("none",), microbatch_choices=(micro,),
              time_budget_s=60.0)
    topo = _topo(n_sites, bandwidth=bandwidth, batch=16)
    fast, full = P.plan(topo, cfg, **kw), P.plan(topo, cfg, exhaustive=True, **kw)
    # Both keep a simpler choice (no recompute) within a 0.1% tie margin, so compare to that precision.
    assert fast.predicted.step_s == pytest.approx(full.predicted.step_s, rel=1e-3)
    assert sum(fast.layers) == n_layers and min(fast.layers) >= 1


def test_simulated_step_matches_hand_formula_gpipe():
    """2 identical sites, even split 4+4, GPipe, 4 microbatches of 2 sequences, one device each.

    Site 1 also runs the head, so it is the slower one and transfers never queue: the step is
    f0 + M (f1 + b1) + 2 (occupancy + latency) + b0.
    """
    D, F, T, V, M, b, peak, eff = 64, 256, 32, 256, 4, 2, 1e9, 0.5
    bw, lat = 100.0, 1.0
    mm, att, head = 2 * T * (4 * D * D + 2 * D * F), 4 * T * T * D, 2 * T * D * V
    speed = peak * eff
    f0 = 4 * b * (mm + att) / speed
    b0 = 4 * b * (2 * mm + 2 * att) / speed
    f1, b1 = f0 + b * head / speed, b0 + 2 * b * head / speed
    occ = b * T * D * 4 * 8 / (bw * 1e9)
    expected = f0 + M * (f1 + b1) + 2 * (occ + lat * 1e-3) + b0

    p = P.plan(_topo(2, bandwidth=bw, latency=lat, batch=M * b), SMALL, hardware=_hw(peak, peak),
               schedules=("gpipe",), codecs=("none",), microbatch_choices=(M,),
               assumptions=cm.Assumptions(efficiency=eff, task_overhead_s=0.0))
    assert [s.layers for s in p.even.sites] == [4, 4]
    assert p.even.step_s == pytest.approx(expected, rel=1e-12)
    assert p.predicted.step_s <= p.even.step_s  # the planner may do better than even (it moves a layer off s1)


def test_two_x_faster_site_gets_more_layers_and_beats_even_by_1_3x():
    cfg = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_heads=4, n_layers=24, d_ff=256)
    p = P.plan(_topo(2, bandwidth=1000.0, latency=0.01, batch=64), cfg, hardware=_hw(1e9, 2e9))
    layers = {s.name: s.layers for s in p.predicted.sites}  # in the pipeline order the plan chose
    assert layers["s1"] > layers["s0"]
    assert p.predicted.tokens_per_s >= 1.3 * p.even.tokens_per_s
    assert 0 < p.predicted.fraction_of_ideal <= 1


def test_measured_profile_overrides_the_estimate():
    topo = _topo(2, batch=8)
    slow = cm.SiteProfile(fwd_s=0.5, bwd_s=1.0, tokens=2 * 32)  # site 0 measured very slow
    p = P.plan(topo, SMALL, hardware=_hw(1e9, 1e9), profiles={"s0": slow})
    q = P.plan(topo, SMALL, hardware=_hw(1e9, 1e9))
    assert {s.name: s.layers for s in p.predicted.sites}["s0"] < {s.name: s.layers for s in q.predicted.sites}["s0"]
    with pytest.raises(PlanError, match=r"unknown sites \['nope'\]"):
        P.plan(topo, SMALL, hardware=_hw(1e9, 1e9), profiles={"nope": slow})


def test_model_that_fits_nowhere_is_a_clear_error():
    with pytest.raises(PlanError, match=r"model '7b' \(6\.\d+B parameters\) does not fit in device memory.*"
                                        r"least memory any plan needs is [\d.]+ GiB.*largest available is 1 GiB"):
        P.plan(_topo(2, batch=8), PRESETS["7b"], hardware=_hw(1e12, 1e12, memory=2**30), model_name="7b")


def test_bad_batch_and_microbatch_choices():
    topo = _topo(2, devices=4, batch=8)
    one_head = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_heads=1, n_layers=4, d_ff=256)  # tensor 1 only
    with pytest.raises(PlanError, match=r"global batch 6: no microbatch count.*'s0' needs a multiple of one of "
                                        r"data = \[4\]"):
        P.plan(topo, one_head, hardware=_hw(1e9, 1e9), global_batch=6)
    with pytest.raises(PlanError, match=r"microbatch_choices: \[3\] do not divide the global batch of 8"):
        P.plan(topo, SMALL, hardware=_hw(1e9, 1e9), microbatch_choices=(3,))
    with pytest.raises(PlanError, match="codecs: expected a non-empty list"):
        P.plan(topo, SMALL, hardware=_hw(1e9, 1e9), codecs=("gzip",))


def test_link_that_cannot_pay_is_explained():
    p = P.plan(load_topology("two-dc-nvidia-ascend"), PRESETS["7b"], model_name="7b")
    msg = next(w for w in p.warnings if "limits the pipeline" in w)
    assert "has 100 Gbit/s" in msg and "Gbit/s but" in msg and "of ideal" in msg
    link = p.predicted.links[0]
    assert link.available_gbps == 100.0 and link.bytes_per_step > 0


def test_diloco_is_cross_site_dp_that_exchanges_every_h_steps():
    """With H = 1 and no codec the DiLoCo row is cross-site DP's step exactly; at the default H = 500 the link's
    bytes per step fall 500x, and on the 100 Gbit/s pair (where pipelining cannot pay) it ranks first."""
    from hxtrain.config.topology import Diloco
    from hxtrain.planning import predict

    topo = load_topology("two-dc-nvidia-ascend")
    p = P.plan(topo, PRESETS["7b"], model_name="7b")
    assert p.ranked()[0] is p.diloco and p.diloco.label == "diloco H=500" and p.diloco.fits
    assert p.diloco.fraction_of_ideal > 1.8 * p.cross_site_dp.fraction_of_ideal
    assert "not the same optimisation as synchronous training" in p.diloco.notes[0]
    dp_bytes, dl_bytes = p.cross_site_dp.links[0].bytes_per_step, p.diloco.links[0].bytes_per_step
    assert dl_bytes == pytest.approx(dp_bytes / 500)
    ctx = make_context(topo, PRESETS["7b"], None, None, cm.Assumptions(), {}, {}, None)
    h1 = predict.diloco(ctx, Diloco(sync_every=1, codec="none"))
    assert h1.step_s == pytest.approx(predict.cross_site_dp(ctx).step_s, rel=1e-12)
    int8 = predict.diloco(ctx, Diloco(sync_every=1, codec="int8"))
    assert int8.step_s < h1.step_s and int8.links[0].bytes_per_step == pytest.approx(dp_bytes / 4)
    streamed = predict.diloco(ctx, Diloco(sync_every=100, fragments=4, overlap=20))  # each part hides in 20 steps
    assert streamed.step_s < predict.diloco(ctx, Diloco(sync_every=100)).step_s
    table = dataclasses.replace(topo, diloco=Diloco(sync_every=50))  # the topology's [diloco] table is used
    assert P.plan(table, PRESETS["7b"], model_name="7b").diloco.label == "diloco H=50"


def test_latency_aware_1f1b_is_chosen_where_links_are_slow_and_its_memory_is_counted():
    """With 5 ms links the planner's own schedule list also tries 1f1b:k and takes it when the simulator says it
    is faster; a list the caller gives is taken as given; the chosen plan holds the table's extra activations
    within memory, and is never slower than the even split."""
    from hxtrain.schedules.tables import get_schedule, live_activations

    topo = load_topology("two-dc-nvidia-amd")
    p = P.plan(topo, PRESETS["7b"], model_name="7b")
    without = P.plan(topo, PRESETS["7b"], model_name="7b", schedules=("zb-h1", "1f1b", "gpipe"))
    aware = ("1f1b:", "zb-h1:")
    assert p.schedule.startswith(aware) and not without.schedule.startswith(aware)
    assert p.predicted.step_s < 0.9 * without.predicted.step_s
    sched = get_schedule(p.schedule)
    orders = sched.site_orders(len(topo.sites), p.microbatches)
    want = ([min(2 + sched.extra, p.microbatches), min(2, p.microbatches)] if p.schedule.startswith("zb-h1:")
            else [min(2 + sched.extra, p.microbatches), 1])  # site 0 covers the link; the last as its base table
    assert [live_activations(o) for o in orders] == want
    assert all(s.memory_gib <= s.memory_limit_gib for s in p.predicted.sites)
    assert p.predicted.step_s <= p.even.step_s
    plain = P.plan(topo, PRESETS["7b"], model_name="7b", latency_aware=False)  # what `hxtrain plan` compares
    assert not plain.schedule.startswith(aware) and p.predicted.step_s < plain.predicted.step_s


def test_eight_sites_100k_devices_plan_in_under_a_second():
    kinds = [("cuda", "H100"), ("cuda", "A100"), ("rocm", "MI300X"), ("ascend", "Ascend910B")] * 2
    sites = tuple(Site(f"s{i}", b, 12500, 3125, 4, device_kind=k) for i, (b, k) in enumerate(kinds))
    links = tuple(Link((f"s{i}", f"s{i + 1}"), 6400.0, 5.0) for i in range(7))
    topo = Topology("big", sites, links, RunDefaults(batch_size=3125 * 32, microbatches=32), "<code>")
    assert topo.total_devices == 100_000
    P.plan(topo, PRESETS["tiny"], global_batch=3125 * 8)  # warm up imports (JAX via the capability table)
    t0 = time.perf_counter()
    p = P.plan(topo, PRESETS["70b"], model_name="70b")
    took = time.perf_counter() - t0
    print(f"8 sites, 100k devices, 70b: planned in {took:.2f} s")
    # The goal is < 1 s (measured ~0.9 s on an idle 2-core box); 5 s keeps a loaded shared CI machine from flaking.
    assert took < 5.0
    assert sum(p.layers) == 80 and min(p.layers) >= 1 and len(p.predicted.sites) == 8


def test_plan_toml_round_trips(tmp_path):
    p = P.plan(load_topology("two-dc-nvidia-amd"), PRESETS["7b"], model_name="7b")
    plan_path, topo_path = p.to_toml(tmp_path / "plan.toml")
    assert topo_path == tmp_path / "plan.topology.toml"
    q = P.Plan.load(plan_path)
    for f in ("model", "global_batch", "seq", "predicted", "even", "cross_site_dp", "diloco", "ideal_tokens_per_s",
              "warnings", "assumptions", "planning_s", "reversed_order", "compute_bound_tokens_per_s"):
        assert getattr(q, f) == getattr(p, f), f
    topo = load_topology(topo_path)  # the topology part is a plain topology file
    assert topo.sites == p.to_topology().sites and topo.links == p.to_topology().links
    assert [s.layers for s in topo.sites] == list(p.layers)
    assert (topo.run.schedule, topo.run.microbatches, topo.run.batch_size) == (p.schedule, p.microbatches, 1024)


def test_plan_load_rejects_other_files(tmp_path):
    f = tmp_path / "x.toml"
    f.write_text('name = "x"\n')
    with pytest.raises(PlanError, match=r"missing \['assumptions', 'plan', 'predicted', 'topology'\]"):
        P.Plan.load(f)


# --- CLI -------------------------------------------------------------------------------------------------------


def _args(**kw):
    base = dict(mesh="two-dc-nvidia-amd", model="7b", global_batch=None, seq=None, out="-", exhaustive=False,
                efficiency=None)
    return argparse.Namespace(**{**base, **kw})


def test_cli_prints_the_three_rows_and_writes_the_plan(tmp_path):
    out = io.StringIO()
    assert run(_args(out=str(tmp_path / "plan.toml")), out=out) == 0
    text = out.getvalue()
    rows = [line.split()[0] for line in text.splitlines() if line.strip().startswith(("planned", "even", "cross"))]
    assert rows == ["planned", "even", "cross-site"]
    assert "of ideal" in text and "GiB" in text and "Gbit/s" in text
    got = re.search(r"latency-aware schedules \(1f1b:k and zb-h1:k, more microbatches in flight per link\): with "
                    r"them ([\d.]+) s/step \(((?:1f1b|zb-h1):\d)\), without ([\d.]+) s/step \((\S+), M=\d+\): "
                    r"([\d.]+)x", text)
    assert got and not got[4].startswith(("1f1b:", "zb-h1:")), text
    assert float(got[5]) == pytest.approx(float(got[3]) / float(got[1]), rel=1e-3) and float(got[5]) > 1
    assert P.Plan.load(tmp_path / "plan.toml").model == "7b"


@pytest.mark.parametrize("edit,match", [
    (("devices = 512\ndata = 64", "devices = 0\ndata = 64"), r"sites\[0\]\.devices: expected a positive integer"),
    (("bandwidth_gbps = 400", "bandwidth_gbps = 0"), "a link with no bandwidth"),
])
def test_cli_bad_topologies(tmp_path, capsys, edit, match):
    good = load_topology("two-dc-nvidia-amd").source
    bad = tmp_path / "bad.toml"
    bad.write_text(open(good).read().replace(*edit, 1))
    assert run(_args(mesh=str(bad))) == 2
    assert re.search(match, capsys.readouterr().err)


def test_cli_unknown_model(capsys):
    assert run(_args(model="9000b")) == 2
    assert "unknown model '9000b'" in capsys.readouterr().err


def test_replicated_rows_compute_what_each_site_would_alone():
    """Cross-site DP's and DiLoCo's replicas compute what the planner plans for each site holding the whole model
    by itself, memory counted: the same data x tensor, and DiLoCo's tokens/s is the sum of those plans' less its
    exchange every 500 steps. A model that fits no site alone is said not to fit."""
    topo = load_topology("two-dc-nvidia-ascend")
    p = P.plan(topo, PRESETS["7b"], model_name="7b")
    alone = [P.plan(topo.only([s.name], "sites"), PRESETS["7b"], model_name="7b",
                    global_batch=p.global_batch).predicted for s in topo.sites]
    for row in (p.diloco, p.cross_site_dp):
        assert [(s.data, s.tensor) for s in row.sites] == [(a.sites[0].data, a.sites[0].tensor) for a in alone]
    total = sum(a.tokens_per_s for a in alone)
    assert 0.99 * total < p.diloco.tokens_per_s < total
    assert p.cross_site_dp.tokens_per_s < p.diloco.tokens_per_s
    big = P.plan(load_topology("two-dc-nvidia-amd"), PRESETS["70b"], model_name="70b")  # pipelined, it fits
    assert big.predicted.fits and not big.diloco.fits and "does not fit in memory" in big.diloco.notes[-1]


def _two_x_7b() -> Topology:
    """512 H100 + 512 devices at half the peak (benchmarks/planner.py's pair), the fast site listed first."""
    sites = (Site("fast", "cuda", 512, 64, 8, device_kind="H100"),
             Site("slow", "cuda", 512, 64, 8, device_kind="H100", peak_tflops=989 / 2))
    return Topology("2x", sites, (Link(("fast", "slow"), 3200.0, 2.0),),
                    RunDefaults(batch_size=1024, microbatches=16), "<code>")


def test_the_plan_runs_the_sites_last_to_first_when_that_is_faster(tmp_path):
    """The first stage's in-site gradient all-reduce ends the step; with the slow site first (fewer layers) it is
    smaller, so the pair 2x apart runs faster reversed. The even split stays in the given order; reorder=False
    keeps it; the written topology lists the sites in the chosen order, which is the order a run pipelines them."""
    topo = _two_x_7b()
    p = P.plan(topo, PRESETS["7b"], model_name="7b")
    given = P.plan(topo, PRESETS["7b"], model_name="7b", reorder=False)
    assert p.reversed_order and [s.name for s in p.topology.sites] == ["slow", "fast"]
    assert [s.name for s in p.predicted.sites] == ["slow", "fast"] and p.layers[1] > p.layers[0]
    assert not given.reversed_order and given.topology.sites == topo.sites
    assert p.predicted.step_s < given.predicted.step_s * (1 - 1e-3)
    assert [s.name for s in p.even.sites] == ["fast", "slow"]
    assert p.even.step_s == pytest.approx(given.even.step_s, rel=1e-12)
    assert "pipeline order: slow -> fast (the topology's sites last to first" in run_report(p)
    plan_path, topo_path = p.to_toml(tmp_path / "plan.toml")
    back = P.Plan.load(plan_path)
    assert back.reversed_order and [s.name for s in back.topology.sites] == ["slow", "fast"]
    assert [s.name for s in load_topology(topo_path).sites] == ["slow", "fast"]
    assert back.compute_bound_tokens_per_s == pytest.approx(p.compute_bound_tokens_per_s)
    # a symmetric pair: reversing gains nothing, so the given order stays
    same = dataclasses.replace(topo, sites=(topo.sites[0], dataclasses.replace(topo.sites[1], peak_tflops=None)))
    assert not P.plan(same, PRESETS["7b"]).reversed_order


def test_ideal_is_each_site_alone_within_its_memory():
    """IDEAL: each site's own plan for the whole model that fits its memory, summed; the compute bound sets memory
    aside (more tensor parallelism is not forced on it), so it is higher; DiLoCo (every site alone, syncing
    every 500 steps) sits just under the ideal."""
    topo = _two_x_7b()
    p = P.plan(topo, PRESETS["7b"], global_batch=4096)
    alone = [P.plan(topo.only([s.name], "sites"), PRESETS["7b"], global_batch=4096).predicted.tokens_per_s
             for s in topo.sites]
    assert p.ideal_tokens_per_s == pytest.approx(sum(alone), rel=0.02)  # each alone plan's hill climb is timed
    assert p.compute_bound_tokens_per_s > 1.05 * p.ideal_tokens_per_s
    assert 0.99 < p.diloco.fraction_of_ideal <= 1.0


def run_report(p) -> str:
    from hxtrain.planning.cli import format_report

    return format_report(p)


def test_a_reversed_plan_keeps_the_diloco_shares_on_their_sites(tmp_path):
    """[diloco] shares follow the replicas, one per site in the topology's order when not spelled out; a plan
    that reverses the pipeline spells them out, so the written topology still gives each site its own share."""
    from hxtrain.config.topology import Diloco

    topo = dataclasses.replace(_two_x_7b(), diloco=Diloco(shares=(0.7, 0.3)))
    p = P.plan(topo, PRESETS["7b"])
    assert p.reversed_order
    _, topo_path = p.to_toml(tmp_path / "plan.toml")
    back = load_topology(topo_path)
    assert [s.name for s in back.sites] == ["slow", "fast"]
    assert dict(zip((g[0] for g in back.diloco.groups(back)), back.diloco.shares)) == {"fast": 0.7, "slow": 0.3}
    d = P.Plan.load(tmp_path / "plan.toml").diloco_topology()
    assert [s.name for s in d.sites] == ["fast", "slow"] and d.diloco.shares == (0.7, 0.3)
