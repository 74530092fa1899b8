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
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain.core import programs as _stage
from hxtrain.core.placement import DATA
from hxtrain.core.stages import StageState
from hxtrain.engine.recorder import Recorder
from hxtrain.schedules.simulate import Event, Task


@dataclasses.dataclass(frozen=True)
class StepStats:
    """What one step did. peak_held[site]: the most stage inputs the executor held on that site at once (F done,
    last backward task not yet). events: the step's timeline (compute and transfer `Event`s, seconds from the
    step start), empty unless the step was recorded."""

    peak_held: tuple[int, ...]
    events: tuple[Event, ...] = ()


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


class _Accumulators:
    """The step's gradient sums (gacc, per owned stage) and loss sums (lacc, last stage), owned by `run_step`:
    every program donates the accumulator it adds into, and the new one replaces it here."""

    def __init__(self, stages: dict, zeros, put, *, grads: bool = True, group: int = 1):
        self.gacc, self.lacc, self.group = {}, {}, group
        for i, s in stages.items():
            z = zeros.get(i) if zeros else None
            if z is not None:
                self.gacc[i], lacc = z
            else:  # a forward-only pass accumulates no gradient
                self.gacc[i] = _stage.zeros_accumulator(s.params, s.shardings, s.data) if grads else None
                lacc = None
            if s.role.last:
                self.lacc[i] = lacc if lacc is not None else put(np.zeros((s.data,), np.float32), s)

    def backward(self, st: StageState, x, c, split: bool, scale):
        """Task B of stage `st` on its held input `x`; `c` is the targets on the last stage, else the cotangent dy
        of its output. Adds into the stage's gacc (unless `split`: the weight gradient waits for W) and lacc (last
        stage). Returns the input cotangent dx, None on the first stage."""
        i = st.index
        if st.role.last:
            if split:  # input gradient and loss now; the weight gradient at W
                out, self.lacc[i] = _stage.last_input(st.role, st.params, x, c, self.lacc[i], scale)
            else:
                out, self.gacc[i], self.lacc[i] = (_stage.last_step_group if self.group > 1 else _stage.last_step)(
                    st.role, st.params, x, c, self.gacc[i], self.lacc[i], scale)
        elif split:  # the first stage's input is tokens: no input gradient, its W does all the work
            out = None if st.role.first else _stage.backward_input(st.role, st.params, x, c)
        else:
            out, self.gacc[i] = (_stage.backward_group if self.group > 1 else _stage.backward)(
                st.role, st.params, x, c, self.gacc[i])
        return out

    def loss(self, st: StageState, x, targets, scale) -> None:
        """Forward-only: the last stage's scaled loss on input `x`, added into its lacc."""
        self.lacc[st.index] = _stage.last_loss(st.role, st.params, x, targets, self.lacc[st.index], scale)

    def weight(self, st: StageState, x, c, scale) -> None:
        """Task W of a split backward: the weight gradient of stage `st` from its input and the `c` its B held."""
        i = st.index
        if st.role.last:
            self.gacc[i] = _stage.last_weight(st.role, st.params, x, c, self.gacc[i], scale)
        else:
            self.gacc[i] = _stage.backward_weight(st.role, st.params, x, c, self.gacc[i])


@dataclasses.dataclass(frozen=True)
class StepOutput:
    """What `run_step` leaves: per owned stage index, the gradient sums `gacc` ([data, ...] per leaf) and, for the
    last stage, the loss sums `lacc` [data]; `stats` as in `StepStats`. `finish_step` reduces them."""

    gacc: dict
    lacc: dict
    stats: StepStats


