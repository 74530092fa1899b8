"""One step of one site's part of the schedule, walked in the site's own task order over a transport.

The same dataflow as `executor.run_step` (the last stage's F is fused into its B), but each site process walks
only its own order and blocks on `transport.recv` for what its neighbours send.

Split backward (zero-bubble schedules, W tasks in the order): B computes only the input gradient and sends it to the
previous site at once (the last stage's B also adds its loss into `lacc`; the first stage's B computes nothing);
the stage input and the incoming cotangent (the targets on the last stage) stay held until W, which adds the weight
gradient into `gacc` and releases them.

Shapes: M microbatches, mb microbatch size, T sequence length, D model width.
    tokens [M, mb, T+1] int32 on the host; activations / cotangents [mb, T, D], P('data') on the site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from hxtrain import stage as _stage
from hxtrain.executor import StageState, backward_task, put_data, weight_task


def check_schedule(schedule) -> None:
    """ValueError when the per-site loop cannot run `schedule`.

    The loop runs every task kind a valid table holds (F, B and, with split backward, W), so any `Schedule` runs.
    What depends on the topology (interleaved sends from the last site back to the first, so it needs 2 sites) is
    checked by `site_runner.check_supported`."""
    if not callable(getattr(schedule, "site_orders", None)):
        raise ValueError(f"schedule: expected a Schedule with per-site task orders (site_orders), got "
                         f"{type(schedule).__name__}")


def run_site_step(stages: dict[int, StageState], order, tokens: np.ndarray, transport, n_sites: int,
                  n_stages: int, last_data: int, put=None) -> None:
    """This site's tasks of one step, in its own order; gradients accumulate in each local stage's `gacc`.

    `put(host_array, stage, spec)` places host data (tokens, targets) on the stage's site; a site spanning several
    processes passes its own.
    """
    put = put or put_data
    M = tokens.shape[0]
    scale = jnp.float32(1.0 / (M * last_data))
    for s in stages.values():
        s.gacc = _stage.zeros_accumulator(s.params, s.shardings, s.data)
        if s.role.last:
            s.lacc = put(np.zeros((s.data,), np.float32), s)
    transport.clear()
    if n_stages == 1:  # the whole model on one site: one fused program
        s = stages[0]
        toks = put(tokens, s, P(None, "data"))
        s.gacc, s.lacc = _stage.whole_step(s.role, s.params, toks, s.gacc, s.lacc, scale)
        return
    split = any(t.kind == "W" for t in order)  # a split-backward table gives every site W tasks
    held: dict[tuple[int, int], jax.Array] = {}  # (stage, microbatch) -> stage input, from F to the last backward
    cots: dict[tuple[int, int], jax.Array] = {}  # split: dy (targets on the last stage), from B to W
    try:
        for t in order:
            st, key = stages[t.stage], (t.stage, t.microbatch)
            if t.kind == "F":
                x = put(tokens[t.microbatch, :, :-1], st) if t.stage == 0 else transport.recv(
                    st.site, ("act", t.stage, t.microbatch))
                held[key] = x
                if not st.role.last:
                    out = _stage.forward(st.role, st.params, x)
                    transport.send(out, st.site, (t.stage + 1) % n_sites, ("act", t.stage + 1, t.microbatch))
            elif t.kind == "B":
                x = _take(held, key, t, "its F")
                if split:  # W recomputes from the same input
                    held[key] = x
                c = (put(tokens[t.microbatch, :, 1:], st) if st.role.last  # targets on the last stage
                     else transport.recv(st.site, ("cot", t.stage, t.microbatch)))
                if split:
                    cots[key] = c
                out = backward_task(st, x, c, split, scale)
                if t.stage > 0:
                    transport.send(out, st.site, (t.stage - 1) % n_sites, ("cot", t.stage - 1, t.microbatch))
            elif t.kind == "W":
                weight_task(st, _take(held, key, t, "its F"), _take(cots, key, t, "its B"), scale)
            else:
                raise ValueError(f"task of stage {t.stage} microbatch {t.microbatch}: kind {t.kind!r} is not one "
                                 "of F, B, W")
        if held:  # (cots only holds keys that are also in held)
            raise RuntimeError(f"site order left (stage, microbatch) {sorted(held)} without their "
                               f"{'W' if split else 'B'} task")
    finally:  # nothing of this step stays alive on the device, also when it failed (a lost peer, a bad table)
        held.clear()
        cots.clear()


def _take(box: dict, key: tuple, task, needs: str):
    try:
        return box.pop(key)
    except KeyError:
        raise RuntimeError(f"task {task}: stage {key[0]} microbatch {key[1]} runs before {needs} in this site's "
                           "order (a schedule table bug)") from None


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
