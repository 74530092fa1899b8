"""The MPMD step engine: a loop over a schedule's tasks, dispatching per-site stage programs.

One engine for every MPMD run (`run_step`): in one process it walks the whole table for every stage over the
in-process transport; in a site process it walks that site's own order for its stages over the network transport
(or, for a site of several processes, the group transport). The two differ only in what they own and the transport
they hold.

Nothing here is compiled across sites. For each task of the table, in order, it picks the stage's program, feeds it
the stage input (tokens, or an activation from the mailbox), and sends the output to the next stage's site
(forward) or the input cotangent to the previous one (backward). JAX dispatch is asynchronous, so a site's next
program is queued while a transfer is in flight; the host never waits inside a step.

Task kinds:
  F  non-last stage: run the forward, send the output on. Last stage: only hold the input (its forward is fused
     into its backward, which needs the loss anyway).
  B  without W tasks in the table: the whole backward (recompute, input and weight gradients, accumulate).
     With W tasks (zero-bubble): the input gradient only, sent back at once; the stage input and the incoming
     cotangent (on the last stage: the targets) stay held until W. The first stage's B computes nothing (tokens
     have no gradient); its W does the whole weight gradient.
  W  the weight gradient, accumulated into the stage's donated `gacc`; releases the held input.

Every stage keeps just its inputs between F and its last backward task (the backward programs recompute), and
`StepStats.peak_held` reports the most inputs each site held at once.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain import stage as _stage
from hxtrain.placement import DATA
from hxtrain.schedules import Task
from hxtrain.simulate import Event


@dataclasses.dataclass
class StageState:
    """One stage on its site: its role (compiled program key), params, shardings and step accumulators."""

    index: int
    site: int
    role: _stage.StageRole
    params: dict
    shardings: dict
    data: int
    gacc: Any = None
    lacc: Any = None


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step did. peak_held[site]: the most stage inputs the executor held on that site at once (F done,
    last backward task not yet). events: the step's timeline (compute and transfer `Event`s, seconds from the
    step start), empty unless the step was recorded."""

    peak_held: tuple[int, ...]
    events: tuple[Event, ...] = ()


@jax.jit
def _marker(a):
    # A tiny read of an accumulator: it becomes ready when the program that wrote the accumulator finishes, and
    # unlike the accumulator itself it is never donated (a donated array is deleted and cannot be waited on).
    return a.reshape(-1)[:1]


