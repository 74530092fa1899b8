"""Every schedule, executed: equals the single-device reference, holds bounded stage inputs, records a timeline.

Cases share compiled stage programs (fixed microbatch size, one partition per (sites, stages)), so the matrix of
schedules x sites x microbatches costs little beyond its first cases.
"""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import hxtrain
from hxtrain.schedules import tables as S
from hxtrain.core import programs as _stage
from hxtrain.core import placement
from hxtrain.config import topology as T
from hxtrain.engine.executor import run_step
from hxtrain.engine.transport import InProcessTransport
from models import gpt, toy
from tests.helpers import assert_trees_close, chunked_reference, rel_err

MB = 4  # microbatch size, fixed so that compiled stage programs are shared across cases
# Most cases run the toy mixer (cheap to compile, so the whole matrix fits in the test budget); the GPT runs the
# data x tensor case and the CLI. 10 blocks where 4 sites hold 8 interleaved stages unevenly.
CONFIGS = {"toy": toy.ToyConfig(n_layers=8), "toy10": toy.ToyConfig(n_layers=10), "gpt": gpt.TINY}
LOSSES = {"toy": toy.loss, "toy10": toy.loss, "gpt": gpt.loss}
# Blocks per stage: uneven everywhere (S*v stages for interleaved).
PARTITION = {("plain", 2): [5, 3], ("plain", 4): [3, 2, 2, 1],
             ("interleaved", 2): [3, 1, 2, 2], ("interleaved", 4): [2, 1, 1, 1, 1, 1, 1, 2]}


@functools.cache
def model(name: str = "toy"):
    cfg = CONFIGS[name]
    return gpt.build(cfg, seed=0) if name == "gpt" else toy.Mixer(cfg, nnx.Rngs(0))


@functools.cache
def batch(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 16 + 1)).astype(np.int32)  # seq_len 16 in all


@functools.cache
def reference(n: int, name: str = "toy"):
    """The plain model loss and grads on one device, one compiled program for every batch size."""
    return chunked_reference(LOSSES[name], model(name), batch(n), MB)


def reversed_table(sites: int, m: int) -> S.UserTable:
    """A user table unlike any built-in: per site, all forwards, then the backwards newest first (LIFO)."""
    orders = [" ".join([f"F{i}" for i in range(m)] + [f"B{i}" for i in reversed(range(m))]) for _ in range(sites)]
    if sites == 2:  # also the list-of-Tasks form
        orders[1] = [S.Task.parse(tok, site=1, sites=sites) for tok in orders[1].split()]
    return S.UserTable(orders, name="lifo")


def make_schedule(name: str, sites: int, m: int):
    return reversed_table(sites, m) if name == "table" else S.get_schedule(name)


def pipeline(name: str, sites: int, m: int, data: int = 1, tensor: int = 1, net: str = "toy",
             **kw) -> hxtrain.Pipeline:
    kind = "interleaved" if name.startswith("interleaved") else "plain"
    if (kind, sites) == ("interleaved", 4):
        net = "toy10"
    pipe = hxtrain.Pipeline(model(net), T.uniform(sites, data=data, tensor=tensor),
                            schedule=make_schedule(name, sites, m), microbatches=m,
                            partition=PARTITION[(kind, sites)], **kw)
    pipe.net = net  # which reference it must match
    return pipe


def check_against_reference(pipe: hxtrain.Pipeline, m: int, **kw):
    loss, grads = pipe.loss_and_grads(batch(m * MB), **kw)
    ref_loss, ref_grads = reference(m * MB, pipe.net)
    assert np.isfinite(loss) and rel_err(loss, ref_loss) <= 1e-5
    assert_trees_close(grads, ref_grads, rtol=1e-5)


SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1", "table")


