"""Zero-bubble (zb-h1: split backward, W tasks) with each site walking its own order, as a site process does.

In one process: two site threads over blocking in-memory mailboxes give the same accumulators as the fused
backward. As OS processes: `hxtrain launch --schedule zb-h1` gives the in-process Trainer's losses."""

import functools
import re
import sys
import threading
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import hxtrain
from hxtrain.sites import process as site_runner
from hxtrain.config import topology as T
from hxtrain.engine.executor import put_data, run_step
from hxtrain.schedules.tables import Task
from hxtrain.engine.executor import warm_up_split
from hxtrain.sites.process import check_schedule
from models import toy
from tests.helpers import assert_trees_close, rel_err
from tests.test_multiprocess import _Run, _check_rows, _reference, _topology

M, MB, SEQ = 4, 2, 16  # microbatches (>= 4 so that B and W separate in zb-h1), microbatch size, sequence length
SPLIT = {"backward_input", "backward_weight", "last_input", "last_weight"}  # the split-backward programs


class _Mailboxes:
    """Blocking mailboxes shared by site threads of one process: `send` places the array on the receiver's mesh as
    P('data') (as `NetTransport.recv` does) and stores it; `recv` waits for it. `view(site)` is one site's transport."""

    def __init__(self, meshes, wait=60.0):
        self.meshes, self.wait = meshes, wait
        self.box: dict = {}
        self.cv = threading.Condition()

    def view(self, site: int):
        return _SiteTransport(self, site)


class _SiteTransport:
    def __init__(self, boxes: _Mailboxes, site: int):
        self.boxes, self.site = boxes, site

    def send(self, x, src, dst, key):
        assert src == self.site, (src, self.site)
        y = jax.device_put(x, NamedSharding(self.boxes.meshes[dst], P("data")))
        with self.boxes.cv:
            self.boxes.box[(dst, key)] = y
            self.boxes.cv.notify_all()

    def recv(self, dst, key):
        with self.boxes.cv:
            if not self.boxes.cv.wait_for(lambda: (dst, key) in self.boxes.box, self.boxes.wait):
                raise TimeoutError(f"site {dst}: nothing arrived under {key}")
            return self.boxes.box.pop((dst, key))

    def clear(self):  # one fresh set of mailboxes per step: another site may already have sent into it
        pass


def _pipe(schedule):
    model = toy.Mixer(toy.ToyConfig(n_layers=4), nnx.Rngs(0))
    return hxtrain.Pipeline(model, T.uniform(2, data=2), schedule=schedule, microbatches=M, partition=[3, 1])


def _tokens(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (M, MB, SEQ + 1)).astype(np.int32)


