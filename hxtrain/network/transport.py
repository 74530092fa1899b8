"""Cross-site transport over TCP: the `InProcessTransport` interface for a site that is its own OS process.

    transport = NetTransport(site=1, n_sites=2, mesh=mesh, endpoints={0: endpoint_to_a},
                             codecs=hxtrain.engine.transport.link_codecs(topo))
    transport.step = 7
    transport.send(h, src=1, dst=0, key=("cot", 0, 3))     # [mb, T, D] -> host -> codec -> frame -> site 0
    dy = transport.recv(1, ("cot", 1, 3))                  # frame -> host -> jax.device_put on this site's mesh

Host-staged on purpose: `np.asarray` pulls the tensor off the sending site's devices, the wire carries numpy bytes
(`hxtrain.links.wire`, no JAX), and the receiver `device_put`s it onto its own sharding `P('data')`. So the two ends may
run different backends, even different frameworks.

Keys are those of the executor: (kind, stage, microbatch) of the *receiving* task; kind "act" comes from the site
of stage-1, "cot" from the site of stage+1 (stage s lives on site s % n_sites). Frames also carry `step`, so a
frame of another step can never be taken for this one.

Sends overlap with compute (`overlap=True`, the default): `send` starts the device-to-host copy and returns; a
sender thread per link waits for the tensor, encodes it and hands the frame to the link's Endpoint, in send order,
at most `SEND_DEPTH` sends pending per link. A failure there (a lost peer, an encoding error) is raised, naming the
peer, by the next send / recv / flush / exchange_norms. `flush()` waits until every pending send is framed; the
byte counters, `exchange_norms` (so CONTROL frames follow the data frames on a link) and `close` call it first.

Every received activation and cotangent is checked against what this site expects under its key (`expect`,
given at construction: `LocalSite.expected`): a tensor of another shape or dtype, from however authenticated a peer,
is a PeerError naming the peer, the key and both shapes and dtypes, never a broadcasting error deep in a program or
a silent cast. Codecs decode to the dtype the sender sent, so the check sees what the sender's stage produced.

Besides activations and cotangents, one thing crosses sites each step: the per-stage squared gradient norms for
global-norm clipping (`exchange_norms`, CONTROL frames, counted apart from the data bytes).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain.links import codecs as _codecs
from hxtrain.network.handshake import PeerError
from hxtrain.network.tcp import Endpoint
from hxtrain.core.placement import DATA
from hxtrain.engine.transport import LinkStats, data_total, per_link
from hxtrain.links.wire import Kind

_KINDS = {"act": Kind.ACTIVATION, "cot": Kind.COTANGENT}
# `microbatch` field of CONTROL frames: partial sums go down the chain (from the last site, the way the backward pass
# runs), the total comes back up
_PARTIAL, _TOTAL = 0, 1


SEND_DEPTH = 4  # pending sends per link (queued or being staged): bounds the device memory held by sends in flight


class _LinkSender:
    """One link's ordered send pipeline: `submit(item)` queues and returns, a thread runs `ship(*item)` for each item
    in submit order. At most `depth` items are pending; `submit` blocks while that many are, at most the endpoint's
    timeout. The first failure is kept in `error` (a PeerError naming the peer), the link is aborted (so a `recv`
    waiting on it wakes up) and later items are dropped."""

    def __init__(self, ep: Endpoint, ship, depth: int):
        self.ep, self._ship, self.depth = ep, ship, depth
        self.error: PeerError | None = None
        self.reported = False  # `error` was raised to the caller once
        self._cond = threading.Condition()
        self._items: collections.deque = collections.deque()
        self._pending = 0
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name=f"hxtrain-stage-{ep.me}->{ep.peer}", daemon=True)
        self._thread.start()

    def submit(self, item: tuple) -> None:
        """Queue `item`; returns at once unless `depth` sends are pending. Queues nothing after a failure."""
        deadline = time.monotonic() + self.ep.timeout
        with self._cond:
            while self._pending >= self.depth and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"sends from site {self.ep.me!r} to site {self.ep.peer!r}: {self._pending} "
                                    f"still pending after {self.ep.timeout} s (the link or the device is stalled)")
                self._cond.wait(left)
            if self.error is None:
                self._items.append(item)
                self._pending += 1
                self._cond.notify_all()

    def flush(self, timeout: float) -> None:
        """Wait until no send is pending (or one failed), at most `timeout` s, then PeerError."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._pending and self.error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerError(f"sends from site {self.ep.me!r} to site {self.ep.peer!r}: {self._pending} "
                                    f"not on the link after {timeout} s (the link or the device is stalled)")
                self._cond.wait(left)

    def stop(self, timeout: float) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop:
                    self._cond.wait()
                if not self._items:
                    return
                item = self._items.popleft()
            if self.error is None:
                try:
                    self._ship(self.ep, *item)
                except Exception as e:  # never die silently: the caller's next call raises it
                    err = e if isinstance(e, PeerError) else PeerError(
                        f"sending {item[3]} from site {self.ep.me!r} to site {self.ep.peer!r} failed: {e!r}")
                    if err is not e:
                        err.__cause__ = e
                    with self._cond:
                        self.error = err
                    self.ep.abort(str(err))  # the peer would wait for the lost frame: close the link now
            del item  # the device array must not stay alive while this thread waits for the next send
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()