class _Recorder:
    """Times a step without serialising it (the host keeps dispatching ahead; nothing here blocks it).

    One watcher thread per site (compute) and per directed link (transfers) waits, in dispatch order, on each
    task's outputs / each delivered array (`block_until_ready` releases the GIL) and stamps `perf_counter()` when
    they are ready: that is the event's *end*, measured. A task's *start* is the latest of its dispatch, its site's
    previous task's end and the arrival of the inputs it reads: the earliest moment the device could have begun
    it (devices run their programs in order). A transfer runs from the send's dispatch to the moment the array
    is ready on the receiver. Costs one small extra program per task and the threads' wake-ups, so a recorded
    step is a little slower than a plain one; on a CPU "site", the watcher threads also share the cores.
    """

    def __init__(self, n_sites: int):
        self.t0 = time.perf_counter()
        self.n_sites = n_sites
        self._pools: dict[tuple, ThreadPoolExecutor] = {}
        self._compute: list[tuple] = []  # (site, name, task, dispatch time, Future | None, input keys)
        self._transfers: list[tuple] = []  # (src, dst, name, task, dispatch time, Future, nbytes, mailbox key)
        self._ready: dict[tuple, Future | Task] = {}  # mailbox key -> when it is filled (a Future or a task's end)

    def _watch(self, stream: tuple, arrays) -> Future | None:
        arrays = [a for a in jax.tree.leaves(arrays) if a is not None]
        if not arrays:
            return None
        pool = self._pools.get(stream)
        if pool is None:
            pool = self._pools[stream] = ThreadPoolExecutor(1, thread_name_prefix=f"hxtrain-watch-{stream}")
        return pool.submit(lambda: (jax.block_until_ready(arrays), time.perf_counter())[1])

    def compute(self, site: int, name: str, task: Task | None, dispatched: float, outputs, accumulators=None,
                inputs=()) -> None:
        """A task was dispatched at `dispatched`; `outputs` are its fresh results, `accumulators` the donated
        ones (watched through a marker); `inputs` the mailbox keys it read."""
        marks = [_marker(jax.tree.leaves(a)[0]) for a in (accumulators or ()) if a is not None]
        fut = self._watch(("compute", site), [outputs, marks])
        self._compute.append((site, name, task, dispatched, fut, tuple(inputs)))

    def transfer(self, src: int, dst: int, key: tuple, task: Task, dispatched: float, x, delivered) -> None:
        """`x` was sent from site src to dst under mailbox `key`; `delivered` is the array on the receiver."""
        if src == dst:  # a same-site hand-over is no transfer: the input is there when its producer ends
            self._ready[(dst, key)] = task
            return
        fut = self._watch(("transfer", src, dst), delivered if delivered is not None else x)
        self._ready[(dst, key)] = fut
        name = f"{task.token(self.n_sites)} {src}->{dst}"
        self._transfers.append((src, dst, name, task, dispatched, fut, int(x.size * x.dtype.itemsize), key))

    def finish(self) -> list[Event]:
        """Wait for every watcher; the step's events, seconds from the step start, compute then transfers."""
        try:
            rows = self._compute_times()
            consumer_end = {key: rows[i][1] for i, (*_, inputs) in enumerate(self._compute) for key in inputs}
            events = []
            for (site, name, task, *_), (start, end) in zip(self._compute, rows):
                kw = dict(stage=task.stage, microbatch=task.microbatch, kind=task.kind) if task else {}
                events.append(Event(site, name, start - self.t0, end - self.t0, **kw))
            for src, dst, name, task, t, fut, nbytes, key in self._transfers:
                # A watcher thread may wake late under load; the consumer finishing proves the data was there.
                end = min(fut.result(), consumer_end.get((dst, key), float("inf")))
                events.append(Event(src, name, t - self.t0, max(end, t) - self.t0, task.stage, task.microbatch,
                                    task.kind, "transfer", dst, nbytes))
            return events
        finally:
            self.close()

    def _compute_times(self) -> list[list[float]]:
        """[start, end] per compute record (absolute perf_counter seconds)."""
        end_of: dict[Task, float] = {}
        site_free = [0.0] * self.n_sites
        rows: list[list[float]] = []
        for site, _, task, t, fut, inputs in self._compute:
            ready = [end_of[r] if isinstance(r, Task) else r.result() for r in map(self._ready.get, inputs)]
            start = max([t, site_free[site]] + ready)
            end = fut.result() if fut is not None else start  # computed nothing (last stage's F): no time
            start = min(start, end)
            site_free[site] = max(site_free[site], end)
            if task is not None:
                end_of[task] = end
            rows.append([start, end])
        # A task that computed nothing sits at its inputs' (watcher-stamped, possibly late) arrival; it cannot be
        # later than the start of its site's next task, whose end was measured.
        nxt = [float("inf")] * self.n_sites
        for (site, _, _, _, fut, _), row in zip(reversed(self._compute), reversed(rows)):
            if fut is None:
                row[0] = row[1] = min(row[1], nxt[site])
            nxt[site] = row[0]
        return rows

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown(wait=False)


def put_data(x: np.ndarray, stage: StageState, spec=P(DATA)):
    """A host array onto the stage's site, sharded over `data` on its leading axis (or laid out by `spec`)."""
    return jax.device_put(x, NamedSharding(stage.role.mesh, spec))


def _poison(stages: dict, n_stages: int, tasks, transport, shape) -> None:
    # Every slot a task will read, pre-filled with NaN; real tensors overwrite them on arrival. A slot holds what
    # stage s - 1 (activation) or stage s (cotangent of its output) computes, so it takes that stage's dtype.
    for t in tasks:
        st = stages[t.stage]
        if t.kind == "F" and t.stage > 0:
            dtype = jnp.dtype(stages[t.stage - 1].role.compute_dtype)
            transport.poison(st.site, ("act", t.stage, t.microbatch), shape, dtype)
        if t.kind == "B" and t.stage < n_stages - 1:
            transport.poison(st.site, ("cot", t.stage, t.microbatch), shape, jnp.dtype(st.role.compute_dtype))


def backward_task(st: StageState, x, c, split: bool, scale):
    """Task B of stage `st` on its held input `x`; `c` is the targets on the last stage, else the cotangent dy of
    its output. Adds into st.gacc (unless `split`: the weight gradient waits for W) and st.lacc (last stage).
    Returns the input cotangent dx, None on the first stage."""
    if st.role.last:
        if split:  # input gradient and loss now; the weight gradient at W
            out, st.lacc = _stage.last_input(st.role, st.params, x, c, st.lacc, scale)
        else:
            out, st.gacc, st.lacc = _stage.last_step(st.role, st.params, x, c, st.gacc, st.lacc, scale)
    elif split:  # the first stage's input is tokens: no input gradient, its W does all the work
        out = None if st.role.first else _stage.backward_input(st.role, st.params, x, c)
    else:
        out, st.gacc = _stage.backward(st.role, st.params, x, c, st.gacc)
    return out


