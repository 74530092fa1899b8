"""The pipeline protocol: how hxtrain finds a model's embedding, block stack and head, and splits them into arrays.

A model that hxtrain can pipeline is any Flax NNX module with three attributes:

    model.embed   a module: tokens [B, T] int32 -> h [B, T, D]
    model.blocks  an `nnx.List` of modules with identical structure, applied in order: h [B, T, D] -> h [B, T, D];
                  or a scanned stack (below)
    model.head    a module: (h [B, T, D], targets [B, T] int32) -> scalar loss, the mean over the B*T targets;
                  or a head that returns logits, h [B, T, D] -> [B, T, V] (its `__call__` takes h alone), whose
                  loss hxtrain takes as the mean next-token cross-entropy (`head_loss`)

and the reference loss is `head(blocks(...(embed(tokens[:, :-1]))), tokens[:, 1:])`. Parameters are `nnx.Param`s
whose `out_sharding` metadata holds logical axis names (missing metadata means replicated). Every parameter must
belong to exactly one part: a weight shared between the embedding and the head (tied embeddings) would have to
cross sites as a gradient, which hxtrain refuses rather than doing silently.

A scanned stack is the usual Flax layer stack: `blocks` is one module (not an `nnx.List`) created under
`nnx.vmap(..., in_axes=0, out_axes=0)` over split rngs, so each Param has a leading layer axis L, and applied with
`nnx.scan` in the model's `__call__`. hxtrain takes it as L blocks when every Param of `blocks` has the same
leading dimension L >= 1 and either `model.cfg.n_layers == L` or the stack's partition metadata names the layer
axis: every Param with `out_sharding` names as many axes as it has dimensions, the first one the same for all
(the name `transform_metadata={nnx.PARTITION_NAME: 'layers'}` puts in front; without it nnx.vmap leaves each
Param's names as the block's own). Block i is the params sliced at i, the block graphdef the stack's with that
leading name dropped, so the per-block axes are an unstacked block's. `as_model_state` stacks them back.

Generation (`hxtrain sample`, `hxtrain.generation`) is an optional part of the protocol, checked by
`has_generation`: `model.embed(tokens, start=0)` embeds tokens [B, t] at positions start..start+t-1 (start an int
or a traced int32 scalar); each block has `init_cache(batch, length, dtype=float32)` (a dict of zeros, {"k", "v"}
each [B, length, H, K]) and `decode(h, cache, start) -> (h, cache)`, which attends causally to the cache positions
before `start` and to its own t positions and returns the cache with theirs written; `model.head.logits(h)` (or a
logits head's own call) gives [B, t, V] (`head_logits`). `model.cfg.seq_len` is the context (the positions the
model knows) and `model.cfg.vocab_size` the vocabulary. A model shares one attention between training and decoding,
so a KV-cache decode is the training forward computed in pieces. Without the cache (`cache=False`) sampling needs
only the logits and `cfg`.

Inside hxtrain the model lives as pure arrays: one pure dict for the embedding, one per block (stacked per stage
into a leading `layers` axis), one for the head, plus the graph definitions to rebuild the modules in a trace.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PARTS = ("embed", "blocks", "head")
PyTree = Any


class ProtocolError(TypeError):
    """The model does not follow hxtrain's pipeline protocol."""


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """A model split into graph definitions and pure parameter dicts (one per part, one per block)."""

    embed_def: Any
    block_def: Any
    head_def: Any
    embed: dict
    blocks: tuple[dict, ...]
    head: dict
    embed_axes: dict  # logical axis names per leaf (tuples), same structure as `embed`
    block_axes: dict
    head_axes: dict
    scanned: bool = False  # model.blocks was one scanned stack (params [L, ...]), not an nnx.List

    @property
    def n_layers(self) -> int:
        return len(self.blocks)