def _site_threads(pipe, tokens, orders):
    """Each site's part of `run_step` in its own thread, as each site process runs it; re-raises the first error."""
    boxes, errors, outs = _Mailboxes(pipe.meshes), [], {}
    by_site = [{s.index: s for s in pipe.stages if s.site == k} for k in range(2)]

    def site(k):
        try:
            outs[k] = run_step(by_site[k], orders[k], tokens, boxes.view(k), n_sites=2, n_stages=len(pipe.stages),
                               last_data=pipe.stages[-1].data)
        except BaseException as e:  # noqa: BLE001  (reported by the test thread)
            errors.append(e)

    threads = [threading.Thread(target=site, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert not boxes.box, f"unread mailboxes: {sorted(boxes.box, key=repr)}"
    return _host(pipe.stages, *outs.values())


def _host(stages, *outs):
    """Per stage (gacc, lacc or None) on the host, from the `StepOutput`s of the processes that ran them."""
    merged = {i: (o.gacc[i], o.lacc.get(i)) for o in outs for i in o.gacc}
    assert sorted(merged) == [s.index for s in stages], f"stages run: {sorted(merged)}"
    return [jax.device_get(merged[s.index]) for s in stages]


@functools.cache
def _fused():
    """Per stage (gacc, lacc) of one step of the in-process executor with the fused backward (1f1b), on host."""
    fused = _pipe("1f1b")
    return _host(fused.stages, run_step(fused.stages, fused.tasks, _tokens(), fused.transport))


def _assert_accumulators(stages, got, want):
    for s, (gacc, lacc), (want_gacc, want_lacc) in zip(stages, got, want):
        assert_trees_close(gacc, want_gacc, what=f"stage {s.index} gacc")
        if s.role.last:
            assert rel_err(lacc, want_lacc) <= 1e-5
        else:
            assert lacc is None and want_lacc is None


@pytest.mark.parametrize("name", ["1f1b", "1f1b:2", "zb-h1:2"])
def test_per_site_fused_backward_matches_the_executor(name):
    """Each site walking its own order (as a site process does) accumulates what the fused backward does, also
    for the latency-aware tables (more in flight; zb-h1:2 with W tasks)."""
    pipe = _pipe(name)
    got = _site_threads(pipe, _tokens(), pipe.schedule.site_orders(2, M))
    _assert_accumulators(pipe.stages, got, _fused())


def test_per_site_zero_bubble_accumulates_the_fused_backward():
    tokens, want = _tokens(), _fused()
    zb = _pipe("zb-h1")
    orders = zb.schedule.site_orders(2, M)
    assert all(any(t.kind == "W" for t in o) for o in orders)
    # the last site's order separates its B and W tasks (else the test would not exercise the split)
    kinds = [t.kind for t in orders[1]]
    assert kinds.index("W") > kinds.index("B") + 1, kinds
    compiled: list[str] = []  # programs compiled, in order

    def on_compile(event, _secs, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(fun_name.removeprefix("jit(").removesuffix(")"))

    def canary(a):  # a fresh program: proves the listener sees compiles
        return a + 1

    act, toks = np.zeros((MB, SEQ, 24), np.float32), np.zeros((MB, SEQ), np.int32)
    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        for s in zb.stages:
            warm_up_split(s, s.params, put_data, act, act, toks)
        jax.jit(canary)(np.float32(0))
        warmed = len(compiled)
        got = _site_threads(zb, tokens, orders)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)
    # (stage 0 is first: no input gradient; stage 1 last.) Unless an earlier test compiled them, warm-up compiled them.
    assert "canary" in compiled[:warmed] and set(compiled[:warmed]) <= SPLIT | {"canary"}, compiled
    assert not SPLIT & set(compiled[warmed:]), f"compiled in the step, not in warm-up: {compiled[warmed:]}"
    _assert_accumulators(zb.stages, got, want)


def test_per_site_order_errors_name_the_task():
    pipe = _pipe("zb-h1")
    first, tokens = {0: pipe.stages[0]}, _tokens()

    def step(order, boxes=None):
        run_step(first, order, tokens, (boxes or _Mailboxes(pipe.meshes)).view(0), n_sites=2, n_stages=2,
                 last_data=2)

    with pytest.raises(RuntimeError, match=r"task W0: stage 0 microbatch 0 runs before its F in this order"):
        step([Task(0, 0, "W")])
    with pytest.raises(RuntimeError, match=r"left \(stage, microbatch\) \[\(0, 0\)\] without their B task"):
        step([Task(0, 0, "F")])
    boxes = _Mailboxes(pipe.meshes)  # site 1's cotangents, already there
    for m in (0, 1):
        boxes.view(1).send(np.zeros((MB, SEQ, 24), np.float32), 1, 0, ("cot", 0, m))
    with pytest.raises(RuntimeError, match=r"left \(stage, microbatch\) \[\(0, 0\)\] without their W task"):
        step([Task(0, 0, "F"), Task(0, 1, "F"), Task(0, 0, "B"), Task(0, 1, "B"), Task(0, 1, "W")], boxes)
    with pytest.raises(ValueError, match=r"stage 0 microbatch 0: kind 'X' is not one of F, B, W"):
        step([SimpleNamespace(stage=0, microbatch=0, kind="X")])


def test_site_runner_accepts_zero_bubble(tmp_path):
    topo = hxtrain.load_topology(_topology(tmp_path))
    assert site_runner.check_supported(topo, "b", hxtrain.get_schedule("zb-h1")) == 1
    with pytest.raises(site_runner.SiteError, match="sends from the last site back to the first.*3 sites"):
        site_runner.check_supported(hxtrain.uniform(3), "s0", hxtrain.get_schedule("interleaved"))
    with pytest.raises(ValueError, match="expected a Schedule with per-site task orders .*got str"):
        check_schedule("zb-h1")


def test_zero_bubble_site_processes_match_the_in_process_trainer(tmp_path):
    mesh = _topology(tmp_path, data=1, schedule='"zb-h1"', microbatches=M, batch_size=M * MB)
    # --timeout generous: the split programs may compile in step 1. The compile log shows which programs each site ran.
    run = _Run([sys.executable, "-m", "hxtrain", "launch", "--mesh", str(mesh), "--timeout", "120", "--out",
                str(tmp_path / "out")], env={"JAX_LOG_COMPILES": "1"})
    ref = _reference(mesh, schedule="zb-h1", microbatches=M, batch_size=M * MB)
    assert run.finish(300) == 0, run.text()
    rows = _check_rows(tmp_path / "out", ref)
    assert [r["step"] for r in rows["b"]] == [1, 2, 3]
    out = run.text()  # the sites ran the split programs (stage 0 is first: no input gradient, W only)
    for site, program in (("a", "backward_weight"), ("b", "last_input"), ("b", "last_weight")):
        assert re.search(rf"^\[{site}\] .*Compiling jit\({program}\)", out, re.M), f"site {site} never ran {program}"