@pytest.mark.parametrize("m_of_s", ["S", "2S", "4S+1"])
@pytest.mark.parametrize("sites", [2, 4])
@pytest.mark.parametrize("name", SCHEDULES)
def test_schedule_matches_single_device(name, sites, m_of_s):
    m = {"S": sites, "2S": 2 * sites, "4S+1": 4 * sites + 1}[m_of_s]
    pipe = pipeline(name, sites, m)
    check_against_reference(pipe, m)
    # The executor held exactly as many stage inputs per site as the table says it should.
    orders = pipe.schedule.site_orders(sites, m)
    assert pipe.last_step_stats.peak_held == tuple(S.live_activations(o) for o in orders)


def test_latency_aware_1f1b_matches_single_device():
    """1f1b:2 (two more microbatches in flight per link): the same loss and grads, and the executor holds what the
    table says (min(S-d+2, M) inputs on site d, 1 on the last)."""
    pipe = pipeline("1f1b:2", 4, 9)
    check_against_reference(pipe, 9)
    assert pipe.last_step_stats.peak_held == (6, 5, 4, 1)


def test_latency_aware_zb_h1_matches_single_device():
    """zb-h1:2: the split backward with two more microbatches in flight on every site but the last: the same loss
    and grads, and the executor holds what the table says (min(S+2, M) inputs, the last site ZB-H1's min(S, M))."""
    pipe = pipeline("zb-h1:2", 4, 9)
    check_against_reference(pipe, 9)
    assert pipe.last_step_stats.peak_held == (6, 6, 6, 4)


def test_latency_aware_interleaved_matches_single_device():
    """interleaved:2:2 (groups of S + 2 microbatches per chunk): the same loss and grads, and the executor holds
    what the table says."""
    pipe = pipeline("interleaved:2:2", 2, 9)
    check_against_reference(pipe, 9)
    orders = pipe.schedule.site_orders(2, 9)
    assert pipe.last_step_stats.peak_held == tuple(S.live_activations(o) for o in orders)


@pytest.mark.parametrize("name,m,net", [("zb-h1", 2, "gpt"), ("interleaved", 3, "toy")])
def test_data_and_tensor_parallel_sites(name, m, net):
    """2 sites x (data 2 x tensor 2): the split backward and virtual stages under GSPMD + manual data axis."""
    check_against_reference(pipeline(name, 2, m, data=2, tensor=2, net=net), m)


@pytest.mark.parametrize("name", ["zb-h1", "interleaved", "zb-h1:2", "interleaved:2:2"])
def test_poisoned_slots_leave_results_unchanged(name):
    """Every mailbox slot a task reads is pre-filled with NaN; only real transfers may overwrite them."""
    pipe = pipeline(name, 4, 5)
    check_against_reference(pipe, 5, poison=True)
    assert pipe.transport.pending() == []


def test_interleaved_counts_only_cross_site_bytes():
    """Stage s -> s+1 of an interleaved pipeline always changes site when S > 1 (2(S*v-1) boundaries, all
    counted); on one site both chunks live together and nothing crosses a site."""
    m, cfg = 3, CONFIGS["toy"]
    pipe = pipeline("interleaved", 2, m)
    pipe.loss_and_grads(batch(m * MB))
    per_boundary = m * MB * cfg.seq_len * cfg.width * 4
    assert pipe.transport.total_bytes() == 2 * (2 * 2 - 1) * per_boundary
    # stages on sites 0,1,0,1: activations cross 0->1, 1->0, 0->1 and cotangents the reverse
    assert pipe.transport.bytes_per_link() == {"0->1": 3 * per_boundary, "1->0": 3 * per_boundary}

    one = hxtrain.Pipeline(model(), T.uniform(1), schedule="interleaved", microbatches=m, partition=[5, 3])
    one.net = "toy"
    assert [s.site for s in one.stages] == [0, 0]
    check_against_reference(one, m)
    assert one.transport.total_bytes() == 0 and one.transport.bytes_per_link() == {}


