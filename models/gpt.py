"""A decoder-only transformer (GPT) in Flax NNX, byte-level by default.

Reads top to bottom: config and presets, the three parts hxtrain's pipeline protocol asks for (an embedding, a
stack of identical blocks, a head that returns the loss), the model, and the single-device reference `loss`.

Generation (hxtrain's optional generation protocol): `embed(tokens, start)` embeds tokens at positions
start..start+t-1, `Block.init_cache` / `Block.decode` keep a KV cache, and `Head.logits` gives the logits. Training
and decoding share one attention (`Block._attend`, a causal mask built from positions).

Parameters carry *logical* axis names in their `out_sharding` metadata (`vocab`, `embed`, `heads`, `head_dim`,
`mlp`); which mesh axis (if any) each maps to is decided outside the model. Nothing here knows about meshes,
sites or hxtrain.

Einsum legend: B batch, T sequence, D d_model, H heads, K head dim, F mlp width, V vocabulary, S the q/k/v triple.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 256  # bytes
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}"
            )


# Tests: compiles and runs in about a second on CPU. 8 blocks so that 4 sites can take an uneven split.
TINY = GPTConfig(seq_len=16, d_model=32, n_heads=4, n_layers=8, d_ff=64)
# The default run: trains visibly (loss from 5.5 to ~2.5 nats/byte) on a 2-core CPU in a few minutes.
SMALL = GPTConfig(seq_len=128, d_model=128, n_heads=4, n_layers=4, d_ff=512)

# Planning-scale presets (for `hxtrain plan`; far too large to train on a CPU).
PRESETS: dict[str, GPTConfig] = {
    "tiny": TINY,
    "small": SMALL,
    "350m": GPTConfig(vocab_size=50304, seq_len=2048, d_model=1024, n_heads=16, n_layers=24, d_ff=4096),
    "1b": GPTConfig(vocab_size=50304, seq_len=2048, d_model=2048, n_heads=16, n_layers=24, d_ff=8192),
    "7b": GPTConfig(vocab_size=32000, seq_len=4096, d_model=4096, n_heads=32, n_layers=32, d_ff=16384),
    "13b": GPTConfig(vocab_size=32000, seq_len=4096, d_model=5120, n_heads=40, n_layers=40, d_ff=20480),
    "70b": GPTConfig(vocab_size=32000, seq_len=4096, d_model=8192, n_heads=64, n_layers=80, d_ff=32768),
}


def _param(rngs: nnx.Rngs, shape, axes, scale: float | None = None, value: float | None = None) -> nnx.Param:
    """A Param with logical axis names; normal(0, scale) init, or a constant `value`."""
    if value is not None:
        init = jnp.full(shape, value, jnp.float32)
    else:
        init = scale * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(init, out_sharding=axes)


class LayerNorm(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
        self.scale = _param(rngs, (d,), ("embed",), value=1.0)
        self.bias = _param(rngs, (d,), ("embed",), value=0.0)

    def __call__(self, x):  # [B, T, D]
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * self.scale[...] + self.bias[...]


class Embedding(nnx.Module):
    """tokens [B, T] int32 at positions start..start+T-1 -> h [B, T, D]: token + learned position embedding."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.wte = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), scale=0.02)
        self.wpe = _param(rngs, (cfg.seq_len, cfg.d_model), (None, "embed"), scale=0.01)

    def __call__(self, tokens, start=0):
        T = tokens.shape[1]
        if isinstance(start, int):  # training (start 0) and any fixed offset: a plain slice
            pos = self.wpe[...][start:start + T]
        else:  # a traced position (decoding): the same rows, found at run time
            pos = jax.lax.dynamic_slice_in_dim(self.wpe[...], start, T, axis=0)
        return self.wte[...][tokens] + pos  # [B, T, D]


