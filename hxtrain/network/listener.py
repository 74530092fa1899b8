"""The listening end of links between sites: `Listener.accept` waits for one peer to connect and authenticate,
and no stranger can stop it (see `Listener`). Stdlib only, no JAX."""

from __future__ import annotations

import logging
import queue as queue_lib
import socket
import threading
import time

from hxtrain.network.handshake import PeerError
from hxtrain.network.tcp import HANDSHAKE_TIMEOUT, MAX_HANDSHAKES, Endpoint

_log = logging.getLogger(__name__)




class Listener:
    """A bound listening socket; `accept()` waits for one peer to connect and authenticate. Use port 0 for an
    ephemeral port and read it back from `.port`.

    A stranger cannot stop it: a connection that fails to authenticate (garbage, a port scanner, an HTTP probe, a
    wrong certificate or secret, silence for `handshake_timeout` s) is logged and dropped while the listener keeps
    waiting for its peer; at most `max_handshakes` connections authenticate at once, and more are closed at once.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_handshakes: int = MAX_HANDSHAKES):
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]
        self.handshake_timeout, self.max_handshakes = handshake_timeout, max_handshakes
        self.dropped = 0  # connections dropped so far (failed, timed out or over max_handshakes)

    def accept(self, me, peer, *, secret, tls, timeout: float, max_bytes: int, queue: int = 8) -> Endpoint:
        """Wait up to `timeout` s for `peer` to connect and pass the handshake; returns its Endpoint."""
        return self.accept_all(me, (peer,), secret=secret, tls=tls, timeout=timeout, max_bytes=max_bytes,
                               queue=queue)[peer]

    def accept_all(self, me, peers, *, secret, tls, timeout: float, max_bytes: int,
                   queue: int = 8) -> dict[str, Endpoint]:
        """Wait up to `timeout` s in all for every site in `peers` to connect and pass the handshake, in whatever
        order they come; returns {name: Endpoint}. A second connection from a site already linked is dropped."""
        deadline = time.monotonic() + timeout
        results: queue_lib.Queue = queue_lib.Queue()
        lock, state = threading.Lock(), {"active": 0, "done": False}
        last, got = None, {}
        pending = tuple(peers)

        def attempt(sock, addr):
            try:
                ep = Endpoint._start(sock, me, pending, secret=secret, tls=tls, initiator=False, timeout=timeout,
                                     handshake_timeout=self.handshake_timeout, max_bytes=max_bytes, queue=queue)
            except Exception as e:  # PeerError, or a plaintext link refused off loopback (ValueError)
                ep, err = None, e
            with lock:
                state["active"] -= 1
                late = state["done"]
            if ep is not None and late:
                ep.close()
            elif not late:
                results.put((addr, ep if ep is not None else err))

        try:
            while True:
                while not results.empty():
                    addr, ep = results.get()
                    if isinstance(ep, Endpoint) and ep.peer not in got:
                        got[ep.peer] = ep
                        if len(got) == len(pending):
                            return got
                        continue
                    if isinstance(ep, Endpoint):
                        ep.close()
                        ep = f"site {ep.peer!r} is linked already"
                    self.dropped += 1
                    last = f"{addr[0]}:{addr[1]}: {ep}"
                    _log.warning("site %r: dropped a connection from %s while waiting for %s", me, last,
                                 [p for p in pending if p not in got])
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = f"; {self.dropped} connection(s) failed to authenticate, the last {last}" if last else ""
                    names = [p for p in pending if p not in got]
                    who = repr(names[0]) if len(names) == 1 else f"any of {names}"
                    raise PeerError(f"site {me!r} waited {timeout} s for site {who} to connect on "
                                    f"{self.host}:{self.port}{seen}")
                self._sock.settimeout(min(left, 0.05))
                try:
                    sock, addr = self._sock.accept()
                except TimeoutError:
                    continue
                with lock:
                    busy = state["active"] >= self.max_handshakes
                    state["active"] += 0 if busy else 1
                if busy:
                    sock.close()
                    self.dropped += 1
                    _log.warning("site %r: closed a connection from %s:%s: %d handshakes already in progress",
                                 me, addr[0], addr[1], self.max_handshakes)
                    continue
                threading.Thread(target=attempt, args=(sock, addr), name=f"hxtrain-handshake-{me}",
                                 daemon=True).start()
        except BaseException:
            for ep in got.values():
                ep.close()
            raise
        finally:
            with lock:
                state["done"] = True
            while not results.empty():  # an endpoint that authenticated while this one gave up
                _, ep = results.get()
                if isinstance(ep, Endpoint):
                    ep.close()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
