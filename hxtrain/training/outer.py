"""DiLoCo's outer loop, the same for replicas in one process (`hxtrain.training.diloco`) and a replica that is its
own site process (`hxtrain.sites.process`). numpy only, no JAX.

`OuterSync` holds the global params (keyed by logical path), the outer momentum, the tokens each replica processed
since each fragment's last sync, and the results not yet applied. A sync of fragment f: every replica's
`delta(f, its params)` (through the codec; the decoded value is what all replicas use), then `combine(f, deltas,
tokens)` in replica order, then `land(step)` once `overlap` steps have passed. Run in the same order on the same
inputs, it gives every replica bit-identical global params whatever device it trains on.
"""

from __future__ import annotations

import hashlib

import numpy as np

from hxtrain.links import codecs as _codecs

def fragment_keys(shapes: dict, fragments: int) -> list[tuple[str, ...]]:
    """The logical parameter keys (in model order, `logical.shapes`) cut into `fragments` contiguous groups of
    about equal bytes, each non-empty."""
    keys = list(shapes)
    if not 1 <= fragments <= len(keys):
        raise ValueError(f"fragments: expected 1..{len(keys)} (the model's parameter arrays), got {fragments}")
    sizes = [int(np.prod(shape)) * np.dtype(dt).itemsize for shape, dt in shapes.values()]
    total, out, start, acc = sum(sizes), [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        left_keys, left_groups = len(keys) - i - 1, fragments - len(out) - 1
        if len(out) < fragments - 1 and (acc >= total * (len(out) + 1) / fragments or left_keys == left_groups):
            out.append(tuple(keys[start:i + 1]))
            start = i + 1
    out.append(tuple(keys[start:]))
    return out


def sync_offset(fragment: int, fragments: int, sync_every: int) -> int:
    """The first inner step at which `fragment` syncs; it syncs again every `sync_every` steps after that."""
    return ((fragment + 1) * sync_every) // fragments


def flat(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A nested dict of arrays keyed by 'a/b/c' paths."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def nested(flat_tree: dict[str, np.ndarray]) -> dict:
    """{'blocks/0/w': x} -> {'blocks': {'0': {'w': x}}} (the inverse of `flat`)."""
    out: dict = {}
    for key, v in flat_tree.items():
        node = out
        *path, last = key.split("/")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = v
    return out


class OuterSync:
    """The outer state of a DiLoCo run (see the module doc). `cfg`: a `hxtrain.config.topology.Diloco`."""

    def __init__(self, cfg, global_params: dict[str, np.ndarray], n_replicas: int, fragments=None):
        """`fragments`: the keys of each fragment (default `fragment_keys` of `global_params`); a site that holds
        some of the model's stages passes the whole model's fragments cut down to its keys (some may be empty)."""
        self.cfg, self.n_replicas = cfg, n_replicas
        self.global_params = dict(global_params)
        shapes = {k: (v.shape, v.dtype.name) for k, v in global_params.items()}
        self.fragments = fragment_keys(shapes, cfg.fragments) if fragments is None else [tuple(f) for f in fragments]
        self.momentum = {k: np.zeros_like(v) for k, v in global_params.items()}
        self.codec = _codecs.get_codec(cfg.codec)
        self.since = [[0] * n_replicas for _ in self.fragments]  # tokens per replica since the fragment's sync
        self.pending: list[tuple[int, dict]] = []  # (apply at step, new global params of a fragment)
        self.outer_steps = 0

    def digest(self) -> str:
        """A short hash of the global params (keys, shapes, dtypes and bytes): replicas that agree print the same."""
        h = hashlib.sha256()
        for k, v in self.global_params.items():
            h.update(f"{k}:{v.shape}:{v.dtype};".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        return h.hexdigest()[:16]

    def add_tokens(self, replica: int, n: int) -> None:
        for since in self.since:
            since[replica] += n

    def due(self, step: int) -> list[int]:
        """The fragments that sync after inner step `step`."""
        H, F = self.cfg.sync_every, len(self.fragments)
        return [f for f in range(F) if step >= sync_offset(f, F, H) and (step - sync_offset(f, F, H)) % H == 0]

    def delta(self, f: int, local: dict[str, np.ndarray]) -> tuple[dict[str, bytes], dict[str, np.ndarray]]:
        """One replica's pseudo-gradient of fragment f: (the codec's payload per key, to send; its decoded value,
        which every replica uses)."""
        payloads, decoded = {}, {}
        for k in self.fragments[f]:
            d = self.global_params[k] - local[k]
            payloads[k] = self.codec.encode(d)
            decoded[k] = d if self.codec.name == "none" else self.codec.decode(payloads[k], d.shape, d.dtype)
        return payloads, decoded

    def wire_bytes(self, f: int) -> int:
        """Bytes of one replica's encoded delta of fragment f."""
        return sum(self.codec.wire_bytes(self.global_params[k].shape, self.global_params[k].dtype)
                   for k in self.fragments[f])

    def combine(self, f: int, deltas: list[dict], step: int, tokens: list[int] | None = None) -> dict:
        """The outer Nesterov step of fragment f from every replica's decoded delta (in replica order), weighted by
        the tokens each processed since the fragment's last sync (`tokens`, default the counts added here); the
        result lands `overlap` steps after `step`. Returns the fragment's new global params."""
        cfg = self.cfg
        w = np.asarray(self.since[f] if tokens is None else tokens, np.float64)
        w = (w / w.sum()).astype(np.float32)
        self.since[f] = [0] * self.n_replicas
        mu, lr = np.float32(cfg.outer_momentum), np.float32(cfg.outer_lr)
        new = {}
        for k in self.fragments[f]:
            g = self.global_params[k]
            avg = np.zeros_like(g)
            for r, d in enumerate(deltas):  # in replica order: the same sum on every replica
                avg += w[r] * d[k]
            m = self.momentum[k] = (mu * self.momentum[k] + avg).astype(g.dtype)
            new[k] = (g - lr * (avg + mu * m if cfg.outer_momentum else avg)).astype(g.dtype)
        self.pending.append((step + cfg.overlap, new))
        if f == len(self.fragments) - 1:
            self.outer_steps += 1
        return new

    def landed(self, step: int) -> list[dict]:
        """The fragments' results due by `step`, now taken into the global params; apply each replica's with
        `apply`."""
        ready = [new for at, new in self.pending if at <= step]
        self.pending = [(at, new) for at, new in self.pending if at > step]
        for new in ready:
            self.global_params.update(new)
        return ready

    def apply(self, local: dict[str, np.ndarray], ready: list[dict]) -> None:
        """Results from `landed` into a replica's params `local` (in place), keeping a `mix` share of its own
        (mix 0: exactly the global params)."""
        mix = self.cfg.mix
        for new in ready:
            for k, g in new.items():
                local[k] = g if mix == 0 else (mix * local[k] + (1 - mix) * g).astype(g.dtype)
