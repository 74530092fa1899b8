"""The MPMD executor: a loop over a schedule table, dispatching per-site stage programs.

Nothing here is compiled across sites. For each task of the table, in order, it picks the stage's program, feeds it
the stage input (tokens, or an activation from the mailbox), and sends the output to the next stage's site
(forward) or the input cotangent to the previous one (backward). JAX dispatch is asynchronous, so a site's next
program is queued while a transfer is in flight; the host never waits inside a step.

The last stage's forward is fused into its backward (forward + loss + backward in one program), so its "F" task
only holds the input; every other stage keeps just its inputs between F and B (the backward recomputes).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain import stage as _stage


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
class TaskRecord:
    site: int
    stage: int
    microbatch: int
    kind: str
    start: float
    end: float


def _put(x: np.ndarray, stage: StageState, spec=P("data")):
    return jax.device_put(x, NamedSharding(stage.role.mesh, spec))


def run_step(stages: list[StageState], tasks, tokens: np.ndarray, transport, *,
             poison: bool = False, record: Callable[[TaskRecord], None] | None = None, width: int = 0):
    """Run one step's forward and backward over all microbatches; gradients accumulate in each stage's `gacc`.

    tokens: int32 [M, mb, T+1] on the host. `record` (timeline) forces each task to finish before the next so that
    its start/end are real; leave it None for speed.
    """
    M, mb, T1 = tokens.shape
    last = stages[-1]
    transport.clear()  # nothing from an earlier (possibly failed) step may be read by this one
    scale = jnp.float32(1.0 / (M * last.data))
    for s in stages:
        s.gacc = _stage.zeros_accumulator(s.params, s.shardings, s.data)
    last.lacc = _put(np.zeros((last.data,), np.float32), last)

    if len(stages) == 1:  # the whole model on one stage: one fused program over every microbatch
        s = stages[0]
        s.gacc, s.lacc = _stage.whole_step(s.role, s.params, _put(tokens, s, P(None, "data")), s.gacc, s.lacc, scale)
        return

    if poison:  # every slot a task will read, pre-filled with NaN; real tensors overwrite them on arrival
        for t in tasks:
            st = stages[t.stage]
            if t.kind == "F" and t.stage > 0:
                transport.poison(st.site, ("act", t.stage, t.microbatch), (mb, T1 - 1, width), np.float32)
            if t.kind == "B" and t.stage < len(stages) - 1:
                transport.poison(st.site, ("cot", t.stage, t.microbatch), (mb, T1 - 1, width), np.float32)

    held: dict[tuple[int, int], jax.Array] = {}
    for t in tasks:
        st = stages[t.stage]
        t0 = time.perf_counter()
        if t.kind == "F":
            x = (_put(tokens[t.microbatch, :, :-1], st) if t.stage == 0
                 else transport.recv(st.site, ("act", t.stage, t.microbatch)))
            held[(t.stage, t.microbatch)] = x
            out = None
            if st is not last:
                out = _stage.forward(st.role, st.params, x)
                nxt = stages[t.stage + 1]
                transport.send(out, st.site, nxt.site, ("act", nxt.index, t.microbatch))
        elif t.kind == "B":
            x = held.pop((t.stage, t.microbatch))
            if st is last:
                targets = _put(tokens[t.microbatch, :, 1:], st)
                out, st.gacc, st.lacc = _stage.last_step(st.role, st.params, x, targets, st.gacc, st.lacc, scale)
            else:
                dy = transport.recv(st.site, ("cot", t.stage, t.microbatch))
                out, st.gacc = _stage.backward(st.role, st.params, x, dy, st.gacc)
            if t.stage > 0:
                prv = stages[t.stage - 1]
                transport.send(out, st.site, prv.site, ("cot", prv.index, t.microbatch))
        else:
            raise NotImplementedError(
                f"task kind {t.kind!r} (split weight-gradient) is not supported by this executor yet")
        if record is not None:
            jax.block_until_ready((out, st.gacc))
            record(TaskRecord(st.site, t.stage, t.microbatch, t.kind, t0, time.perf_counter()))
    if held:
        raise RuntimeError(f"schedule left forwards without their backward: {sorted(held)}")


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