def weight_task(st: StageState, x, c, scale) -> None:
    """Task W of a split backward: the weight gradient of stage `st` from its input and the `c` its B held."""
    if st.role.last:
        st.gacc = _stage.last_weight(st.role, st.params, x, c, st.gacc, scale)
    else:
        st.gacc = _stage.backward_weight(st.role, st.params, x, c, st.gacc)


def warm_up_split(stage: StageState, params, put, act: np.ndarray, dy: np.ndarray, toks: np.ndarray) -> None:
    """Compile (by running once, on zeros) the split-backward programs `stage` runs in a zero-bubble step.

    `params`: the stage's parameters (or a copy with the layout a later step will see); `put(host, stage)` places
    host data on the stage's site; act [mb, T, D] zeros in the dtype of the stage's input, dy [mb, T, D] zeros in
    the dtype of its output (its compute dtype); toks int32 [mb, T] zeros. Nothing of the real
    state is touched: accumulators are fresh zeros and only `gacc`/`lacc` are donated."""
    gacc = _stage.zeros_accumulator(params, stage.shardings, stage.data)
    x = put(toks if stage.role.first else act, stage)
    one = jnp.float32(1.0)
    if stage.role.last:
        if stage.role.first:  # the whole model on one stage runs `whole_step`, never the split programs
            return
        targets = put(toks, stage)
        lacc = put(np.zeros((stage.data,), np.float32), stage)
        outs = (_stage.last_input(stage.role, params, x, targets, lacc, one),
                _stage.last_weight(stage.role, params, x, targets, gacc, one))
    else:
        dy = put(dy, stage)
        outs = (None if stage.role.first else _stage.backward_input(stage.role, params, x, dy),
                _stage.backward_weight(stage.role, params, x, dy, gacc))
    jax.block_until_ready(outs)


def run_step(stages, tasks, tokens: np.ndarray, transport, *, n_sites: int | None = None,
             n_stages: int | None = None, last_data: int | None = None, put=None, poison: bool = False,
             record: Callable[[Event], None] | None = None, timeline: bool = False, width: int = 0) -> StepStats:
    """Run the step's tasks of the stages this process owns; gradients accumulate in each owned stage's `gacc`.

    The one step engine of every MPMD run. In one process, `stages` is every stage (a list) and `tasks` the whole
    table in its global order, over an `InProcessTransport`. In a site process, `stages` is {index: StageState}
    of that site's stages and `tasks` the site's own order, over a network transport; `n_sites`, `n_stages` and
    `last_data` (the `data` size of the last stage, which scales the loss) describe the whole pipeline, and `put`
    places host data on a site that spans several processes. They default to what `stages` implies when it holds
    every stage.

    tokens: int32 [M, mb, T+1] on the host. `timeline=True` (or a `record` callback, called with each `Event` once
    the step is done) times every task and transfer (see `_Recorder`: how, and what it costs). `poison` pre-fills
    every mailbox slot with NaN (in-process transport, tests).
    """
    owned = dict(stages) if isinstance(stages, dict) else {s.index: s for s in stages}
    n_stages = len(owned) if n_stages is None else n_stages
    n_sites = 1 + max(s.site for s in owned.values()) if n_sites is None else n_sites
    last_data = owned[n_stages - 1].data if last_data is None else last_data
    put = put_data if put is None else put
    M, mb, T1 = tokens.shape
    transport.clear()  # nothing from an earlier (possibly failed) step may be read by this one
    # The loss weight of a microbatch, placed once on the last stage's site (a host scalar would be copied onto
    # the site's devices at every call).
    scales = {s.index: put(np.float32(1.0 / (M * last_data)), s, P()) for s in owned.values() if s.role.last}
    for s in owned.values():
        s.gacc = _stage.zeros_accumulator(s.params, s.shardings, s.data)
        if s.role.last:
            s.lacc = put(np.zeros((s.data,), np.float32), s)
    rec = _Recorder(n_sites) if (timeline or record is not None) else None
    try:
        if n_stages == 1:  # the whole model on one stage: one fused program over every microbatch
            s = owned[0]
            t0 = time.perf_counter()
            toks = put(tokens, s, P(None, DATA))
            s.gacc, s.lacc = _stage.whole_step(s.role, s.params, toks, s.gacc, s.lacc, scales[0])
            if rec is not None:
                rec.compute(s.site, "step", None, t0, None, (s.gacc, s.lacc))
            return _finish(rec, record, (0,) * n_sites)
        if poison:
            _poison(owned, n_stages, tasks, transport, (mb, T1 - 1, width))
        peak = _walk(owned, tasks, tokens, transport, rec, scales, n_sites, put)
        return _finish(rec, record, peak)
    finally:
        if rec is not None:
            rec.close()


