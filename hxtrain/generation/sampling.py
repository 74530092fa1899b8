"""Sampling: one loop for every forward (one device or pipelined), with or without the KV cache.

    tokens = generate(model, [[72, 101, 108]], 50, temperature=0.8, top_k=40, seed=1)   # np.int32 [1, 50]
    tokens = generate(model, prompt, 50, topology=uniform(2), partition=[5, 3])          # the same, on 2 sites
    text = sample_text(model, tokenizer, "Hello", 50)                                   # prompt + continuation

With the cache (the default): one prefill of the whole prompt [B, P] writes the caches (length P + n_tokens, at
most the model's context `cfg.seq_len`), then one decode step per token [B, 1]; both are the forward's jitted
stage programs, the caches donated. Without (`cache=False`, the reference and the benchmark's baseline): every
token recomputes the whole sequence, padded to P + n_tokens so that it compiles once; causal attention makes the
padding invisible. Sampling is one jitted function of the last position's logits [B, V] (fp32): temperature,
then top-k, then top-p (nucleus), then `jax.random.categorical` with a key folded from `seed` and the step, so a
seed gives the same tokens on any forward. Temperature 0 is greedy (argmax). `compute_dtype` is what the forward
computes in (`forward.Stages`; default: each site's policy when pipelined, else float32); the logits it hands
over are float32 whatever it is, so sampling itself is float32.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from hxtrain.config.checks import COMPUTE_DTYPES
from hxtrain.generation.forward import Stages


class GenerationError(ValueError):
    """A request generation cannot serve (empty prompt, too long, a bad sampling setting), in one line."""


# ---- checks ---------------------------------------------------------------------------------------------------------

def _whole(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _prompt(prompt_ids, vocab_size: int) -> np.ndarray:
    """list[int] [P] or [B, P] (nested lists or an array) -> int32 [B, P], checked against the vocabulary."""
    try:
        arr = np.asarray(prompt_ids)
    except ValueError:  # ragged rows
        raise GenerationError("--prompt: the rows of a batch of prompts must have equal lengths") from None
    if arr.size == 0:
        raise GenerationError("--prompt: empty; give at least one token of text")
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
        raise GenerationError(f"--prompt: expected token ids, a list of ints [P] or an int array [B, P]; got "
                              f"{arr.dtype} of shape {arr.shape}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if len(bad):
        b, p = bad[0]
        raise GenerationError(f"--prompt: token {int(arr[b, p])} at position {int(p)} is outside the model's "
                              f"vocabulary of {vocab_size} (0..{vocab_size - 1})")
    return arr.astype(np.int32)


def _check(P: int, n_tokens, context: int, temperature, top_k, top_p, seed) -> None:
    if not _whole(n_tokens) or n_tokens < 1:
        raise GenerationError(f"--tokens: expected a whole number >= 1 of new tokens, got {n_tokens!r}")
    if P + n_tokens > context:
        raise GenerationError(f"--tokens: prompt of {P} tokens + {n_tokens} new tokens = {P + n_tokens} exceeds the "
                              f"model's context of {context} tokens (seq_len); ask for at most {max(context - P, 0)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"--temperature: expected a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not _whole(top_k) or top_k < 1):
        raise GenerationError(f"--top-k: expected a whole number >= 1 (1 = greedy), got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0 < top_p <= 1):
        raise GenerationError(f"--top-p: expected a number in (0, 1] (1 = off), got {top_p!r}")
    if not _whole(seed) or not 0 <= seed < 2**32:
        raise GenerationError(f"--seed: expected a whole number in [0, 2**32), got {seed!r}")


# ---- choosing the next token ----------------------------------------------------------------------------------------

def _top_k(logits, k: int):  # [B, V] -> [B, V], all but the k largest at -inf
    kth = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p(logits, p):  # [B, V] -> [B, V], the smallest set of largest logits whose probability reaches p
    desc = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V]
    probs = jax.nn.softmax(desc, axis=-1)
    kept = (jnp.cumsum(probs, axis=-1) - probs) < p  # the largest is always kept
    cut = jnp.min(jnp.where(kept, desc, jnp.inf), axis=-1, keepdims=True)  # [B, 1]
    return jnp.where(logits < cut, -jnp.inf, logits)


@functools.partial(jax.jit, static_argnames=("greedy", "top_k", "nucleus"))
def _pick(logits, seed, step, temperature, top_p, *, greedy: bool, top_k: int | None, nucleus: bool):
    """logits [B, V] -> next tokens [B] int32. fp32 throughout; `seed` uint32 and `step` int32 give the key."""
    logits = logits.astype(jnp.float32)
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        logits = _top_k(logits, min(top_k, logits.shape[-1]))
    if nucleus:
        logits = _top_p(logits, top_p)
    key = jax.random.fold_in(jax.random.key(seed), step)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, donate_argnums=0)
def _write(buffer, tokens, at):  # buffer [B, T], tokens [B] -> buffer with column `at` set
    return jax.lax.dynamic_update_slice_in_dim(buffer, tokens[:, None].astype(buffer.dtype), at, axis=1)


# ---- the loop -------------------------------------------------------------------------------------------------------

def forward_for(model, topology=None, partition=None, *, cache: bool = True,
                compute_dtype: str | None = None) -> Stages:
    """`model` as the forward generation runs: itself if it already is one (`Stages`), pipelined across
    `topology`'s sites when one is given, else on one device. `compute_dtype` (one of COMPUTE_DTYPES) on every
    stage; None: each site's policy when pipelined, float32 on one device."""
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise GenerationError(f"--compute-dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {compute_dtype!r}")
    if isinstance(model, Stages):
        if compute_dtype is not None and set(model.compute_dtypes) != {compute_dtype}:
            raise GenerationError(f"--compute-dtype: {compute_dtype} asked for, but the given Stages compute in "
                                  f"{', '.join(model.compute_dtypes)}; build them with compute_dtype={compute_dtype!r}")
        return model
    if topology is not None:
        return Stages.pipelined(model, topology, partition, cache=cache, compute_dtype=compute_dtype)
    return Stages.local(model, cache=cache, compute_dtype="float32" if compute_dtype is None else compute_dtype)


