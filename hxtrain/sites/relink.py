"""A DiLoCo replica process that is alone (`--elastic`) links to the other replica again when it returns
(`Relink`), so that the other can take the outer state at the next sync (`sites.diloco.ReplicaSteps`)."""

from __future__ import annotations

import threading

from hxtrain.network.handshake import PeerError


class Relink:
    """While a replica is alone (elastic), a thread links to the other replica again, the way they first linked
    (replica 0 dials, replica 1 listens at its address; mutual TLS and the run's secret as before), so that a
    returning replica can take the outer state at the next sync (`ReplicaSteps._welcome_back`)."""

    def __init__(self, topology, index: int, cfg, secret: bytes, tls, log):
        self.topology, self.index, self.cfg, self.secret, self.tls, self.log = topology, index, cfg, secret, tls, log
        self._ep = None
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._link, name="hxtrain-diloco-relink", daemon=True).start()

    def linked(self):
        """The new Endpoint once the other replica is back (handed out once), else None."""
        with self._lock:
            ep, self._ep = self._ep, None
        return ep

    def _link(self) -> None:
        from hxtrain.network.listener import Listener
        from hxtrain.network.tcp import Endpoint
        from hxtrain.sites.process import site_address

        names = [s.name for s in self.topology.sites]
        me, peer, cfg = names[self.index], names[1 - self.index], self.cfg
        kw = dict(secret=self.secret, tls=self.tls, timeout=cfg.connect_timeout, max_bytes=1 << 16)
        try:
            listener = None if self.index == 0 else Listener(*site_address(self.topology, me, cfg.addresses))
            while True:  # until it is back; a stranger or a timeout only starts another wait
                try:
                    ep = listener.accept(me, peer, **kw) if listener is not None else Endpoint.connect(
                        me, peer, *site_address(self.topology, peer, cfg.addresses + cfg.connect), **kw)
                    break
                except PeerError:
                    continue
            if listener is not None:
                listener.close()
        except OSError as e:
            self.log(f"site {me!r}: cannot wait for replica {peer!r} to come back ({e}); going on alone")
            return
        ep.timeout = cfg.timeout
        with self._lock:
            self._ep = ep