def _walk(stages: dict[int, StageState], tasks, tokens, transport, rec, scales, n_sites, put) -> tuple[int, ...]:
    """The per-task loop of `run_step`; returns the peak number of held stage inputs per site."""
    split = any(t.kind == "W" for t in tasks)  # a split-backward table gives every site W tasks
    held: dict[tuple[int, int], jax.Array] = {}  # (stage, microbatch) -> stage input, from F to the last backward
    cots: dict[tuple[int, int], jax.Array] = {}  # split backward: dy (targets on the last stage) from B to W
    live, peak = [0] * n_sites, [0] * n_sites

    def send(x, st: StageState, key, task):
        # Asynchronous: device_put (in-process) only enqueues the copy, so the sender's next program is dispatched
        # at once and runs while the activation travels; the receiver's program waits for the array, not the host.
        # Stage s runs on site s % n_sites (interleaved schedules wrap around).
        t0 = time.perf_counter()
        dst = key[1] % n_sites
        delivered = transport.send(x, st.site, dst, key)
        if rec is not None:
            rec.transfer(st.site, dst, key, task, t0, x, delivered)

    try:
        for t in tasks:
            st, key = stages[t.stage], (t.stage, t.microbatch)
            t0 = time.perf_counter()
            inputs: list = []  # mailbox keys this task reads (its recorded start waits for them)
            out = None
            if t.kind == "F":
                if t.stage == 0:
                    x = put(tokens[t.microbatch, :, :-1], st)
                else:
                    inputs.append((st.site, ("act", t.stage, t.microbatch)))
                    x = transport.recv(*inputs[-1])
                held[key] = x
                live[st.site] += 1
                peak[st.site] = max(peak[st.site], live[st.site])
                if not st.role.last:  # the last stage's forward is fused into its backward
                    out = _stage.forward(st.role, st.params, x)
                    send(out, st, ("act", t.stage + 1, t.microbatch), t)
            elif t.kind == "B":
                x = held[key] if split and key in held else _take(held, key, t, "its F")
                if st.role.last:  # the targets, on the last stage
                    c = put(tokens[t.microbatch, :, 1:], st)
                else:
                    inputs.append((st.site, ("cot", t.stage, t.microbatch)))
                    c = transport.recv(*inputs[-1])
                if split:  # W recomputes from the same input and cotangent
                    cots[key] = c
                else:
                    live[st.site] -= 1
                out = backward_task(st, x, c, split, scales.get(t.stage))
                if t.stage > 0:
                    send(out, st, ("cot", t.stage - 1, t.microbatch), t)
            elif t.kind == "W":
                live[st.site] -= 1
                weight_task(st, _take(held, key, t, "its F"), _take(cots, key, t, "its B"), scales.get(t.stage))
            else:
                raise ValueError(f"task of stage {t.stage} microbatch {t.microbatch}: kind {t.kind!r} is not one "
                                 "of F, B, W")
            if rec is not None:
                wrote_gacc = t.kind == "W" or (t.kind == "B" and not split)
                accs = (st.gacc if wrote_gacc else None, st.lacc if st.role.last and t.kind == "B" else None)
                rec.compute(st.site, t.token(n_sites), t, t0, out, accs, inputs)
        if held:  # (cots only holds keys that are also in held)
            raise RuntimeError(f"the task order left (stage, microbatch) {sorted(held)} without their "
                               f"{'W' if split else 'B'} task")
        return tuple(peak)
    finally:  # nothing of this step stays alive on the device, also when it failed (a lost peer, a bad table)
        held.clear()
        cots.clear()


def _take(box: dict, key: tuple, task, needs: str):
    try:
        return box.pop(key)
    except KeyError:
        raise RuntimeError(f"task {task}: stage {key[0]} microbatch {key[1]} runs before {needs} in this "
                           "order (a schedule table bug)") from None


def _finish(rec: _Recorder | None, record, peak) -> StepStats:
    if rec is None:
        return StepStats(peak)
    events = rec.finish()
    if record is not None:
        for e in events:
            record(e)
    return StepStats(peak, tuple(events))


def finish_step(stages: list[StageState]):
    """Reduce each stage's accumulators over `data` (once per step). Returns (loss, grads per stage, sum of
    squared grads per stage) as device values on each stage's site."""
    grads, sqs, loss = [], [], None
    for s in stages:
        g, sq = _stage.reduce(s.gacc)
        grads.append(g)
        sqs.append(sq)
        if s.lacc is not None:
            loss = s.lacc.sum()
        s.gacc = s.lacc = None
    return loss, grads, sqs