@pytest.mark.parametrize("sites", [2, 4])
def test_peak_live_inputs_bounded_by_stages_not_microbatches(sites):
    """1F1B: site d holds at most min(S - d, M) inputs (<= S however large M is); GPipe holds all M."""
    for m in (1, sites, 4 * sites + 1):
        for name in ("1f1b", "gpipe"):
            pipe = pipeline(name, sites, m)
            pipe.grads(batch(m * MB))
            peak = pipe.last_step_stats.peak_held
            if name == "1f1b":
                assert peak == tuple(min(sites - d, m) for d in range(sites))
                assert max(peak) <= sites
            else:
                assert peak == (m,) * sites


def test_accumulators_are_donated():
    """Backward programs update the gradient (and loss) accumulators in place: the buffers passed in are gone."""
    pipe = pipeline("zb-h1", 2, 2)
    first, last = pipe.stages
    x0 = jax.device_put(batch(MB)[:, :-1], NamedSharding(first.role.mesh, PartitionSpec("data")))
    dy = jnp.ones_like(_stage.forward(first.role, first.params, x0))
    h = jax.device_put(dy, NamedSharding(last.role.mesh, PartitionSpec("data")))  # the last stage's input
    targets = jax.device_put(batch(MB)[:, 1:], h.sharding)
    scale = jnp.float32(0.5)

    def fresh(st):
        return _stage.zeros_accumulator(st.params, st.shardings, st.data)

    calls = [
        (lambda g: _stage.backward(first.role, first.params, x0, dy, g), fresh(first)),
        (lambda g: _stage.backward_weight(first.role, first.params, x0, dy, g), fresh(first)),
        (lambda g: _stage.last_weight(last.role, last.params, h, targets, g, scale), fresh(last)),
        (lambda g: _stage.last_step(last.role, last.params, h, targets, g, jax.device_put(jnp.zeros((1,)), h.sharding),
                                     scale), fresh(last)),
    ]
    for call, gacc in calls:
        out = call(gacc)
        assert all(a.is_deleted() for a in jax.tree.leaves(gacc))
        assert not any(a.is_deleted() for a in jax.tree.leaves(out))
    lacc = jax.device_put(jnp.zeros((1,)), h.sharding)
    _stage.last_input(last.role, last.params, h, targets, lacc, scale)
    assert lacc.is_deleted()


def test_split_backward_adds_up_to_the_fused_backward():
    """B (input gradient) + W (weight gradient) of a middle stage = the fused backward, term by term."""
    pipe = pipeline("zb-h1", 4, 4)
    st = pipe.stages[1]
    h = jax.device_put(np.random.default_rng(0).normal(size=(MB, 16, CONFIGS["toy"].width))
                       .astype(np.float32), NamedSharding(st.role.mesh, PartitionSpec("data")))
    dy = jnp.cos(h)
    dx, g = _stage.backward(st.role, st.params, h, dy, _stage.zeros_accumulator(st.params, st.shardings, 1))
    dx_b = _stage.backward_input(st.role, st.params, h, dy)
    g_w = _stage.backward_weight(st.role, st.params, h, dy, _stage.zeros_accumulator(st.params, st.shardings, 1))
    assert rel_err(dx_b, dx) <= 1e-6
    assert_trees_close(g_w, g, rtol=1e-6)


def test_split_programs_refuse_the_first_stage():
    pipe = pipeline("zb-h1", 2, 2)
    first = pipe.stages[0]
    x0 = jax.device_put(batch(MB)[:, :-1], NamedSharding(first.role.mesh, PartitionSpec("data")))
    with pytest.raises(ValueError, match="backward_input: the first stage has no input gradient"):
        _stage.backward_input(first.role, first.params, x0, jnp.zeros((MB, 16, CONFIGS["toy"].width)))
    whole = dataclasses.replace(first.role, last=True)
    with pytest.raises(ValueError, match="last_input: a stage that is both first and last"):
        _stage.last_input(whole, first.params, x0, x0, jnp.zeros((1,)), jnp.float32(1))