def generate(model, prompt_ids, n_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, cache: bool = True, topology=None, partition=None,
             compute_dtype: str | None = None, return_logits: bool = False):
    """Continue `prompt_ids` (list[int] [P], or [B, P]) by `n_tokens` tokens -> np.int32 [B, n_tokens].

    `model`: a generation-protocol model (`hxtrain.core.parts`) or a prepared `Stages` (reuse one to avoid placing
    the parameters again). `topology` (+ `partition`, blocks per site): sample pipelined across its sites.
    `compute_dtype`: what the forward computes in (`forward_for`); the logits sampled from are float32.
    `return_logits`: also return the logits each token was drawn from, np.float32 [B, n_tokens, V].
    GenerationError (one line) for an empty prompt, a token outside the vocabulary, more tokens than the context
    holds, or a bad temperature / top_k / top_p / seed / compute_dtype.
    """
    fwd = forward_for(model, topology, partition, cache=cache, compute_dtype=compute_dtype)
    prompt = _prompt(prompt_ids, fwd.vocab_size)
    B, P = prompt.shape
    _check(P, n_tokens, fwd.context, temperature, top_k, top_p, seed)
    pick = functools.partial(_pick, greedy=temperature == 0, top_k=top_k,
                             nucleus=top_p is not None and top_p < 1)
    knobs = (np.uint32(seed), np.float32(temperature or 1.0), np.float32(1.0 if top_p is None else top_p))
    length = P + n_tokens
    if cache:
        caches = fwd.init_caches(B, length)
        logits, caches = fwd.step(prompt, 0, caches)  # prefill: the whole prompt at once
    else:
        buffer = fwd.place_tokens(np.pad(prompt, ((0, 0), (0, n_tokens))))  # [B, P + n_tokens], fixed shape
        logits = fwd.full(buffer, P - 1)
    out, seen = [], []
    for i in range(n_tokens):
        token = pick(logits, knobs[0], np.int32(i), *knobs[1:])  # [B] on the last stage's mesh
        out.append(token)
        if return_logits:
            seen.append(logits)
        if i + 1 == n_tokens:
            break
        if cache:
            logits, caches = fwd.step(token[:, None], P + i, caches)
        else:
            buffer = _write(buffer, fwd.place_tokens(token), np.int32(P + i))
            logits = fwd.full(buffer, P + i)
    tokens = np.stack([np.asarray(t) for t in out], axis=1)
    if return_logits:
        return tokens, np.stack([np.asarray(x) for x in seen], axis=1)
    return tokens


def sample_text(model, tokenizer, prompt: str, n_tokens: int, **kw) -> str:
    """`prompt` and `n_tokens` tokens generated after it, as text: tokenizer.decode(prompt ids + new ids).
    `model`: as for `generate`; `kw`: generate's keywords (temperature, top_k, top_p, seed, cache, topology,
    compute_dtype)."""
    ids = list(tokenizer.encode(prompt))
    new = generate(model, ids, n_tokens, **kw)[0]
    return tokenizer.decode(ids + [int(t) for t in new])
