"""Cross-site transport, in-process: sites are device subsets of one process (any mix of backends).

`send` moves a tensor onto the receiving site's sharding with `jax.device_put` (asynchronous: the sender's next
program is dispatched without waiting) and leaves it in the receiver's mailbox under a key; `recv` takes it out.
Every transfer is counted per directed link and kind, so a run can report exactly what crossed each link.

A boundary codec per (src, dst, kind) (`codecs=`, e.g. from `link_codecs(topology)`) makes the
in-process path lossy exactly like the network one: the tensor is encoded and decoded on the host with the same numpy
codec, and the *encoded* payload bytes are what is counted. That host round trip runs on one worker thread per
directed link (in send order), so `send` returns at once and the host keeps dispatching; only the task that reads
the tensor waits for it (`recv`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain.links import codecs as _codecs
from hxtrain.core.placement import DATA


def link_codecs(topology) -> dict[tuple[int, int, str], _codecs.Codec]:
    """{(src, dst, kind): Codec} for every directed neighbour pair, from `Link.activations` / `Link.cotangents`.

    Activations crossing a link use its `activations` codec, cotangents its `cotangents` codec, in either direction
    (interleaved schedules also send activations from the last site back to the first).
    "fp8" is resolved by the two sites' capabilities (`backends.link_wire_dtype`): the fp8 format both share, else
    bf16 (e.g. an NVIDIA e4m3fn site next to an AMD e4m3fnuz one), else no compression.
    """
    from hxtrain import backends

    def cap(site):
        return backends.capability_for(site.device_kind or site.backend)

    out = {}
    for i, (a, b) in enumerate(topology.neighbours()):
        link = topology.link(a.name, b.name)
        for src, dst, kind, name in ((i, i + 1, "act", link.activations), (i + 1, i, "cot", link.cotangents),
                                     (i + 1, i, "act", link.activations), (i, i + 1, "cot", link.cotangents)):
            if name == "fp8":
                wire_dtype = backends.link_wire_dtype(cap(a), cap(b), "fp8")
                if wire_dtype.startswith("float8_"):
                    out[(src, dst, kind)] = _codecs.get_codec("fp8", fp8_format=wire_dtype[len("float8_"):])
                else:
                    out[(src, dst, kind)] = _codecs.get_codec("bf16" if wire_dtype == "bfloat16" else "none")
            else:
                out[(src, dst, kind)] = _codecs.get_codec(name)
    return out


@dataclasses.dataclass
class LinkStats:
    """What one process sent on one directed link and kind: `bytes` crossed the link (network frames with their
    headers; in process, the codec payload), `payload_bytes` of them codec payload, `transfers` tensors."""

    bytes: int = 0
    payload_bytes: int = 0
    transfers: int = 0


def per_link(stats: dict, names=None, field: str = "bytes") -> dict[str, int]:
    """{"a->b": sum of LinkStats.`field`} over the data kinds of `stats` {(src, dst, kind): LinkStats}; CONTROL
    traffic (kind "control") is left out. `names[i]` names site i (default: its index)."""
    label = str if names is None else names.__getitem__
    out: dict[str, int] = defaultdict(int)
    for (src, dst, kind), s in stats.items():
        if kind != "control":
            out[f"{label(src)}->{label(dst)}"] += getattr(s, field)
    return dict(out)


def data_total(stats: dict, field: str = "bytes") -> int:
    """Sum of LinkStats.`field` over every link of `stats`, CONTROL traffic left out."""
    return sum(getattr(s, field) for (_, _, kind), s in stats.items() if kind != "control")


class InProcessTransport:
    """Mailboxes between sites of one process. Keys are (kind, stage, microbatch) of the *receiving* task."""

    def __init__(self, meshes, codecs=None):
        """`codecs`: {(src, dst, kind): codec name or Codec} with kind "act" / "cot"; missing entries are "none"."""
        self.meshes = list(meshes)
        self.codecs = {k: _as_codec(k, c) for k, c in (codecs or {}).items()}
        self._box: dict[tuple[int, tuple], jax.Array | Future] = {}
        self._stats: dict[tuple[int, int, str], LinkStats] = defaultdict(LinkStats)
        self._workers: dict[tuple[int, int], ThreadPoolExecutor] = {}  # per directed link, for codec round trips
        self._lock = threading.Lock()  # stats are counted by the workers

    def send(self, x: jax.Array, src: int, dst: int, key: tuple) -> jax.Array | Future:
        """Put `x` ([mb, ...] sharded over `data` on site `src`) into site `dst`'s mailbox under `key`; returns the
        array as delivered there, or a Future of it while a codec's host round trip is under way (a recorded step
        times the transfer to its arrival)."""
        if src == dst:
            self._box[(dst, key)] = x
            return x
        codec = self.codecs.get((src, dst, key[0]))
        if codec is None or codec.name == "none":
            x = self._deliver(x, src, dst, key[0], x.size * x.dtype.itemsize)
        else:
            worker = self._workers.get((src, dst))
            if worker is None:
                worker = self._workers[(src, dst)] = ThreadPoolExecutor(1, thread_name_prefix=f"hxtrain-{src}->{dst}")
            x = worker.submit(self._round_trip, codec, x, src, dst, key[0])
        self._box[(dst, key)] = x
        return x

    def _round_trip(self, codec, x, src: int, dst: int, kind: str) -> jax.Array:
        # the receiver sees exactly what the network would deliver
        host = np.asarray(x)
        payload = codec.encode(host)
        return self._deliver(codec.decode(payload, host.shape, host.dtype), src, dst, kind, len(payload))

    def _deliver(self, x, src: int, dst: int, kind: str, nbytes: int) -> jax.Array:
        x = jax.device_put(x, NamedSharding(self.meshes[dst], P(DATA)))
        with self._lock:
            s = self._stats[(src, dst, kind)]
            s.bytes += nbytes
            s.payload_bytes += nbytes
            s.transfers += 1
        return x

    def recv(self, dst: int, key: tuple) -> jax.Array:
        try:
            x = self._box.pop((dst, key))
        except KeyError:
            raise RuntimeError(
                f"site {dst} needs {key} but nothing was sent: the schedule runs a task before its input "
                "exists (a schedule table bug)") from None
        return x.result() if isinstance(x, Future) else x

    def poison(self, dst: int, key: tuple, shape, dtype) -> None:
        """Pre-fill a mailbox slot with NaN (tests): a task that read it before the real tensor arrived would
        carry NaN into the loss and gradients."""
        nan = np.full(shape, np.nan, dtype)
        self._box[(dst, key)] = jax.device_put(nan, NamedSharding(self.meshes[dst], P(DATA)))

    def pending(self) -> list:
        return sorted(self._box, key=repr)

    def clear(self) -> None:
        for x in self._box.values():  # a failed step's round trips finish before the next step counts its own
            if isinstance(x, Future):
                x.exception()
        self._box.clear()

    @property
    def stats(self) -> dict[tuple[int, int, str], LinkStats]:
        """{(src, dst, kind): LinkStats} of everything sent so far (waits for codec round trips under way)."""
        self.flush()
        return self._stats

    def flush(self) -> None:
        """Wait until every codec round trip sent so far has been delivered (and counted)."""
        for worker in self._workers.values():
            worker.submit(lambda: None).result()

    def bytes_per_link(self) -> dict[str, int]:
        return per_link(self.stats)

    def total_bytes(self) -> int:
        return data_total(self.stats)

    def reset_stats(self) -> None:
        self.flush()
        self._stats.clear()


def _as_codec(key, codec) -> _codecs.Codec:
    if not isinstance(key, tuple) or len(key) != 3 or key[2] not in ("act", "cot"):
        raise ValueError(f"codecs: keys must be (src site, dst site, 'act' | 'cot'), got {key!r}")
    if isinstance(codec, _codecs.Codec):
        return codec
    if not isinstance(codec, str) or codec not in _codecs.CODEC_NAMES:
        raise ValueError(f"codecs[{key!r}]: unknown codec {codec!r}; choose one of {list(_codecs.CODEC_NAMES)}")
    return _codecs.get_codec(codec)
