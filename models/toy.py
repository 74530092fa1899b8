"""A second, different model that follows hxtrain's pipeline protocol: a byte-level gated-MLP "mixer".

It exists to prove the protocol is not GPT-only: no attention, no position table, RMS norm, gated (GLU) blocks
with their own parameter names, an untied head. Logical axis names only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 256
    seq_len: int = 16
    width: int = 24
    hidden: int = 48
    n_layers: int = 6


def _normal(rngs, shape, axes, scale):
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=axes)


class Embed(nnx.Module):
    def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
        self.table = _normal(rngs, (cfg.vocab_size, cfg.width), ("vocab", "embed"), 0.1)

    def __call__(self, tokens):  # [B, T] -> [B, T, D]
        return self.table[...][tokens]


class GatedBlock(nnx.Module):
    """h + W_down(silu(W_gate x) * W_up x) with x = rmsnorm(h), plus a causal shift-mix of the previous token."""

    def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
        self.gain = nnx.Param(jnp.ones((cfg.width,)), out_sharding=("embed",))
        self.gate = _normal(rngs, (cfg.width, cfg.hidden), ("embed", "mlp"), 0.2)
        self.up = _normal(rngs, (cfg.width, cfg.hidden), ("embed", "mlp"), 0.2)
        self.down = _normal(rngs, (cfg.hidden, cfg.width), ("mlp", "embed"), 0.1)
        self.mix = nnx.Param(jnp.full((cfg.width,), 0.5), out_sharding=("embed",))

    def __call__(self, h):  # [B, T, D]
        x = h * jax.lax.rsqrt((h * h).mean(-1, keepdims=True) + 1e-6) * self.gain[...]
        prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # token t sees t-1: causal
        x = x + self.mix[...] * prev
        return h + (jax.nn.silu(x @ self.gate[...]) * (x @ self.up[...])) @ self.down[...]


class Readout(nnx.Module):
    def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
        self.proj = _normal(rngs, (cfg.width, cfg.vocab_size), ("embed", "vocab"), 0.1)

    def __call__(self, h, targets):  # [B, T, D], [B, T] -> scalar
        logp = jax.nn.log_softmax(h @ self.proj[...], axis=-1)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()


class Mixer(nnx.Module):
    def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
        with nnx.use_eager_sharding(False):
            self.embed = Embed(cfg, rngs)
            self.blocks = nnx.List([GatedBlock(cfg, rngs) for _ in range(cfg.n_layers)])
            self.head = Readout(cfg, rngs)


def loss(model: Mixer, tokens):
    h = model.embed(tokens[:, :-1])
    for block in model.blocks:
        h = block(h)
    return model.head(h, tokens[:, 1:])