def warm_up_split(stage: StageState, params, put, act: np.ndarray, dy: np.ndarray, toks: np.ndarray) -> None:
    """Compile (by running once, on zeros) the split-backward programs `stage` runs in a zero-bubble step.

    `params`: the stage's parameters (or a copy with the layout a later step will see); `put(host, stage)` places
    host data on the stage's site; act [mb, T, D] zeros in the dtype of the stage's input, dy [mb, T, D] zeros in
    the dtype of its output (its compute dtype); toks int32 [mb, T] zeros. Nothing of the real
    state is touched: accumulators are fresh zeros and only `gacc`/`lacc` are donated."""
    gacc = _stage.zeros_accumulator(params, stage.shardings, stage.data)
    x = put(toks if stage.role.first else act, stage)
    one = put(np.float32(1.0), stage, P())  # placed like the step's loss weight (else another compile)
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
             record: Callable[[Event], None] | None = None, timeline: bool = False, width: int = 0,
             zeros: dict | None = None, forward_only: bool = False, group: int = 1) -> StepOutput:
    """Run the step's tasks of the stages this process owns; returns their gradient and loss sums (state out: no
    stage is written to).

    The one step engine of every MPMD run. In one process, `stages` is every stage (a list) and `tasks` the whole
    table in its global order, over an `InProcessTransport`. In a site process, `stages` is {index: StageState}
    of that site's stages and `tasks` the site's own order, over a network transport; `n_sites`, `n_stages` and
    `last_data` (the `data` size of the last stage, which scales the loss) describe the whole pipeline, and `put`
    places host data on a site that spans several processes. They default to what `stages` implies when it holds
    every stage.

    tokens: int32 [M, mb, T+1] on the host; each site that reads them (the first and the last stage) gets the
    whole batch in one transfer and slices it on its devices. `zeros`: {stage index: (gacc, lacc)} zero
    accumulators from the previous step's `finish_step` (they are donated here; None builds fresh ones).
    `forward_only` (with a table of F tasks only, `schedules.forward.ForwardOnly`) computes the loss sums alone,
    for evaluation: `gacc` is then empty and no stage input is held. It is asked for, never inferred: a training
    table that lacks its backward tasks is an error, not an evaluation.
    `group` = g > 1 fuses microbatches: `tasks` is a table over M / g units, and each task runs its g
    microbatches in one program (`programs.forward_group`, ...): g times fewer programs and transfers, the fill and
    drain of units g times longer. Not with split-backward tables or `forward_only`.
    `timeline=True` (or a `record` callback, called with each `Event` once the step is done) times every task and
    transfer (see `recorder.Recorder`: how, and what it costs). `poison` pre-fills every mailbox slot with NaN (in-process
    transport, tests).
    """
    owned = dict(stages) if isinstance(stages, dict) else {s.index: s for s in stages}
    n_stages = len(owned) if n_stages is None else n_stages
    n_sites = 1 + max(s.site for s in owned.values()) if n_sites is None else n_sites
    last_data = owned[n_stages - 1].data if last_data is None else last_data
    put = put_data if put is None else put
    M, mb, T1 = tokens.shape
    if group > 1:
        if forward_only or any(t.kind == "W" for t in tasks) or M % group:
            raise ValueError(f"group: {group} microbatches per program needs a table with F and B tasks only (no "
                             f"split backward, not forward-only) and microbatches ({M}) a multiple of it")
        tokens = tokens.reshape(M // group, group, mb, T1)  # a task's unit u = microbatches u g .. (u + 1) g - 1
    transport.clear()  # nothing from an earlier (possibly failed) step may be read by this one
    # The loss weight of a microbatch, placed once on the last stage's site (a host scalar would be copied onto
    # the site's devices at every call).
    scales = {s.index: put(np.float32(1.0 / (M * last_data)), s, P()) for s in owned.values() if s.role.last}
    if forward_only and any(t.kind != "F" for t in tasks):
        bad = next(t for t in tasks if t.kind != "F")
        raise ValueError(f"forward_only: expected a table of F tasks only (ForwardOnly), got task {bad.kind}"
                         f"{bad.microbatch} of stage {bad.stage}")
    acc = _Accumulators(owned, zeros, put, grads=not forward_only, group=group)
    rec = Recorder(n_sites) if (timeline or record is not None) else None
    try:
        if n_stages == 1:  # the whole model on one stage: one fused program over every microbatch
            s = owned[0]
            t0 = time.perf_counter()
            toks = put(tokens.reshape(M, mb, T1), s, P(None, DATA))  # already one program: no grouping
            if forward_only:
                acc.lacc[0] = _stage.whole_loss(s.role, s.params, toks, acc.lacc[0], scales[0])
            else:
                acc.gacc[0], acc.lacc[0] = _stage.whole_step(s.role, s.params, toks, acc.gacc[0], acc.lacc[0],
                                                             scales[0])
            if rec is not None:
                rec.compute(s.site, "step", None, t0, None, (acc.gacc[0], acc.lacc[0]))
            return StepOutput({} if forward_only else acc.gacc, acc.lacc, _finish(rec, record, (0,) * n_sites))
        if poison:
            _poison(owned, n_stages, tasks, transport, (group,) * (group > 1) + (mb, T1 - 1, width))
        peak = _walk(owned, tasks, _Batch(tokens, owned, put), transport, rec, acc, scales, n_sites, forward_only)
        return StepOutput({} if forward_only else acc.gacc, acc.lacc, _finish(rec, record, peak))
    finally:
        if rec is not None:
            rec.close()


class _Batch:
    """The step's tokens on the sites that read them: the first stage's inputs and the last stage's targets,
    one host-to-device transfer and one slicing program per site per step."""

    def __init__(self, tokens: np.ndarray, stages: dict, put):
        self.tokens, self.stages, self.put = tokens, stages, put
        self._inputs: dict[int, tuple] = {}
        self._targets: dict[int, tuple] = {}

    def inputs(self, st: StageState, microbatch: int):
        if st.index not in self._inputs:
            self._place(st)
        return self._inputs[st.index][microbatch]

    def targets(self, st: StageState, microbatch: int):
        if st.index not in self._targets:
            self._place(st)
        return self._targets[st.index][microbatch]

    def _place(self, st: StageState) -> None:
        spec = P(*[None] * (self.tokens.ndim - 2), DATA)  # [M, mb, T+1], or [M / g, g, mb, T+1] fused
        inputs, targets = _stage.microbatches(st.role, self.put(self.tokens, st, spec))
        self._inputs[st.index], self._targets[st.index] = inputs, targets


def _walk(stages: dict[int, StageState], tasks, batch: _Batch, transport, rec, acc: _Accumulators, scales,
          n_sites, forward_only: bool = False) -> tuple[int, ...]:
    """The per-task loop of `run_step`; returns the peak number of held stage inputs per site (0 for a
    forward-only pass, which holds none)."""
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

    def recv(st: StageState, kind: str, task, inputs: list):
        # The task's input from the previous stage (an activation) or the next (a cotangent). When the recorder
        # does not know it (it came from another process), the host's wait for it is recorded as its transfer.
        inputs.append((st.site, (kind, task.stage, task.microbatch)))
        t0 = time.perf_counter()
        x = transport.recv(*inputs[-1])
        if rec is not None:
            src = task.stage - 1 if kind == "act" else task.stage + 1
            producer = Task(src, task.microbatch, "F" if kind == "act" else "B")
            rec.received(src % n_sites, st.site, inputs[-1][1], producer, t0, time.perf_counter(), x)
        return x

    try:
        for t in tasks:
            st, key = stages[t.stage], (t.stage, t.microbatch)
            t0 = time.perf_counter()
            inputs: list = []  # mailbox keys this task reads (its recorded start waits for them)
            out = None
            if t.kind == "F":
                if t.stage == 0:
                    x = batch.inputs(st, t.microbatch)
                else:
                    x = recv(st, "act", t, inputs)
                if forward_only:  # nothing is held: the last stage computes its loss now, the others send on
                    if st.role.last:
                        acc.loss(st, x, batch.targets(st, t.microbatch), scales[t.stage])
                    else:
                        out = _stage.forward(st.role, st.params, x)
                        send(out, st, ("act", t.stage + 1, t.microbatch), t)
                    if rec is not None:
                        rec.compute(st.site, t.token(n_sites), t, t0, out,
                                    (None, acc.lacc[t.stage] if st.role.last else None), inputs)
                    continue
                held[key] = x
                live[st.site] += 1
                peak[st.site] = max(peak[st.site], live[st.site])
                if not st.role.last:  # the last stage's forward is fused into its backward
                    out = (_stage.forward_group if acc.group > 1 else _stage.forward)(st.role, st.params, x)
                    send(out, st, ("act", t.stage + 1, t.microbatch), t)
            elif t.kind == "B":
                x = held[key] if split and key in held else _take(held, key, t, "its F")
                if st.role.last:  # the targets, on the last stage
                    c = batch.targets(st, t.microbatch)
                else:
                    c = recv(st, "cot", t, inputs)
                if split:  # W recomputes from the same input and cotangent
                    cots[key] = c
                else:
                    live[st.site] -= 1
                out = acc.backward(st, x, c, split, scales.get(t.stage))
                if t.stage > 0:
                    send(out, st, ("cot", t.stage - 1, t.microbatch), t)
            elif t.kind == "W":
                live[st.site] -= 1
                acc.weight(st, _take(held, key, t, "its F"), _take(cots, key, t, "its B"), scales.get(t.stage))
            else:
                raise ValueError(f"task of stage {t.stage} microbatch {t.microbatch}: kind {t.kind!r} is not one "
                                 "of F, B, W")
            if rec is not None:
                wrote_gacc = t.kind == "W" or (t.kind == "B" and not split)
                accs = (acc.gacc[t.stage] if wrote_gacc else None,
                        acc.lacc[t.stage] if st.role.last and t.kind == "B" else None)
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


def _finish(rec: Recorder | None, record, peak) -> StepStats:
    if rec is None:
        return StepStats(peak)
    events = rec.finish()
    if record is not None:
        for e in events:
            record(e)
    return StepStats(peak, tuple(events))


def finish_eval(stages, out: StepOutput):
    """The loss of a forward-only pass (a device scalar on the last stage's site), None unless the last stage is
    among `stages`."""
    loss = None
    for s in stages:
        if s.index in out.lacc:
            loss, _ = _stage.reduce_loss(out.lacc[s.index])
    return loss


def finish_step(stages, out: StepOutput):
    """Reduce each stage's accumulators over `data` (once per step). Returns (loss, grads per stage, sum of
    squared grads per stage, zeros): device values on each stage's site; loss None unless the last stage is
    among `stages`; zeros {stage index: (gacc, lacc)} the accumulators' buffers zeroed in place, for the next
    step's `run_step(zeros=...)`."""
    grads, sqs, zeros, loss = [], [], {}, None
    for s in stages:
        g, sq, zg = _stage.reduce(out.gacc[s.index])
        grads.append(g)
        sqs.append(sq)
        zl = None
        if s.index in out.lacc:
            loss, zl = _stage.reduce_loss(out.lacc[s.index])
        zeros[s.index] = (zg, zl)
    return loss, grads, sqs, zeros
