"""The optimizer, per stage on its own site, with gradient clipping by the *global* norm across all sites.

optax's `clip_by_global_norm` would only see one site's gradients, so clipping is done here: each site computes the
sum of squares of its gradients (a scalar, on device), the scalars are summed across sites (the only thing besides
activations that crosses a site: 4 bytes per site per step, counted as "control"), and every site scales its
gradients by min(1, max_norm / global_norm) inside its own jitted update.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 300
    end_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global norm over every site's gradients; 0 disables
    kind: str = "adamw"  # or "sgd" (plain SGD on the same schedule: DiLoCo's exactness check uses it)

    def __post_init__(self):
        if self.kind not in ("adamw", "sgd"):
            raise ValueError(f"OptimizerConfig.kind: expected 'adamw' or 'sgd', got {self.kind!r}")
        for name in ("learning_rate", "total_steps"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):  # `nan > 0` is False: NaN is refused too
                raise ValueError(f"OptimizerConfig.{name}: expected a finite number > 0, got {value!r}")
        if self.warmup_steps < 0 or self.clip_norm < 0:
            raise ValueError(f"OptimizerConfig: warmup_steps and clip_norm must be >= 0, got "
                             f"{self.warmup_steps!r} and {self.clip_norm!r}")

    @classmethod
    def for_steps(cls, steps: int, learning_rate: float = 3e-3) -> OptimizerConfig:
        """The optimizer `hxtrain train` and `hxtrain site` use for a run of `steps` steps: warmup over a tenth of
        them (at least 1, at most 20), then cosine decay."""
        return cls(learning_rate=learning_rate, total_steps=steps, warmup_steps=min(20, max(steps // 10, 1)))

    def schedule(self) -> optax.Schedule:
        warmup = min(self.warmup_steps, max(self.total_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.learning_rate, warmup_steps=warmup,
            decay_steps=max(self.total_steps, warmup + 1), end_value=self.learning_rate * self.end_lr_fraction)

    def transform(self) -> optax.GradientTransformation:
        if self.kind == "sgd":
            return optax.sgd(self.schedule())
        # AdamW with decoupled weight decay on matrices only (not on norms and biases).
        return optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, weight_decay=self.weight_decay,
                           mask=_matrix_mask)


def _matrix_mask(params):
    """Weight decay on weight matrices only. Stacked block params carry a leading layer axis, so a block matrix
    has ndim 3 and a block bias ndim 2; top-level embed/head leaves have no such axis."""
    def mask(tree, extra):
        return jax.tree.map(lambda p: p.ndim >= 2 + extra, tree)

    return {k: mask(v, 1 if k == "blocks" else 0) for k, v in params.items()}


class SiteOptimizer:
    """One optax state per stage, kept on the stage's site; `step` applies globally clipped updates.

    `over_sites` (the SPMD path's stacked params, every leaf with a leading site axis): the same per-stage update,
    `vmap`ped over that axis."""

    over_sites = False

    def __init__(self, config: OptimizerConfig, stages):
        self.config = config
        self.tx = config.transform()
        init, update = self.tx.init, functools.partial(clipped_update, self.tx, config.clip_norm)
        if self.over_sites:
            init, update = jax.vmap(init), jax.vmap(update, in_axes=(0, 0, 0, None))
        self.states = [jax.jit(init)(s.params) for s in stages]
        # apply(params, opt_state, grads, total_sq) -> (params, opt_state): one stage's update, inputs donated
        self.apply = jax.jit(update, donate_argnums=(0, 1))

    def global_norm(self, stages, sqs) -> list[jax.Array]:
        """Sum every site's squared norm; return the global squared norm placed on each stage's site."""
        out = []
        for s in stages:
            here = [jax.device_put(sq, NamedSharding(s.role.mesh, P())) for sq in sqs]
            out.append(functools.reduce(jnp.add, here))
        return out

    def step(self, stages, grads, sqs) -> tuple[list, jax.Array]:
        """One update of every stage. Returns (the new params per stage, the global gradient norm as a device
        scalar); the old params are donated, so the caller swaps the new ones in (`StageState.with_params`)."""
        totals = self.global_norm(stages, sqs)
        params = []
        for i, s in enumerate(stages):
            p, self.states[i] = self.apply(s.params, self.states[i], grads[i], totals[i])
            params.append(p)
        return params, jnp.sqrt(totals[-1])

    def load_states(self, states: list) -> None:
        """Replace the optax state of every stage (a restored checkpoint's)."""
        if len(states) != len(self.states):
            raise ValueError(f"optimizer states: expected {len(self.states)} stages, got {len(states)}")
        self.states = list(states)

    def learning_rate(self, step: int) -> float:
        return float(self.config.schedule()(step))

    def restart_at(self, step: int) -> None:
        """Fresh optimizer state whose step counters (optax's `count` fields) read `step`: a replica that returns
        mid-run has lost its moments, but its learning-rate schedule goes on from where the run is."""
        def at(path, leaf):
            return leaf * 0 + step if getattr(path[-1], "name", None) == "count" else leaf  # keeps its placement

        self.states = [jax.tree_util.tree_map_with_path(at, s) for s in self.states]


def clipped_update(tx, clip_norm, params, opt_state, grads, total_sq):
    """One stage's optax update with its gradients scaled by min(1, clip_norm / global norm), where `total_sq` is
    the squared norm over every site's gradients (clip_norm 0: no clipping). The one clipping rule of every
    executor (`SpmdOptimizer` vmaps it over the site axis)."""
    if clip_norm > 0:
        scale = jnp.minimum(1.0, clip_norm / (jnp.sqrt(total_sq) + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