class Block(nnx.Module):
    """Pre-norm transformer block: h + attn(ln1(h)), then + mlp(ln2(h)). [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        D, H, K, F = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.d_ff
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layers) so deep stacks start stable.
        proj = 0.02 / (2 * cfg.n_layers) ** 0.5
        self.ln1 = LayerNorm(D, rngs)
        self.wqkv = _param(rngs, (3, D, H, K), (None, "embed", "heads", "head_dim"), scale=0.02)
        self.bqkv = _param(rngs, (3, H, K), (None, "heads", "head_dim"), value=0.0)
        self.wo = _param(rngs, (H, K, D), ("heads", "head_dim", "embed"), scale=proj)
        self.bo = _param(rngs, (D,), ("embed",), value=0.0)
        self.ln2 = LayerNorm(D, rngs)
        self.w1 = _param(rngs, (D, F), ("embed", "mlp"), scale=0.02)
        self.b1 = _param(rngs, (F,), ("mlp",), value=0.0)
        self.w2 = _param(rngs, (F, D), ("mlp", "embed"), scale=proj)
        self.b2 = _param(rngs, (D,), ("embed",), value=0.0)

    def _qkv(self, x):  # [B, T, D] -> q, k, v each [B, T, H, K]
        return jnp.einsum("BTD,SDHK->SBTHK", x, self.wqkv[...]) + self.bqkv[...][:, None, None]

    def _attend(self, q, k, v, q_pos, k_pos):
        """q [B, T, H, K] at positions q_pos [T]; k, v [B, S, H, K] at k_pos [S] -> [B, T, D]. A query sees the
        keys at or before its own position (causal by position, so a cache longer than what is written works)."""
        K = q.shape[-1]
        scores = jnp.einsum("BTHK,BSHK->BHTS", q, k) / K**0.5  # [B, H, T, S]
        causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("BHTS,BSHK->BTHK", probs, v)
        return jnp.einsum("BTHK,HKD->BTD", out, self.wo[...]) + self.bo[...]

    def attention(self, x):  # [B, T, D]
        q, k, v = self._qkv(x)
        pos = jnp.arange(x.shape[1])
        return self._attend(q, k, v, pos, pos)

    def mlp(self, x):  # [B, T, D]
        h = jax.nn.gelu(x @ self.w1[...] + self.b1[...])  # [B, T, F]
        return h @ self.w2[...] + self.b2[...]

    def __call__(self, h):
        h = h + self.attention(self.ln1(h))
        return h + self.mlp(self.ln2(h))

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
        """Zeros for `length` positions: {"k": [B, length, H, K], "v": [B, length, H, K]}."""
        _, _, H, K = self.wqkv[...].shape
        return {"k": jnp.zeros((batch, length, H, K), dtype), "v": jnp.zeros((batch, length, H, K), dtype)}

    def decode(self, h, cache: dict, start):
        """h [B, T, D] at positions start..start+T-1 (start may be traced) -> (h [B, T, D], cache with this chunk's
        k and v written at those positions). Attends to the cache before `start` and causally to the chunk."""
        T, L = h.shape[1], cache["k"].shape[1]
        q, k, v = self._qkv(self.ln1(h))
        at = (0, start, 0, 0)
        cache = {"k": jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at),
                 "v": jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)}
        q_pos = start + jnp.arange(T)
        h = h + self._attend(q, cache["k"].astype(q.dtype), cache["v"].astype(q.dtype), q_pos, jnp.arange(L))
        return h + self.mlp(self.ln2(h)), cache


class Head(nnx.Module):
    """(h [B, T, D], targets [B, T]) -> mean next-token cross-entropy over the B*T targets."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs, tied: nnx.Param | None = None):
        self.ln_f = LayerNorm(cfg.d_model, rngs)
        if tied is not None:
            self.wte = tied  # the embedding's [V, D] table, shared
        else:
            self.w_out = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), scale=0.02)

    def logits(self, h):  # [B, T, D] -> [B, T, V]
        h = self.ln_f(h)
        if hasattr(self, "wte"):
            return jnp.einsum("BTD,VD->BTV", h, self.wte[...])
        return h @ self.w_out[...]

    def __call__(self, h, targets):
        logits = self.logits(h).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
        return nll.mean()


class GPT(nnx.Module):
    """Follows hxtrain's pipeline protocol: `embed`, `blocks` (identical, applied in order), `head` (returns loss)."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        # Logical names are not mesh axes, so there is nothing to shard eagerly; placement happens in hxtrain.
        with nnx.use_eager_sharding(False):
            self.embed = Embedding(cfg, rngs)
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
            self.head = Head(cfg, rngs, tied=self.embed.wte if cfg.tie_embeddings else None)

    def __call__(self, tokens):  # [B, T] -> logits [B, T, V]
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head.logits(h)


def loss(model, tokens: jax.Array) -> jax.Array:
    """The single-device reference. tokens: int32 [B, T+1]; mean next-token cross-entropy (nats per token).

    Works for any model that follows the protocol (embed / blocks / head), not only GPT.
    """
    h = model.embed(tokens[:, :-1])
    for block in model.blocks:
        h = block(h)
    return model.head(h, tokens[:, 1:])


def build(cfg: GPTConfig | str = SMALL, seed: int = 0) -> GPT:
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    return GPT(cfg, nnx.Rngs(seed))