def _split_part(name: str, module) -> tuple[Any, dict, dict]:
    if not isinstance(module, nnx.Module):
        raise ProtocolError(
            f"model.{name}: expected an nnx.Module, got {type(module).__name__}. "
            "A pipelined model needs `embed`, `blocks` (nnx.List of identical modules) and `head` attributes."
        )
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    leftovers = [".".join(map(str, p)) for p, _ in nnx.to_flat_state(rest)]
    if leftovers:
        raise ProtocolError(
            f"model.{name}: stage programs are pure functions of nnx.Param, but found other state at "
            f"{leftovers[:3]}; keep non-parameter state (batch statistics, RNG streams) out of pipelined models"
        )
    specs = nnx.get_partition_spec(params)
    axes = jax.tree.map(lambda s: tuple(s), nnx.to_pure_dict(specs), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return graphdef, nnx.to_pure_dict(params), axes


def _variable_ids(module) -> dict[int, str]:
    return {
        id(node): ".".join(map(str, path))
        for path, node in nnx.iter_graph(module)
        if isinstance(node, nnx.Variable)
    }


def _is_stack(blocks) -> bool:
    return isinstance(blocks, nnx.Module) and not isinstance(blocks, nnx.List)


def _split_list(model) -> tuple[Any, list[dict], dict]:
    """An nnx.List of blocks -> (block graphdef, one pure dict per block, the per-block logical axes)."""
    blocks = list(model.blocks)
    if not blocks:
        raise ProtocolError(f"{type(model).__name__}.blocks is empty: a pipeline needs at least one block")
    block_defs, block_params, block_axes = zip(*(_split_part(f"blocks[{i}]", b) for i, b in enumerate(blocks)))
    for i, (d, p) in enumerate(zip(block_defs, block_params)):
        if d != block_defs[0] or jax.tree.map(jnp.shape, p) != jax.tree.map(jnp.shape, block_params[0]):
            raise ProtocolError(
                f"model.blocks[{i}] differs in structure or shapes from model.blocks[0]; stages stack blocks "
                "into one scanned program, so every block must be the same module with the same shapes"
            )
    return block_defs[0], list(block_params), block_axes[0]


def _unstack(model) -> tuple[Any, list[dict], dict]:
    """A scanned stack (module doc) -> (block graphdef, one pure dict per block, the per-block logical axes)."""
    name, kind = type(model).__name__, type(model.blocks).__name__
    graphdef, stacked, _ = _split_part("blocks", model.blocks)
    flat = [(".".join(map(str, p)), v.shape, tuple(v.get_metadata().get("out_sharding") or ()))
            for p, v in nnx.to_flat_state(nnx.state(model.blocks, nnx.Param))]
    dims = {path: shape[0] if shape else None for path, shape, _ in flat}
    if len(set(dims.values())) != 1 or None in dims.values():
        raise ProtocolError(
            f"{name}.blocks is one {kind} module, not an nnx.List of blocks nor a scanned stack: its params do not "
            f"share one leading (layer) dim, got {dims}; give nnx.List([block_0, block_1, ...]) or a stack built "
            "with nnx.vmap (every param [L, ...])")
    (n,) = set(dims.values())
    # nnx.vmap's transform_metadata={nnx.PARTITION_NAME: name} puts `name` in front of every named param's axes
    named = [(shape, axes) for _, shape, axes in flat if axes]
    firsts = {axes[0] for _, axes in named}
    layer_axis = bool(named) and all(len(a) == len(s) for s, a in named) and len(firsts) == 1 and None not in firsts
    if getattr(getattr(model, "cfg", None), "n_layers", None) != n and not layer_axis:
        raise ProtocolError(
            f"{name}.blocks is one {kind} module whose params all lead with {n}, but neither {name}.cfg.n_layers "
            f"nor a layer axis name in their out_sharding confirms a stack of {n} blocks; set cfg.n_layers = {n}, "
            "build it with nnx.vmap(..., transform_metadata={nnx.PARTITION_NAME: 'layers'}) or give an nnx.List")
    blocks = [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]
    block = nnx.merge(graphdef, blocks[0])
    for _, v in nnx.iter_graph(block):  # drop the layer axis's name: an unstacked block's axes
        axes = v.get_metadata().get("out_sharding") if isinstance(v, nnx.Param) else None
        if axes and len(axes) == len(v.shape) + 1:
            v.set_metadata(out_sharding=tuple(axes[1:]))
    block_def, _, block_axes = _split_part("blocks[0]", block)
    return block_def, blocks, block_axes


def n_blocks(model) -> int:
    """How many blocks `model` has: the length of its nnx.List, or the layer axis of a scanned stack."""
    return split_model(model).n_layers if _is_stack(model.blocks) else len(model.blocks)


def split_model(model) -> ModelParts:
    """Split a protocol-following NNX model into pure arrays. Raises ProtocolError naming what is wrong."""
    missing = [p for p in PARTS if not hasattr(model, p)]
    if missing:
        raise ProtocolError(
            f"{type(model).__name__} lacks {missing}: a pipelined model exposes `embed` (tokens -> h), "
            "`blocks` (nnx.List of identical blocks, h -> h) and `head` ((h, targets) -> mean loss)"
        )
    scanned = _is_stack(model.blocks)
    block_def, block_params, block_axes = _unstack(model) if scanned else _split_list(model)
    embed_ids, head_ids = _variable_ids(model.embed), _variable_ids(model.head)
    shared = sorted(set(embed_ids) & set(head_ids))
    if shared:
        raise ProtocolError(
            f"model.embed.{embed_ids[shared[0]]} is also model.head.{head_ids[shared[0]]} (tied embeddings). "
            "Its gradient would have to cross from the last site to the first; hxtrain does not do that yet. "
            "Use an untied head (e.g. GPTConfig(tie_embeddings=False))."
        )
    embed_def, embed, embed_axes = _split_part("embed", model.embed)
    head_def, head, head_axes = _split_part("head", model.head)
    counted = len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    split = len(jax.tree.leaves((embed, block_params[:1] if scanned else block_params, head)))
    if counted != split:
        raise ProtocolError(
            f"{type(model).__name__} has {counted} parameters but embed/blocks/head hold {split}; "
            "parameters outside those three parts would never be trained by the pipeline"
        )
    return ModelParts(embed_def, block_def, head_def, embed, tuple(block_params), head,
                      embed_axes, block_axes, head_axes, scanned=scanned)


def has_generation(model, *, cache: bool = True) -> bool:
    """True when `model` follows the generation protocol (module doc); ProtocolError naming the first missing
    method otherwise. `cache=False` (sampling by recomputing the whole sequence) needs only `head.logits` and
    `cfg.seq_len` / `cfg.vocab_size`: any pipelined model whose head can return logits samples that way."""
    name = type(model).__name__
    if _is_stack(getattr(model, "blocks", None)):  # a scanned stack: its first block, as split_model takes it
        block_def, stacked, _ = _unstack(model)
        blocks = [nnx.merge(block_def, stacked[0])]
    else:
        blocks = list(getattr(model, "blocks", None) or [])
    needed = [("embed", getattr(model, "embed", None), "__call__", "embed(tokens, start=0) -> h [B, t, D]"),
              ("blocks[0]", blocks[0] if blocks else None, "init_cache",
               "init_cache(batch, length, dtype) -> {'k', 'v'} [B, length, H, K]"),
              ("blocks[0]", blocks[0] if blocks else None, "decode", "decode(h, cache, start) -> (h, cache)"),
              ("head", getattr(model, "head", None), "logits", "logits(h) -> [B, t, V]")]
    if not cache:
        needed = needed[-1:]
    if getattr(model, "head", None) is not None and returns_logits(model.head):
        needed = needed[:-1]  # a head that returns logits is its own `logits`
    for part, module, method, what in needed:
        fn = getattr(module, method, None) if module is not None else None
        if not callable(fn):
            raise ProtocolError(f"{name}.{part} lacks {method}: generation needs {part}.{what} "
                                "(see hxtrain.core.parts)")
    try:
        takes_start = not cache or "start" in inspect.signature(model.embed.__call__).parameters
    except (TypeError, ValueError):  # a signature Python cannot read: trust the module
        takes_start = True
    if not takes_start:
        raise ProtocolError(f"{name}.embed.__call__ takes no `start`: generation needs embed(tokens, start=0), "
                            "the position of the first token (see hxtrain.core.parts)")
    cfg = getattr(model, "cfg", None)
    missing = [f for f in ("seq_len", "vocab_size") if not isinstance(getattr(cfg, f, None), int)]
    if missing:
        raise ProtocolError(f"{name}.cfg lacks {missing}: generation needs the model's context (cfg.seq_len) and "
                            "vocabulary (cfg.vocab_size)")
    return True


# ---- pure functions of the parts (used inside stage programs) ----------------------------------------------------

def apply_embed(embed_def, params: dict, tokens):  # [B, T] -> [B, T, D]
    return nnx.merge(embed_def, params)(tokens)


def apply_blocks(block_def, stacked: dict, h):  # stacked leaves [L, ...]; [B, T, D] -> [B, T, D]
    def body(h, block_params):
        return nnx.merge(block_def, block_params)(h), None

    # Unrolled for short stacks: a rolled scan cost ~10-25% per step on CPU (measured with
    # benchmarks/overhead.py); long stacks stay rolled so compile time does not grow with depth.
    n = jax.tree.leaves(stacked)[0].shape[0]
    return jax.lax.scan(body, h, stacked, unroll=n if n <= 16 else 1)[0]


def returns_logits(head) -> bool:
    """True when `head.__call__` takes h alone (a head that returns logits), False when it takes (h, targets)."""
    try:
        params = list(inspect.signature(type(head).__call__).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) == 1


def head_loss(head, h, targets):  # h [B, T, D], targets [B, T] -> scalar mean loss
    """The head's mean loss: its own (h, targets) -> loss, or, for a logits head, the mean next-token
    cross-entropy of the logits it returns (in float32)."""
    if not returns_logits(head):
        return head(h, targets)
    logp = jax.nn.log_softmax(head(h).astype(jnp.float32), axis=-1)  # [B, T, V]
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].mean()