def test_unknown_task_kind_and_leftover_inputs_are_errors():
    pipe = pipeline("1f1b", 2, 2)

    class Odd:  # duck-typed task with a kind the executor does not know
        stage, microbatch, kind = 0, 0, "X"

    with pytest.raises(ValueError, match="kind 'X' is not one of F, B, W"):
        run_step(pipe.stages, [Odd()], batch(2 * MB).reshape(2, MB, -1), pipe.transport)
    only_f = [S.Task(0, 0, "F")]
    with pytest.raises(RuntimeError, match=r"the task order left \(stage, microbatch\) \[\(0, 0\)\] without their B task"):
        run_step(pipe.stages, only_f, batch(2 * MB).reshape(2, MB, -1), pipe.transport)


def test_table_for_other_sizes_is_refused():
    with pytest.raises(S.ScheduleError, match="this table is for sites=2, microbatches=4"):
        hxtrain.Pipeline(model(), T.uniform(2), schedule=reversed_table(2, 4), microbatches=3, partition=[5, 3])


# ---- timeline -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1f1b", "zb-h1", "interleaved"])
def test_timeline_is_a_chrome_trace_with_one_event_per_task(name, tmp_path):
    m = 4
    pipe = pipeline(name, 2, m)
    seen = []
    loss, _, _ = pipe.grads(batch(m * MB), timeline=True, record=seen.append)
    pipe.write_timeline(tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())
    slices = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    compute = [e for e in slices if e["cat"] == "compute"]
    assert sorted(e["name"] + f"@{e['pid']}" for e in compute) == sorted(
        t.token(2) + f"@{t.stage % 2}" for t in pipe.tasks)
    transfers = [e for e in slices if e["cat"] == "transfer"]
    n_boundaries = len(pipe.stages) - 1
    assert len(transfers) == 2 * n_boundaries * m  # one per activation and one per cotangent, all cross-site
    assert all(e["args"]["dst_site"] != e["pid"] and e["args"]["nbytes"] == MB * 16 * CONFIGS["toy"].width * 4
               for e in transfers)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in slices)
    assert len(seen) == len(slices) and trace["otherData"]["schedule"] == pipe.schedule.name
    # A site runs its tasks one after another, in the table's order.
    events = pipe.last_step_stats.events
    for d, order in enumerate(pipe.schedule.site_orders(2, m)):
        mine = [e for e in events if e.site == d and e.category == "compute"]
        assert [e.name for e in mine] == [t.token(2) for t in order]
        assert all(a.end <= b.start + 1e-9 for a, b in zip(mine, mine[1:]))
    summary = pipe.timeline_summary()
    assert "site 1: s1" in summary and f"analytic {100 * pipe.analytic_bubble():.1f} %" in summary


class SlowTransport(InProcessTransport):
    """Delivers every activation only after ~0.1 s of work on the receiving site (a slow link, made of compute)."""

    def send(self, x, src, dst, key):
        y = super().send(x, src, dst, key)
        if src != dst:
            y = self._box[(dst, key)] = _slow(y, self._big(dst))
        return y  # what arrives: a recorded step times the transfer to it

    @functools.cache
    def _big(self, dst):
        return jax.device_put(jnp.eye(384) * 0.5, self.meshes[dst].devices.flat[0])


@jax.jit
def _slow(x, big):
    y = jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ big), big)
    return x + 0.0 * y[0, 0]


def test_transfer_overlaps_the_senders_next_task():
    """The executor never waits for a transfer: while site 0's first activation is still travelling (slowly),
    site 0 already finished its next forward."""
    pipe = pipeline("gpipe", 2, 2, transport=SlowTransport(placement.site_meshes(T.uniform(2))))
    pipe.grads(batch(2 * MB))  # compile
    loss, _, _ = pipe.grads(batch(2 * MB), timeline=True)
    assert rel_err(loss, reference(2 * MB, "toy")[0]) <= 1e-5
    ev = {(e.site, e.name): e for e in pipe.last_step_stats.events}
    sent, nxt = ev[(0, "F0 0->1")], ev[(0, "F1")]
    assert sent.category == "transfer" and sent.dst_site == 1 and nxt.category == "compute"
    assert nxt.end < sent.end  # site 0 finished F1 while F0's output was still in flight
    assert ev[(1, "F0")].end >= sent.end  # and site 1's F0 did wait for it


