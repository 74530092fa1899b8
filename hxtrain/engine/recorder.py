"""Timing a step of the MPMD engine without serialising it: per-task compute and per-transfer events.

`executor.run_step(timeline=True)` hands every dispatched task and transfer to a `Recorder`, which stamps when
each one's outputs are ready on watcher threads and turns that into the step's `Event`s.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from hxtrain.schedules.simulate import Event
from hxtrain.schedules.tables import Task


@jax.jit
def _marker(a):
    # A tiny read of an accumulator: it becomes ready when the program that wrote the accumulator finishes, and
    # unlike the accumulator itself it is never donated (a donated array is deleted and cannot be waited on).
    return a.reshape(-1)[:1]


class Recorder:
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
        self._received: list[tuple] = []  # (src, dst, name, task, waited, arrived, nbytes): from another process

    def _watch(self, stream: tuple, arrays) -> Future | None:
        arrays = [a for a in jax.tree.leaves(arrays) if a is not None]
        if not arrays:
            return None
        return self._pool(stream).submit(lambda: (jax.block_until_ready(arrays), time.perf_counter())[1])

    def _pool(self, stream: tuple) -> ThreadPoolExecutor:
        pool = self._pools.get(stream)
        if pool is None:
            pool = self._pools[stream] = ThreadPoolExecutor(1, thread_name_prefix=f"hxtrain-watch-{stream}")
        return pool

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
        if isinstance(delivered, Future):  # a codec's host round trip (in-process transport): wait for it first
            fut = self._pool(("transfer", src, dst)).submit(
                lambda: (jax.block_until_ready(delivered.result()), time.perf_counter())[1])
        else:
            fut = self._watch(("transfer", src, dst), delivered if delivered is not None else x)
        self._ready[(dst, key)] = fut
        name = f"{task.token(self.n_sites)} {src}->{dst}"
        self._transfers.append((src, dst, name, task, dispatched, fut, int(x.size * x.dtype.itemsize), key))

    def received(self, src: int, dst: int, key: tuple, task: Task, waited: float, arrived: float, x) -> None:
        """The input under mailbox `key` arrived on site dst from another process (a network transport): the host
        waited for it from `waited` (when it asked) until `arrived` (when the transport handed it over). That wait
        becomes a transfer event from src to dst, so a slow link shows in the timeline as transfer, not compute.
        An input this process sent itself (in-process) is already known from `transfer` and is left alone."""
        if (dst, key) in self._ready:
            return
        done: Future = Future()
        done.set_result(arrived)
        self._ready[(dst, key)] = done
        name = f"{task.token(self.n_sites)} {src}->{dst} (received)"
        self._received.append((src, dst, name, task, waited, arrived, int(x.size * x.dtype.itemsize)))

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
            for src, dst, name, task, waited, arrived, nbytes in self._received:
                events.append(Event(src, name, waited - self.t0, max(arrived, waited) - self.t0, task.stage,
                                    task.microbatch, task.kind, "transfer", dst, nbytes))
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