class NetTransport:
    """One site's side of the network transport. `endpoints` maps a neighbouring site index to its Endpoint.

    overlap: True (default) ships sends from a thread per link, so `send` returns before `x` is computed; False
    stages and frames each send on the caller's thread before `send` returns (for side-by-side measurement).
    expect: `expect((kind, stage, microbatch))` -> (shape, accepted dtypes) of what may arrive under that key;
    anything else is refused with PeerError. None checks nothing (tests that move arbitrary arrays).
    """

    def __init__(self, site: int, n_sites: int, mesh, endpoints: dict[int, Endpoint], codecs=None, names=None, *,
                 overlap: bool = True, expect: Callable[[tuple], tuple[tuple, tuple]] | None = None):
        self.site, self.n_sites, self.mesh = site, n_sites, mesh
        self.expect = expect
        self.endpoints = dict(endpoints)
        self.codecs = dict(codecs or {})
        self.names = list(names) if names is not None else [str(i) for i in range(n_sites)]
        self.step = 0
        self.overlap = overlap
        self.stats: dict[tuple[int, int, str], LinkStats] = collections.defaultdict(LinkStats)
        self._lock = threading.Lock()  # stats are written by the sender threads
        self._box: dict[tuple, jax.Array] = {}  # transfers between stages of this same site (interleaved)
        self._senders = ({peer: _LinkSender(ep, self._ship, SEND_DEPTH) for peer, ep in self.endpoints.items()}
                         if overlap else {})

    def _endpoint(self, peer: int, why: str) -> Endpoint:
        if peer not in self.endpoints:
            raise RuntimeError(f"site {self.names[self.site]!r} has no link to site {self.names[peer]!r} ({why}); "
                               f"it is linked to {[self.names[p] for p in sorted(self.endpoints)]}")
        return self.endpoints[peer]

    def send(self, x, src: int, dst: int, key: tuple) -> None:
        """Ship `x` ([mb, ...], on this site's devices) to site `dst` under `key` = (kind, stage, microbatch).

        With overlap, returns once the copy to the host is started: the caller must not delete or donate `x`
        before the next `flush`. The frame carries `self.step` as it is now."""
        if src != self.site:
            raise ValueError(f"send: this process is site {self.site}, asked to send from site {src}")
        if dst == src:
            self._box[key] = x
            return
        ep = self._endpoint(dst, f"sending {key}")
        codec = self.codecs.get((src, dst, key[0]), _codecs.get_codec("none"))
        self._raise_failed()
        if not self.overlap:
            self._ship(ep, x, src, dst, key, self.step, codec)
            return
        if hasattr(x, "copy_to_host_async"):
            x.copy_to_host_async()  # enqueued behind x's computation; the sender thread's np.asarray waits for it
        self._senders[dst].submit((x, src, dst, key, self.step, codec))
        self._raise_failed()

    def _ship(self, ep: Endpoint, x, src: int, dst: int, key: tuple, step: int, codec) -> None:
        kind, stage, mb = key
        host = np.asarray(x)  # host staging: waits for x, then the bytes leave the device
        nbytes = ep.send(_KINDS[kind], host, step=step, microbatch=mb, stage=stage, codec=codec)
        self._count((src, dst, kind), nbytes, codec.wire_bytes(host.shape, host.dtype))

    def _count(self, link: tuple[int, int, str], nbytes: int, payload: int) -> None:
        with self._lock:
            s = self.stats[link]
            s.bytes += nbytes
            s.payload_bytes += payload
            s.transfers += 1

    def _raise_failed(self) -> None:
        """Raise the first recorded sender failure (it names the peer)."""
        for sender in self._senders.values():
            if sender.error is not None:
                sender.reported = True
                raise sender.error

    def flush(self) -> None:
        """Wait until every send so far is framed and queued on its link's Endpoint (whose FIFO keeps it ahead of
        any later frame), at most each endpoint's timeout; PeerError naming the peer on a failure or a stall."""
        for sender in self._senders.values():
            sender.flush(sender.ep.timeout)
        self._raise_failed()

    def recv(self, dst: int, key: tuple) -> jax.Array:
        """The tensor sent to this site under `key`, placed on this site's mesh as P('data'). Waits at most the
        endpoint's timeout; PeerError naming the peer site when it died, stalled or sent a bad frame."""
        if key in self._box:
            return self._box.pop(key)
        kind, stage, mb = key
        src = (dst - 1) % self.n_sites if kind == "act" else (dst + 1) % self.n_sites
        ep = self._endpoint(src, f"receiving {key}")
        self._raise_failed()
        try:
            _, host = ep.recv(kind=_KINDS[kind], step=self.step, microbatch=mb, stage=stage)
        except PeerError as e:  # a failed send (which aborted its link) is the cause to report
            for sender in self._senders.values():
                if sender.error is not None:
                    sender.reported = True
                    raise sender.error from e
            raise
        if self.expect is not None:
            self._check_arrival(ep, key, host)
        return jax.device_put(host, NamedSharding(self.mesh, P(DATA)))

    def _check_arrival(self, ep: Endpoint, key: tuple, host: np.ndarray) -> None:
        """PeerError (the link aborted, so the peer stops too) unless `host` has the shape and a dtype that
        `expect` gives for `key`."""
        # asked at every arrival, not cached: a DiLoCo replica whose rows are dealt again expects other shapes
        shape, dtypes = self.expect(key)
        shape, dtypes = tuple(int(n) for n in shape), tuple(np.dtype(d) for d in dtypes)
        if host.shape == shape and host.dtype in dtypes:
            return
        message = (f"site {self.names[self.site]!r} received {key} (step {self.step}) from site {ep.peer!r}: "
                   f"expected {_describe(shape, dtypes)}, got {_describe(host.shape, (host.dtype,))}")
        ep.abort(message)
        raise PeerError(message)

    def barrier(self, timeout: float) -> None:
        """Wait until every site reached this point (step 0 CONTROL frames along the chain), at most `timeout` s
        per hop: sites compile before it, so that afterwards a peer silent for the link timeout has failed."""
        eps = list(self.endpoints.values())
        saved = [ep.timeout for ep in eps]
        step, self.step = self.step, 0
        try:
            for ep in eps:
                ep.timeout = timeout
            self.exchange_norms({}, 1)
        finally:
            self.step = step
            for ep, t in zip(eps, saved):
                ep.timeout = t

    def exchange_norms(self, local: dict[int, float], n_stages: int) -> np.ndarray:
        """Every stage's squared gradient norm, float32 [n_stages], on every site.

        Along the chain of sites, in the direction the backward pass runs: the last site, whose backward ends
        first, sends its values to its predecessor; each site adds its own stages' values to what its successor
        sent and passes the vector on; the first site, whose backward ends the step, completes it and sends the
        total back up the chain. So the partial sums travel right behind each site's last cotangent, and the first
        site has the total as soon as its own last backward is done: the step's critical path (the first site's
        last backward, its update, the next step's first forward) crosses no link for the norm. The total reaches
        site i after i one-way crossings, ahead of the next step's first activation, which makes the same
        crossings after a forward on every site before it. (The chain ran the other way until December 2026: the
        first site then waited a round trip to the last site at the end of every step, `benchmarks/README.md`.)

        2 (n_sites - 1) CONTROL frames per step, counted in `control_bytes`. Each site then sums the vector in
        stage order, as the in-process optimizer does. Pending sends are flushed first, so every data frame of the
        step precedes the CONTROL frames on its link.
        """
        self.flush()
        vec = np.zeros(n_stages, np.float32)
        prev, nxt = self.site - 1, self.site + 1
        if nxt < self.n_sites:
            vec = np.array(self._control_recv(nxt, _PARTIAL, n_stages), np.float32)
        for stage, value in local.items():
            vec[stage] = np.float32(value)
        if prev >= 0:
            self._control_send(prev, vec, _PARTIAL)
            vec = np.array(self._control_recv(prev, _TOTAL, n_stages), np.float32)
        if nxt < self.n_sites:
            self._control_send(nxt, vec, _TOTAL)
        return vec

    def _control_send(self, peer: int, vec: np.ndarray, direction: int) -> None:
        nbytes = self._endpoint(peer, "control").send(Kind.CONTROL, vec, step=self.step, microbatch=direction)
        self._count((self.site, peer, "control"), nbytes, vec.nbytes)

    def _control_recv(self, peer: int, direction: int, n: int) -> np.ndarray:
        ep = self._endpoint(peer, "control")
        vec = ep.recv(kind=Kind.CONTROL, step=self.step, microbatch=direction)[1]
        if vec.shape != (n,) or vec.dtype != np.float32:  # every site must run the same stages
            message = (f"site {self.names[self.site]!r} received the control vector (step {self.step}) from site "
                       f"{ep.peer!r}: expected {_describe((n,), (np.float32,))}, got "
                       f"{_describe(vec.shape, (vec.dtype,))}")
            ep.abort(message)
            raise PeerError(message)
        return vec

    # ---- the InProcessTransport surface the executor and trainer use ----------------------------------------

    def pending(self) -> list:
        return sorted(self._box, key=repr)

    def clear(self) -> None:
        self._box.clear()

    def _stats(self) -> dict:
        """A consistent copy of the counters, after every pending send is counted."""
        self.flush()
        with self._lock:
            return dict(self.stats)

    def bytes_per_link(self) -> dict[str, int]:
        """Data bytes sent per directed link "a->b" (frames, headers included), control excluded."""
        return per_link(self._stats(), self.names)

    def payload_bytes_per_link(self) -> dict[str, int]:
        """Codec payload bytes per directed link (what `InProcessTransport` counts), control excluded."""
        return per_link(self._stats(), self.names, "payload_bytes")

    @property
    def control_bytes(self) -> int:
        return sum(s.bytes for (_, _, kind), s in self._stats().items() if kind == "control")

    def total_bytes(self) -> int:
        return data_total(self._stats())

    def reset_stats(self) -> None:
        """Zero the counters (pending sends are flushed first, so they count for the step that sent them)."""
        self.flush()
        with self._lock:
            self.stats.clear()

    def close(self) -> None:
        """Flush pending sends, stop the sender threads, close every link (which flushes its queued frames and
        says BYE). A send failure not yet raised to the caller is raised here, after everything is closed."""
        stalled = None
        for sender in self._senders.values():
            try:
                sender.flush(sender.ep.timeout)
            except PeerError as e:
                stalled = stalled or e
        for sender in self._senders.values():
            sender.stop(sender.ep.timeout)
        for ep in self.endpoints.values():
            ep.close()
        unreported = [s for s in self._senders.values() if s.error is not None and not s.reported]
        for sender in unreported:
            sender.reported = True
        if unreported or stalled:
            raise unreported[0].error if unreported else stalled


def _describe(shape: tuple, dtypes: tuple) -> str:
    """'shape (4, 8, 16) float32' (several accepted dtypes: 'float32 | bfloat16')."""
    return f"shape {tuple(shape)} {' | '.join(np.dtype(d).name for d in dtypes)}"


__all__ = ["LinkStats", "NetTransport", "PeerError"]
