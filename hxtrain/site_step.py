"""One step of one site's part of the schedule, walked in the site's own task order over a transport.

The same dataflow as `executor.run_step` (the last stage's F is fused into its B), but each site process walks
only its own order and blocks on `transport.recv` for what its neighbours send.

Shapes: M microbatches, mb microbatch size, T sequence length, D model width.
    tokens [M, mb, T+1] int32 on the host; activations / cotangents [mb, T, D], P('data') on the site.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain import stage as _stage
from hxtrain.executor import StageState


def check_schedule(schedule) -> None:
    """ValueError when the per-site loop cannot run `schedule`."""
    if schedule.split_backward:
        raise ValueError(f"schedule {schedule.name!r} splits the backward (W tasks), which the per-site loop does "
                         "not run yet; use gpipe, 1f1b or interleaved")


def put_data(x: np.ndarray, stage: StageState, spec=P("data")):
    """A host array onto the stage's site, sharded over `data` on its leading axis."""
    return jax.device_put(x, NamedSharding(stage.role.mesh, spec))


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
    held = {}
    for t in order:
        st = stages[t.stage]
        if t.kind == "F":
            x = put(tokens[t.microbatch, :, :-1], st) if t.stage == 0 else transport.recv(
                st.site, ("act", t.stage, t.microbatch))
            held[(t.stage, t.microbatch)] = x
            if not st.role.last:
                out = _stage.forward(st.role, st.params, x)
                transport.send(out, st.site, (t.stage + 1) % n_sites, ("act", t.stage + 1, t.microbatch))
        elif t.kind == "B":
            x = held.pop((t.stage, t.microbatch))
            if st.role.last:
                targets = put(tokens[t.microbatch, :, 1:], st)
                out, st.gacc, st.lacc = _stage.last_step(st.role, st.params, x, targets, st.gacc, st.lacc, scale)
            else:
                dy = transport.recv(st.site, ("cot", t.stage, t.microbatch))
                out, st.gacc = _stage.backward(st.role, st.params, x, dy, st.gacc)
            if t.stage > 0:
                transport.send(out, st.site, (t.stage - 1) % n_sites, ("cot", t.stage - 1, t.microbatch))
        else:
            raise NotImplementedError(f"task kind {t.kind!r} (split weight-gradient) is not supported per site yet")
    if held:
        raise RuntimeError(f"site order left forwards without their backward: {sorted(held)}")
