"""Schedules as data: hand-checked 2-site x 4-microbatch tables, properties over (S, M), and validate()'s errors."""

import itertools

import pytest

from hxtrain.schedules.tables import (GPipe, Interleaved, OneFOneB, ScheduleError, Task, UserTable, ZBH1, analytic_bubble,
                               dependencies, get_schedule, live_activations, validate)
from hxtrain.schedules.simulate import bubble_fraction, simulate


def _table(orders, sites):
    return [" ".join(t.token(sites) for t in order) for order in orders]


def _unit_bubble(schedule, sites, microbatches, b=1.0):
    orders = schedule.site_orders(sites, microbatches)
    events = simulate(orders, sites, duration=lambda site, task: b if task.kind == "B" else 1.0)
    return bubble_fraction(events, sites)


# ---- hand-written 2 sites x 4 microbatches ------------------------------------------------------------------

def test_gpipe_2x4():
    # Every site: all four forwards, then the four backwards in microbatch order.
    assert _table(GPipe().site_orders(2, 4), 2) == ["F0 F1 F2 F3 B0 B1 B2 B3", "F0 F1 F2 F3 B0 B1 B2 B3"]


def test_1f1b_2x4():
    # Site 0 warms up with S-0-1 = 1 forward, then pairs (F1,B0) (F2,B1) (F3,B2), then cools down with B3.
    # Site 1 (last) has no warm-up: F B F B ...
    assert _table(OneFOneB().site_orders(2, 4), 2) == ["F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]


def test_interleaved_2x4():
    # v=2: site 0 holds stages 0 and 2 (chunks 0, 1: "F0.1" = mb 0 on stage 2), site 1 holds stages 1 and 3.
    # Forward sequence, groups of S=2 microbatches, chunk-major: F0 F1 F0.1 F1.1 | F2 F3 F2.1 F3.1; backward the
    # same with chunks reversed: B0.1 B1.1 B0 B1 | B2.1 B3.1 B2 B3.
    # Warm-up = 2*(S-d-1) + (v-1)*S: 4 forwards on site 0, 2 on site 1; then one F, one B; then the rest of the B's.
    assert _table(Interleaved(virtual=2).site_orders(2, 4), 2) == [
        "F0 F1 F0.1 F1.1 F2 B0.1 F3 B1.1 F2.1 B0 F3.1 B1 B2.1 B3.1 B2 B3",
        "F0 F1 F0.1 B0.1 F1.1 B1.1 F2 B0 F3 B1 F2.1 B2.1 F3.1 B3.1 B2 B3",
    ]


def test_zbh1_2x4():
    # 1F1B's F/B order with W's in the bubbles, unit steps, at most min(S, M) = 2 microbatches F-done-W-not:
    # site 0: F0@0 F1@1, idle@2 (B0 comes back at 3), B0@3, F2 would be a 3rd live input -> W0@4, F2@5,
    #   B1@6, W1@7 (cap again), F3@8, B2@9, W2@10 while B3 is still on site 1, B3@11, W3@12.
    # site 1: F0@1 B0@2 F1@3 B1@4, F2 arrives at 6 -> W0@5, F2@6 B2@7, W1@8 waiting for F3, F3@9 B3@10 W2 W3.
    assert _table(ZBH1().site_orders(2, 4), 2) == ["F0 F1 B0 W0 F2 B1 W1 F3 B2 W2 B3 W3",
                                                    "F0 B0 F1 B1 W0 F2 B2 W1 F3 B3 W2 W3"]
    # That finishes in 3M + S - 1 = 13 unit steps: a bubble of 1 step per site instead of 1F1B's 3.
    assert _unit_bubble(ZBH1(), 2, 4) == pytest.approx(1 - 24 / 26)


def test_user_table_and_toml(tmp_path):
    table = UserTable(["F0 F1 B0 B1", "F0 B0 F1 B1"])
    assert (table.sites, table.microbatches) == (2, 2)
    assert table.site_orders(2, 2) == OneFOneB().site_orders(2, 2)
    with pytest.raises(ScheduleError, match=r"this table is for sites=2, microbatches=2; got sites=2, microbatches=4"):
        table.site_orders(2, 4)
    path = tmp_path / "mine.toml"
    path.write_text('virtual = 2\nsites = ["F0 F0.1 B0.1 B0", "F0 F0.1 B0.1 B0"]\n')
    loaded = get_schedule(str(path))
    assert loaded.name == "mine" and loaded.virtual == 2
    # Site 1, chunk 1 is stage 1 + 1*2 = 3.
    assert loaded.site_orders(2, 1)[1] == (Task(1, 0, "F"), Task(3, 0, "F"), Task(3, 0, "B"), Task(1, 0, "B"))
    split = tmp_path / "split.toml"
    split.write_text('split_backward = true\nsites = ["F0 B0 W0"]\n')
    assert UserTable.load(split).site_orders(1, 1) == ((Task(0, 0, "F"), Task(0, 0, "B"), Task(0, 0, "W")),)


def test_user_table_errors(tmp_path):
    with pytest.raises(ScheduleError, match=r"task token 'X0'"):
        UserTable(["F0 X0"])
    with pytest.raises(ScheduleError, match="missing task B0"):
        UserTable(["F0"])
    with pytest.raises(ScheduleError, match="file not found"):
        UserTable.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text('sites = ["F0 B0"]\nvirtul = 2\n')
    with pytest.raises(ScheduleError, match=r"unknown keys \['virtul'\]"):
        UserTable.load(bad)
    bad.write_text("sites = 3\n")
    with pytest.raises(ScheduleError, match="'sites' must be a list of strings"):
        UserTable.load(bad)
    bad.write_text('sites = ["F0 B0"]\nvirtual = 0\n')
    with pytest.raises(ScheduleError, match="'virtual' must be an int >= 1, got 0"):
        UserTable.load(bad)


def test_task_parse_and_token():
    assert Task.parse("F3", stage=2) == Task(2, 3, "F")
    assert Task.parse("B0.1", site=1, sites=3) == Task(4, 0, "B")
    assert Task(4, 0, "B").token(3) == "B0.1" and str(Task(4, 0, "B")) == "B0"
    with pytest.raises(ScheduleError, match="needs stage= or site="):
        Task.parse("F3")
    with pytest.raises(ScheduleError, match="kind: expected one of"):
        Task(0, 0, "X")


def test_get_schedule_names():
    assert isinstance(get_schedule("gpipe"), GPipe) and isinstance(get_schedule("1F1B"), OneFOneB)
    assert get_schedule("interleaved").virtual == 2 and get_schedule("interleaved:3").virtual == 3
    assert isinstance(get_schedule("zb-h1"), ZBH1) and isinstance(get_schedule("zbh1"), ZBH1)
    with pytest.raises(ScheduleError, match=r"unknown schedule 'pipedream'; choices: gpipe, 1f1b"):
        get_schedule("pipedream")
    with pytest.raises(ScheduleError, match="interleaved:<int virtual stages>"):
        get_schedule("interleaved:x")
    with pytest.raises(ScheduleError, match="Interleaved.virtual: expected an int >= 2, got 1"):
        Interleaved(virtual=1)
    with pytest.raises(ScheduleError, match="sites must be an int >= 1, got 0"):
        GPipe().site_orders(0, 4)


def test_tasks_is_unit_time_list_order():
    # 1F1B, 2x2, unit steps: s0 F0@0 F1@1 B0@3 B1@5; s1 F0@1 B0@2 F1@3 B1@4; sorted by (start, site).
    got = [(t.token(2), t.stage) for t in OneFOneB().tasks(2, 2)]
    assert got == [("F0", 0), ("F1", 0), ("F0", 1), ("B0", 1), ("B0", 0), ("F1", 1), ("B1", 1), ("B1", 0)]


# ---- properties over (S, M) -----------------------------------------------------------------------------------

GRID = [(s, m) for s in (1, 2, 3, 4) for m in sorted({1, 2, s, 2 * s, 4 * s + 1})]
SCHEDULES = [GPipe(), OneFOneB(), OneFOneB(extra=2), Interleaved(virtual=2), Interleaved(virtual=3), ZBH1(),
             ZBH1(extra=2)]


@pytest.mark.parametrize("sites,microbatches", GRID)
def test_every_schedule_validates_and_tasks_respect_dependencies(sites, microbatches):
    for sched in SCHEDULES:
        orders = sched.site_orders(sites, microbatches)
        validate(orders, sites, microbatches, sched.virtual, sched.split_backward)
        flat = sched.tasks(sites, microbatches)
        assert sorted(flat) == sorted(t for o in orders for t in o)
        position = {t: i for i, t in enumerate(flat)}
        stages = sites * sched.virtual
        assert all(position[d] < position[t] for t in flat for d in dependencies(t, stages))
        for d, order in enumerate(orders):  # each site's subsequence is its own order
            assert [t for t in flat if t.stage % sites == d] == list(order)


@pytest.mark.parametrize("sites,microbatches", GRID)
def test_bubbles_against_analytic(sites, microbatches):
    s, m = sites, microbatches
    one_f_one_b = (s - 1) / (m + s - 1)
    assert _unit_bubble(GPipe(), s, m) == pytest.approx(one_f_one_b, abs=1e-12)
    assert _unit_bubble(OneFOneB(), s, m) == pytest.approx(one_f_one_b, abs=1e-12)
    assert _unit_bubble(OneFOneB(), s, m, b=2.0) == pytest.approx(one_f_one_b, abs=1e-12)
    assert analytic_bubble("1f1b", s, m) == pytest.approx(one_f_one_b)
    inter = _unit_bubble(Interleaved(virtual=2), s, m)
    if m % s == 0:  # full groups: exactly (S-1)/(2M+S-1), i.e. (M+S-1)/(2M+S-1) of 1F1B's, -> 1/2 as M grows
        assert inter == pytest.approx(analytic_bubble("interleaved", s, m), abs=1e-12)
        assert inter <= 0.64 * one_f_one_b + 1e-12
    assert inter <= one_f_one_b + 1e-12  # padded groups: never worse than 1F1B
    zb = _unit_bubble(ZBH1(), s, m)  # F = B = W = 1 against 1F1B with B = 2
    if m >= s:  # exactly (S-1)/(3M+S-1): (M+S-1)/(3M+S-1) of 1F1B's, <= 0.4 once M >= 3(S-1)
        assert zb == pytest.approx(analytic_bubble("zb-h1", s, m), abs=1e-12)
        assert zb <= 0.5 * one_f_one_b + 1e-12
        if m >= 3 * (s - 1):
            assert zb <= 0.4 * one_f_one_b + 1e-12
    assert zb <= one_f_one_b + 1e-12


@pytest.mark.parametrize("sites,microbatches", GRID)
def test_live_activations(sites, microbatches):
    s, m = sites, microbatches
    assert live_activations(GPipe().site_orders(s, m)[0]) == m
    one = [live_activations(o) for o in OneFOneB().site_orders(s, m)]
    assert one == [min(s - d, m) for d in range(s)]
    assert max(live_activations(o) for o in ZBH1().site_orders(s, m)) == max(one)


# ---- validate() rejects ---------------------------------------------------------------------------------------

def _orders(*sites):
    n = len(sites)
    return [tuple(Task.parse(x, site=d, sites=n) for x in text.split()) for d, text in enumerate(sites)]


@pytest.mark.parametrize("orders,mb_split,match", [
    (_orders("F0 F0 F1 B0 B1", "F0 B0 F1 B1"), False,
     r"site 0: duplicate task F0 \(stage 0\) at positions 0 and 1"),
    (_orders("F0 F1 B0", "F0 B0 F1 B1"), False, r"site 0: missing task B1 \(stage 0\)"),
    (_orders("F0 F1 B0 B1", "B0 F0 F1 B1"), False, r"site 1: B0 \(stage 1\) at position 0 comes before its F0"),
    (_orders("F0 W0 B0", "F0 B0 W0"), (1, True), r"site 0: W0 \(stage 0\) at position 1 comes before its B0"),
    (_orders("F0 W0 B0", "F0 B0 W0"), (1, False),
     r"has kind 'W' but this schedule only has \('F', 'B'\).*split_backward"),
    (_orders("F0 F1 B0 B1", "F0 B0 F1 B1 F2 B2"), False, r"site 1: F2 \(stage 1\) is out of range"),
    (_orders("F0 B0 F1 B1", "F1 B1 F0 B0"), False,
     r"deadlock after 1 of 8 tasks: site 0 is stuck at B0 \(stage 0\) waiting for B0 \(stage 1\) \(on site 1, "
     r"stuck behind F1 \(stage 1\)\); site 1 is stuck at F1 \(stage 1\) waiting for F1 \(stage 0\)"),
])
def test_validate_rejects(orders, mb_split, match):
    microbatches, split = mb_split if isinstance(mb_split, tuple) else (2, mb_split)
    with pytest.raises(ScheduleError, match=match):
        validate(orders, 2, microbatches, split_backward=split)


def test_validate_rejects_wrong_site_and_self_deadlock():
    orders = [(Task(0, 0, "F"), Task(1, 0, "F"), Task(1, 0, "B"), Task(0, 0, "B")), ()]
    with pytest.raises(ScheduleError, match=r"site 0: F0 \(stage 1\) is on the wrong site; stage 1 lives on site 1"):
        validate(orders, 2, 1)
    # One site, two chunks, chunk 1's forward before chunk 0's: it waits on itself.
    with pytest.raises(ScheduleError, match=r"waiting for F0 \(stage 0\) \(later in its own order\)"):
        validate(_orders("F0.1 F0 B0.1 B0"), 1, 1, virtual=2)
    with pytest.raises(ScheduleError, match=r"expected one order per site \(2\), got 1"):
        validate(_orders("F0 B0"), 2, 1)


def test_analytic_bubble_errors():
    assert analytic_bubble("interleaved:3", 4, 8) == pytest.approx(3 / 27)
    with pytest.raises(ScheduleError, match="no formula for schedule 'table'"):
        analytic_bubble(UserTable(["F0 B0"]), 1, 1)


def test_latency_aware_1f1b_keeps_more_in_flight_and_hides_a_slow_link():
    """1f1b:k: k more warm-up forwards on every site but the last, so site d holds min(S-d+k, M) inputs (the last
    1). With a one-way link latency of 5 and F + B = 3 per microbatch, 1F1B stalls on every round trip; k extra
    in flight recover most of it, and with free links nothing is lost."""
    from hxtrain.schedules.tables import get_schedule, latency_extra

    S, M = 4, 8
    one = OneFOneB()
    for k in (1, 2):
        sched = get_schedule(f"1f1b:{k}")
        assert sched == OneFOneB(extra=k) and sched.name == f"1f1b:{k}"
        orders = sched.site_orders(S, M)
        assert [live_activations(o) for o in orders] == [min(S - d + k, M) for d in range(S - 1)] + [1]

    def step(sched, latency):
        ev = simulate(sched.site_orders(S, M), S, duration=lambda site, t: 1.0 if t.kind == "F" else 2.0,
                      transfer=(lambda a, b, t: latency) if latency else None)
        return max(e.end for e in ev)

    assert step(OneFOneB(extra=2), 5.0) < 0.85 * step(one, 5.0)
    assert step(OneFOneB(extra=2), 0.0) == step(one, 0.0)  # no latency: the same step
    assert latency_extra(10.0, 3.0) == 4 and latency_extra(0.0, 3.0) == 0
    with pytest.raises(ScheduleError, match=r"expected '1f1b:<extra microbatches in flight>', e.g. '1f1b:2'"):
        get_schedule("1f1b:x")
    with pytest.raises(ScheduleError, match="extra must be an int >= 0"):
        OneFOneB(extra=-1)


def test_latency_aware_zb_h1_keeps_more_in_flight_and_hides_a_slow_link():
    """zb-h1:k: ZB-H1 built on 1f1b:k's F/B sequence, k more inputs held on every site but the last (which keeps
    ZB-H1's min(S, M)); unit tasks with a one-way link latency of 5: most of the stall on each round trip is
    recovered, and with free links the step is ZB-H1's."""
    from hxtrain.schedules.tables import get_schedule

    S, M = 4, 8
    for k in (1, 2):
        sched = get_schedule(f"zb-h1:{k}")
        assert sched == ZBH1(extra=k) and sched.name == f"zb-h1:{k}" and sched.split_backward
        assert [live_activations(o) for o in sched.site_orders(S, M)] == [min(S + k, M)] * (S - 1) + [S]
    assert [live_activations(o) for o in ZBH1().site_orders(S, M)] == [S] * S

    def step(sched, latency):
        ev = simulate(sched.site_orders(S, M), S, duration=lambda site, t: 1.0,
                      transfer=(lambda a, b, t: latency) if latency else None)
        return max(e.end for e in ev)

    assert step(ZBH1(extra=2), 5.0) < 0.9 * step(ZBH1(), 5.0)
    assert step(ZBH1(extra=2), 0.0) == step(ZBH1(), 0.0)  # no latency: the same step
    with pytest.raises(ScheduleError, match=r"expected 'zb-h1:<extra microbatches in flight>', e.g. 'zb-h1:2'"):
        get_schedule("zb-h1:x")
    with pytest.raises(ScheduleError, match="ZBH1: extra must be an int >= 0"):
        ZBH1(extra=-1)


def test_latency_aware_interleaved_groups_more_microbatches_and_hides_a_slow_link():
    """interleaved:v:k: forwards in groups of S + k microbatches per chunk, so a chunk's output crossing a slow link
    (every site sends over one, the last back to the first) has k more microbatches of work behind it; valid and
    deadlock-free on a grid of (S, M, v, k); (v-1) k more inputs held; with a one-way latency of 3 units the step is
    shorter, and with free links no longer than interleaving's."""
    from hxtrain.schedules.tables import Interleaved, get_schedule, validate

    for S, M, v, k in itertools.product((2, 3, 4), (1, 3, 4, 5, 8, 9, 16), (2, 3), (1, 2, 4)):
        sched = Interleaved(virtual=v, extra=k)
        validate(sched.site_orders(S, M), S, M, v)
    sched = get_schedule("interleaved:2:4")
    assert sched == Interleaved(virtual=2, extra=4) and sched.name == "interleaved:2:4"
    assert get_schedule("interleaved:3").name == "interleaved" and get_schedule("interleaved:3").virtual == 3
    S, M = 2, 16
    held = [live_activations(o) for o in sched.site_orders(S, M)]
    assert held == [live + 4 for live in (live_activations(o) for o in Interleaved().site_orders(S, M))]

    def step(s, latency):
        ev = simulate(s.site_orders(S, M), S, duration=lambda site, t: 0.5 if t.kind == "F" else 1.0,
                      transfer=(lambda a, b, t: (0.0, latency)) if latency else None)  # a WAN: latencies overlap
        return max(e.end for e in ev)

    assert step(sched, 3.0) < 0.9 * step(Interleaved(), 3.0)
    assert step(sched, 0.0) <= step(Interleaved(), 0.0)
    with pytest.raises(ScheduleError, match=r"expected 'interleaved:<int virtual stages>\[:<extra microbatches"):
        get_schedule("interleaved:2:x")
    with pytest.raises(ScheduleError, match="Interleaved: extra must be an int >= 0"):
        Interleaved(extra=-1)