def test_no_recorded_step_is_an_error():
    pipe = pipeline("1f1b", 2, 2)
    pipe.grads(batch(2 * MB))
    with pytest.raises(ValueError, match="no recorded step; run pipe.grads"):
        pipe.write_timeline("unused.json")
    with pytest.raises(ValueError, match="no recorded step; run pipe.grads"):
        pipe.timeline_summary()


def test_train_cli_writes_the_timeline(tmp_path, capsys):
    from hxtrain import cli

    text = tmp_path / "corpus.txt"
    text.write_text("hello hxtrain, a pipeline across sites. " * 200)
    mesh = tmp_path / "two.toml"
    mesh.write_text('name = "two"\n' + "".join(f'[[sites]]\nname = "{n}"\nbackend = "cpu"\ndevices = 1\ndata = 1\ntensor = 1\n\n'
                            for n in ("a", "b")) + '[[links]]\nbetween = ["a", "b"]\nbandwidth_gbps = 10\n'
                                                  'latency_ms = 1.0\n')
    out = tmp_path / "trace.json"
    rc = cli.main(["train", "--mesh", str(mesh), "--model", "tiny", "--schedule", "1f1b", "--microbatches", "2",
                   "--batch-size", "8", "--steps", "2", "--partition", "5,3", "--data", str(text), "--no-progress",
                   "--timeline", str(out), "--timeline-step", "1", "--sample-tokens", "0"])
    assert rc == 0
    trace = json.loads(out.read_text())
    compute = [e for e in trace["traceEvents"] if e.get("cat") == "compute"]
    assert len(compute) == 2 * 2 * 2  # F, B per stage and microbatch
    printed = capsys.readouterr().out
    assert "busy %" in printed and "analytic" in printed and str(out) in printed


def test_timeline_step_out_of_range_is_an_error(tmp_path):
    trainer = hxtrain.Trainer(model("gpt"), T.uniform(2), schedule="1f1b", microbatches=2, batch_size=8,
                              partition=[5, 3], data=_corpus(tmp_path))
    with pytest.raises(ValueError, match=r"timeline_step: expected a step in 1..2, got 3"):
        trainer.fit(2, progress=False, timeline=tmp_path / "t.json", timeline_step=3)


def _corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("some bytes to train on. " * 100)
    return path


@pytest.mark.parametrize("name,sites,m,fuse", [("gpipe", 2, 8, 4), ("1f1b", 4, 8, 2), ("interleaved", 2, 6, 3)])
def test_fused_microbatches_match_single_device(name, sites, m, fuse):
    """fuse = g microbatches per stage program: the schedule over M / g units, each task a scan over its g; the
    same loss and grads as one device, also with every mailbox slot poisoned with NaN; g times fewer tasks."""
    pipe = pipeline(name, sites, m, fuse=fuse)
    assert len(pipe.tasks) * fuse == len(pipeline(name, sites, m).tasks)
    check_against_reference(pipe, m, poison=True)
    assert pipe.transport.pending() == []


def test_fuse_is_checked():
    with pytest.raises(ValueError, match=r"fuse: expected a whole number >= 1 that divides microbatches \(8\), got 3"):
        pipeline("gpipe", 2, 8, fuse=3)
    with pytest.raises(ValueError, match="fuse: 2 microbatches per program is not built for the split backward of "
                                         "schedule 'zb-h1'"):
        pipeline("zb-h1", 2, 8, fuse=2)
