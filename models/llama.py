"""A modern decoder (Llama-style) in Flax NNX: RMSNorm, rotary positions, grouped-query attention, SwiGLU, no biases.

Reads top to bottom like `models/gpt.py`: config and presets, the three parts of hxtrain's pipeline protocol (an
embedding, a stack of identical blocks, a head that returns the loss), the model, and the single-device `loss`.
Each part also speaks the generation protocol: `embed(tokens, start)`, `block.init_cache` / `block.decode`,
`head.logits`.

Parameters carry *logical* axis names only (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`). Query heads
are grouped per KV head (q head h reads kv head h // (H / G)), so a contiguous split of `heads` and `kv_heads`
over the same mesh axis keeps every group with its KV head. Tensor parallelism is GSPMD's: the model always sees
global shapes, so the grouping is right however the two axes end up sharded (a KV axis that the mesh does not
divide stays replicated and XLA moves what each query shard needs).

Einsum legend: B batch, T query positions, S key positions, D d_model, H query heads, G kv heads, R query heads
per kv head (H = G R), K head dim, F mlp width, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 256  # bytes
    seq_len: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    n_layers: int = 4
    d_ff: int = 344
    qk_norm: bool = False  # RMSNorm of q and k over head_dim before RoPE (Qwen3 / OLMo 2 style)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    # What the cost model (hxtrain.planning.costmodel.ModelShape) reads besides the sizes.
    @property
    def gated_mlp(self) -> bool:  # SwiGLU: three [D, F] matrices
        return True

    @property
    def learned_positions(self) -> bool:  # RoPE: no position table
        return False

    @property
    def biases(self) -> bool:  # RMSNorm scales only, bias-free projections
        return False

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"LlamaConfig: d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"LlamaConfig: n_heads={self.n_heads} must be divisible by "
                             f"n_kv_heads={self.n_kv_heads} (each kv head serves a whole group of query heads)")
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim = d_model / n_heads = {self.head_dim} must be even for RoPE "
                             "(it rotates pairs of dimensions)")


PRESETS: dict[str, LlamaConfig] = {
    # Tests: as cheap as gpt's tiny; 8 blocks so that 4 sites can take an uneven split.
    "llama-tiny": LlamaConfig(seq_len=16, d_model=32, n_heads=4, n_kv_heads=2, n_layers=8, d_ff=64, qk_norm=True),
    # gpt's small in size: d_ff ~ 8/3 D (rounded to 8) keeps the SwiGLU MLP at gpt's 4D parameter count.
    "llama-small": LlamaConfig(seq_len=128, d_model=128, n_heads=4, n_kv_heads=2, n_layers=4, d_ff=344),
    # Planning-scale presets (for `hxtrain plan`): Llama 3.2 1B, Llama 2 7B, Llama 3 8B and 70B.
    "llama-1b": LlamaConfig(vocab_size=128256, seq_len=4096, d_model=2048, n_heads=32, n_kv_heads=8, n_layers=16,
                            d_ff=8192, rope_theta=500000.0),
    "llama-7b": LlamaConfig(vocab_size=32000, seq_len=4096, d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32,
                            d_ff=11008),
    "llama-8b": LlamaConfig(vocab_size=128256, seq_len=8192, d_model=4096, n_heads=32, n_kv_heads=8, n_layers=32,
                            d_ff=14336, rope_theta=500000.0),
    "llama-70b": LlamaConfig(vocab_size=128256, seq_len=8192, d_model=8192, n_heads=64, n_kv_heads=8, n_layers=80,
                             d_ff=28672, rope_theta=500000.0),
}


def _normal(rngs: nnx.Rngs, shape, axes, scale: float) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32), out_sharding=axes)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the last axis, computed in float32. [..., N] -> [..., N]."""

    def __init__(self, n: int, axis: str, eps: float):
        self.scale = nnx.Param(jnp.ones((n,), jnp.float32), out_sharding=(axis,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt((x32 * x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x, positions, theta: float):
    """Rotary position embedding, rotate-half layout. x [B, T, N, K], positions [T] int -> [B, T, N, K]."""
    K = x.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, K, 2, dtype=jnp.float32) / K)  # [K/2]
    angle = positions.astype(jnp.float32)[:, None] * inv_freq  # [T, K/2]
    cos, sin = jnp.cos(angle)[:, None], jnp.sin(angle)[:, None]  # [T, 1, K/2]: broadcast over heads
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)  # [B, T, N, K/2] each
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class Embedding(nnx.Module):
    """tokens [B, t] int32 -> h [B, t, D]: the token table only (positions enter as RoPE inside attention)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.wte = _normal(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), 0.02)

    def __call__(self, tokens, start=0):  # `start` (the first position) is unused: the table has no positions
        return self.wte[...][tokens]  # [B, t, D]


class Block(nnx.Module):
    """Pre-norm block: h + attn(norm(h)), then + swiglu(norm(h)). [B, T, D] -> [B, T, D].

    Training (`__call__`) and generation (`decode`) run the same `_forward`: training is positions 0..T-1 with no
    cache, so there is one implementation of the projections and the attention.
    """

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        D, H, G, K, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
        proj = 0.02 / (2 * cfg.n_layers) ** 0.5  # residual projections scaled down, as in gpt.py
        self.attn_norm = RMSNorm(D, "embed", cfg.norm_eps)
        self.wq = _normal(rngs, (D, H, K), ("embed", "heads", "head_dim"), 0.02)
        self.wk = _normal(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), 0.02)
        self.wv = _normal(rngs, (D, G, K), ("embed", "kv_heads", "head_dim"), 0.02)
        self.wo = _normal(rngs, (H, K, D), ("heads", "head_dim", "embed"), proj)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:
            self.q_norm = RMSNorm(K, "head_dim", cfg.norm_eps)
            self.k_norm = RMSNorm(K, "head_dim", cfg.norm_eps)
        self.rope_theta = cfg.rope_theta
        self.mlp_norm = RMSNorm(D, "embed", cfg.norm_eps)
        self.w_gate = _normal(rngs, (D, F), ("embed", "mlp"), 0.02)
        self.w_up = _normal(rngs, (D, F), ("embed", "mlp"), 0.02)
        self.w_down = _normal(rngs, (F, D), ("mlp", "embed"), proj)

    def _project(self, x, positions):  # x [B, T, D], positions [T] -> q [B, T, H, K], k and v [B, T, G, K]
        q = jnp.einsum("BTD,DHK->BTHK", x, self.wq[...])
        k = jnp.einsum("BTD,DGK->BTGK", x, self.wk[...])
        v = jnp.einsum("BTD,DGK->BTGK", x, self.wv[...])
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v

    def _attend(self, q, k, v, q_pos, k_pos):  # q [B, T, H, K], k/v [B, S, G, K], q_pos [T], k_pos [S]
        B, T, H, K = q.shape
        G = k.shape[2]
        q = q.reshape(B, T, G, H // G, K)  # [B, T, G, R, K]: query head h = g R + r reads kv head g
        scores = jnp.einsum("BTGRK,BSGK->BGRTS", q, k) / K**0.5  # [B, G, R, T, S]
        causal = k_pos[None, :] <= q_pos[:, None]  # [T, S]
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(q.dtype)
        out = jnp.einsum("BGRTS,BSGK->BTGRK", probs, v).reshape(B, T, H, K)  # [B, T, H, K]
        return jnp.einsum("BTHK,HKD->BTD", out, self.wo[...])

    def _mlp(self, x):  # [B, T, D]
        return (jax.nn.silu(x @ self.w_gate[...]) * (x @ self.w_up[...])) @ self.w_down[...]  # [B, T, F] inside

    def _forward(self, h, start, cache):
        """h [B, t, D] at positions start..start+t-1; cache None (attend to h only) or {"k", "v": [B, L, G, K]}."""
        q_pos = start + jnp.arange(h.shape[1])  # [t]
        q, k, v = self._project(self.attn_norm(h), q_pos)
        if cache is not None:  # write this chunk's k/v at `start`, then attend over the whole (masked) cache
            at = (0, start, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), at)  # [B, L, G, K]
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), at)
            cache = {"k": k, "v": v}
        h = h + self._attend(q, k.astype(q.dtype), v.astype(q.dtype), q_pos, jnp.arange(k.shape[1]))
        return h + self._mlp(self.mlp_norm(h)), cache

    def __call__(self, h):  # [B, T, D] -> [B, T, D]
        return self._forward(h, 0, None)[0]

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
        """Zero k/v caches for `length` positions: {"k": [B, L, G, K], "v": [B, L, G, K]}."""
        _, G, K = self.wk.shape
        return {"k": jnp.zeros((batch, length, G, K), dtype), "v": jnp.zeros((batch, length, G, K), dtype)}

    def decode(self, h, cache: dict, start):
        """h [B, t, D] at positions start..start+t-1 (`start` may be traced) -> (h [B, t, D], cache with this
        chunk's k/v written at start..start+t-1). Attends causally to cache positions < start and to itself."""
        return self._forward(h, start, cache)


class Head(nnx.Module):
    """(h [B, T, D], targets [B, T]) -> mean next-token cross-entropy over the B*T targets. Untied."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.norm = RMSNorm(cfg.d_model, "embed", cfg.norm_eps)
        self.w_out = _normal(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0.02)

    def logits(self, h):  # [B, T, D] -> [B, T, V]
        return self.norm(h) @ self.w_out[...]

    def __call__(self, h, targets):
        logp = jax.nn.log_softmax(self.logits(h).astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, T]
        return nll.mean()


class Llama(nnx.Module):
    """Follows hxtrain's pipeline protocol: `embed`, `blocks` (identical, applied in order), `head` (returns loss)."""

    def __init__(self, cfg: LlamaConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        with nnx.use_eager_sharding(False):  # logical names are not mesh axes; placement happens in hxtrain
            self.embed = Embedding(cfg, rngs)
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
            self.head = Head(cfg, rngs)

    def __call__(self, tokens):  # [B, T] -> logits [B, T, V]
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head.logits(h)


def loss(model, tokens: jax.Array) -> jax.Array:
    """The single-device reference. tokens: int32 [B, T+1]; mean next-token cross-entropy (nats per token)."""
    h = model.embed(tokens[:, :-1])
    for block in model.blocks:
        h = block(h)
    return model.head(h, tokens[:, 1:])


def build(cfg: LlamaConfig | str = PRESETS["llama-small"], seed: int = 0) -> Llama:
    cfg = PRESETS[cfg] if isinstance(cfg, str) else cfg
    return Llama(cfg, nnx.Rngs(seed))
