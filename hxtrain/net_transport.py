"""Cross-site transport over TCP: the `InProcessTransport` interface for a site that is its own OS process.

    transport = NetTransport(site=1, n_sites=2, mesh=mesh, endpoints={0: endpoint_to_a}, codecs=link_codecs(topo))
    transport.step = 7
    transport.send(h, src=1, dst=0, key=("cot", 0, 3))     # [mb, T, D] -> host -> codec -> frame -> site 0
    dy = transport.recv(1, ("cot", 1, 3))                  # frame -> host -> jax.device_put on this site's mesh

Host-staged on purpose: `np.asarray` pulls the tensor off the sending site's devices, the wire carries numpy bytes
(`hxtrain.wire`, no JAX), and the receiver `device_put`s it onto its own sharding `P('data')`. So the two ends may
run different backends, even different frameworks.

Keys are those of the executor: (kind, stage, microbatch) of the *receiving* task; kind "act" comes from the site
of stage-1, "cot" from the site of stage+1 (stage s lives on site s % n_sites). Frames also carry `step`, so a
frame of another step can never be taken for this one.

Besides activations and cotangents, one thing crosses sites each step: the per-stage squared gradient norms for
global-norm clipping (`exchange_norms`, CONTROL frames, counted apart from the data bytes).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from hxtrain import codecs as _codecs
from hxtrain.net import Endpoint, PeerError
from hxtrain.wire import Kind

_KINDS = {"act": Kind.ACTIVATION, "cot": Kind.COTANGENT}
_UP, _DOWN = 0, 1  # `microbatch` field of CONTROL frames: partial sums go up the chain, the total comes down


@dataclasses.dataclass
class LinkStats:
    """What this process sent on one directed link: frame bytes (header included), codec payload bytes, count."""

    bytes: int = 0
    payload_bytes: int = 0
    transfers: int = 0


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


class NetTransport:
    """One site's side of the network transport. `endpoints` maps a neighbouring site index to its Endpoint."""

    def __init__(self, site: int, n_sites: int, mesh, endpoints: dict[int, Endpoint], codecs=None, names=None):
        self.site, self.n_sites, self.mesh = site, n_sites, mesh
        self.endpoints = dict(endpoints)
        self.codecs = dict(codecs or {})
        self.names = list(names) if names is not None else [str(i) for i in range(n_sites)]
        self.step = 0
        self.stats: dict[tuple[int, int, str], LinkStats] = defaultdict(LinkStats)
        self._box: dict[tuple, jax.Array] = {}  # transfers between stages of this same site (interleaved)

    def _endpoint(self, peer: int, why: str) -> Endpoint:
        if peer not in self.endpoints:
            raise RuntimeError(f"site {self.names[self.site]!r} has no link to site {self.names[peer]!r} ({why}); "
                               f"it is linked to {[self.names[p] for p in sorted(self.endpoints)]}")
        return self.endpoints[peer]

    def send(self, x, src: int, dst: int, key: tuple) -> None:
        """Ship `x` ([mb, ...], on this site's devices) to site `dst` under `key` = (kind, stage, microbatch)."""
        if src != self.site:
            raise ValueError(f"send: this process is site {self.site}, asked to send from site {src}")
        if dst == src:
            self._box[key] = x
            return
        kind, stage, mb = key
        ep = self._endpoint(dst, f"sending {key}")
        codec = self.codecs.get((src, dst, kind), _codecs.get_codec("none"))
        host = np.asarray(x)  # host staging: waits for x, then the bytes leave the device
        nbytes = ep.send(_KINDS[kind], host, step=self.step, microbatch=mb, stage=stage, codec=codec)
        s = self.stats[(src, dst, kind)]
        s.bytes += nbytes
        s.payload_bytes += codec.wire_bytes(host.shape, host.dtype)
        s.transfers += 1

    def recv(self, dst: int, key: tuple) -> jax.Array:
        """The tensor sent to this site under `key`, placed on this site's mesh as P('data'). Waits at most the
        endpoint's timeout; PeerError naming the peer site when it died, stalled or sent a bad frame."""
        if key in self._box:
            return self._box.pop(key)
        kind, stage, mb = key
        src = (dst - 1) % self.n_sites if kind == "act" else (dst + 1) % self.n_sites
        ep = self._endpoint(src, f"receiving {key}")
        _, host = ep.recv(kind=_KINDS[kind], step=self.step, microbatch=mb, stage=stage)
        return jax.device_put(host, NamedSharding(self.mesh, P("data")))

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

        Along the chain of sites: each adds its own stages' values to the vector from its predecessor and passes
        it on; the last site sends the complete vector back down. 2 (n_sites - 1) CONTROL frames per step, counted
        in `control_bytes`. Each site then sums the vector in stage order, as the in-process optimizer does.
        """
        vec = np.zeros(n_stages, np.float32)
        prev, nxt = self.site - 1, self.site + 1
        if prev >= 0:
            vec = np.array(self._control_recv(prev, _UP), np.float32)
        for stage, value in local.items():
            vec[stage] = np.float32(value)
        if nxt < self.n_sites:
            self._control_send(nxt, vec, _UP)
            vec = np.array(self._control_recv(nxt, _DOWN), np.float32)
        if prev >= 0:
            self._control_send(prev, vec, _DOWN)
        return vec

    def _control_send(self, peer: int, vec: np.ndarray, direction: int) -> None:
        nbytes = self._endpoint(peer, "control").send(Kind.CONTROL, vec, step=self.step, microbatch=direction)
        s = self.stats[(self.site, peer, "control")]
        s.bytes += nbytes
        s.payload_bytes += vec.nbytes
        s.transfers += 1

    def _control_recv(self, peer: int, direction: int) -> np.ndarray:
        return self._endpoint(peer, "control").recv(kind=Kind.CONTROL, step=self.step, microbatch=direction)[1]

    # ---- the InProcessTransport surface the executor and trainer use ----------------------------------------

    def poison(self, *args, **kwargs) -> None:
        raise NotImplementedError("poison is a test hook of the in-process transport; the network transport "
                                  "cannot pre-fill a peer's mailbox")

    def pending(self) -> list:
        return sorted(self._box, key=repr)

    def clear(self) -> None:
        self._box.clear()

    def bytes_per_link(self) -> dict[str, int]:
        """Data bytes sent per directed link "a->b" (frames, headers included), control excluded."""
        out: dict[str, int] = defaultdict(int)
        for (src, dst, kind), s in self.stats.items():
            if kind != "control":
                out[f"{self.names[src]}->{self.names[dst]}"] += s.bytes
        return dict(out)

    def payload_bytes_per_link(self) -> dict[str, int]:
        """Codec payload bytes per directed link (what `InProcessTransport` counts), control excluded."""
        out: dict[str, int] = defaultdict(int)
        for (src, dst, kind), s in self.stats.items():
            if kind != "control":
                out[f"{self.names[src]}->{self.names[dst]}"] += s.payload_bytes
        return dict(out)

    @property
    def control_bytes(self) -> int:
        return sum(s.bytes for (_, _, kind), s in self.stats.items() if kind == "control")

    def total_bytes(self) -> int:
        return sum(s.bytes for (_, _, kind), s in self.stats.items() if kind != "control")

    def reset_stats(self) -> None:
        self.stats.clear()

    def close(self) -> None:
        """Close every link (flushes queued frames, says BYE)."""
        for ep in self.endpoints.values():
            ep.close()


__all__ = ["LinkStats", "NetTransport", "PeerError", "link_codecs"]