def head_logits(head, h):  # h [B, t, D] -> logits [B, t, V]
    """Logits for sampling: `head.logits(h)`, or a logits head's own call."""
    return head.logits(h) if callable(getattr(head, "logits", None)) else head(h)


def apply_head(head_def, params: dict, h, targets):  # -> scalar mean loss
    return head_loss(nnx.merge(head_def, params), h, targets)


def stack(trees) -> dict:
    """Stack identical pytrees along a new leading axis (the block stack of a stage)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def as_model_state(model, embed: dict, blocks: list[dict], head: dict) -> nnx.State:
    """Pure per-part trees -> an nnx.State shaped like nnx.state(model, nnx.Param). For a scanned stack the blocks
    come back stacked [L, ...] as host arrays: the blocks may sit on different sites."""
    template = nnx.state(model, nnx.Param)
    if _is_stack(model.blocks):
        blocks = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *blocks)
    else:
        blocks = dict(enumerate(blocks))
    pure = {"embed": embed, "blocks": blocks, "head": head}
    nnx.replace_by_pure_dict(template, pure)
    return template


def with_params(model, state: nnx.State, device=None):
    """A new model like `model` holding `state` (an nnx.State like `nnx.state(model, nnx.Param)`), every array on
    `device` (default: JAX's first device). Copied through the host: the arrays may sit on the sites of different
    PJRT clients. `model` itself is left as it was."""
    graphdef, template = nnx.split(model)
    device = jax.devices()[0] if device is None else device
    pure = jax.tree.map(lambda a: jax.device_put(np.asarray(a), device), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(template, pure)
    return nnx.merge(graphdef, template)
