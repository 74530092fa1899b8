"""TCP links between sites: one `Endpoint` per (site, neighbouring site), numpy + stdlib only (no JAX).

Each Endpoint owns one socket and two threads:
- a sender thread drains a bounded queue of encoded payloads, so `send()` returns as soon as the payload is
  queued (the caller's compute goes on) and blocks only while the queue is full;
- a reader thread reads frames into an inbox keyed by (kind, step, microbatch, stage), so frames may arrive in
  any order and `recv()` picks the one it wants.

A peer that dies, stalls or sends a bad frame never crashes this process and never yields a corrupt tensor: the
thread records a `PeerError` naming the peer and the reason, closes the link, and the next send/recv raises it.

Every frame carries a sequence number per link direction; one that arrives out of turn (duplicated, dropped or
reordered on the path) ends the link, reason "sequence".

This module holds the `Endpoint` and its `LinkStats`; `hxtrain.network.listener` accepts connections. A new connection passes mutual TLS first
(`hxtrain.network.tls`; plaintext only on loopback, opted out and logged), then the run's handshake
(`hxtrain.network.handshake`, which also defines `PeerError`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import queue as queue_lib
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import numpy as np

from hxtrain.links import codecs
from hxtrain.links import wire
from hxtrain.links.wire import FrameError, Header, Kind
from hxtrain.network.handshake import PeerError, handshake
from hxtrain.network.tls import TlsChannel, check_peer_name

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkStats:
    """What crossed one link after the handshake: data frames and the closing BYE, headers included."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    send_seconds: float = 0.0  # time the sender thread spent framing + writing


HANDSHAKE_TIMEOUT = 10.0  # seconds one connection may take to authenticate before a listener drops it
MAX_HANDSHAKES = 8  # connections a listener authenticates at once; more are closed at once (and logged)


def _check_plaintext(sock: socket.socket, me: str, peer: str) -> None:
    """A link without TLS is for loopback only, and says so loudly."""
    ends = [sock.getsockname()[0], sock.getpeername()[0]]
    off = [a for a in ends if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if off:
        raise ValueError(f"plaintext link from site {me!r} to site {peer!r} refused: {off[0]} is not a loopback "
                         "address; plaintext (--insecure-plaintext) is for loopback only, use TLS between hosts")
    _log.warning("link from site %r to site %r is NOT encrypted (plaintext opt-out, loopback only)", me, peer)


class Endpoint:
    """One site's end of a link to one peer. Build with `connect` or `hxtrain.network.listener.Listener.accept`.

    `tls` is a `hxtrain.network.tls.TlsConfig` (mutual TLS 1.3, the peer's certificate must name `peer`), or None
    for a plaintext link on loopback (HMAC-tagged frames)."""

    def __init__(self, sock, me, peer, keys, *, timeout, max_bytes, queue):
        self.me, self.peer, self.timeout, self.max_bytes = me, peer, timeout, max_bytes
        self._sock = sock  # a socket, or a TlsChannel over one
        self._send_key, self._recv_key = keys
        self._send_seq = self._recv_seq = 0
        self._queue: queue_lib.Queue = queue_lib.Queue(maxsize=queue)
        self._cond = threading.Condition()
        self._inbox: dict[tuple, list] = {}  # (kind, step, microbatch, stage) -> [(Header, array)], FIFO
        self._error: PeerError | None = None
        self._closed = False
        self._stats = LinkStats()
        self._sender = threading.Thread(target=self._send_loop, name=f"hxtrain-send-{me}->{peer}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"hxtrain-recv-{peer}->{me}", daemon=True)
        self._sender.start()
        self._reader.start()

    @property
    def encrypted(self) -> bool:
        return isinstance(self._sock, TlsChannel)

    @classmethod
    def _start(cls, sock, me, peer, *, secret, tls, initiator, timeout, handshake_timeout, max_bytes, queue):
        """TLS (unless `tls` is None), then the run's handshake, within `handshake_timeout` s; then an Endpoint
        whose peer may stay silent `timeout` s."""
        wire.check_key(secret)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small control frames must not wait
        deadline = time.monotonic() + handshake_timeout
        try:
            sock.settimeout(handshake_timeout)  # bounds every sendall; reads use poll deadlines (wire.read_frame)
            channel = sock
            if tls is None:
                _check_plaintext(sock, me, peer if isinstance(peer, str) else "/".join(peer))
            else:
                channel = TlsChannel(sock, tls.context(server_side=not initiator), server_side=not initiator)
                peer = _tls_handshake(channel, me, peer, deadline, handshake_timeout)
            *keys, peer = handshake(channel, me, peer, secret=secret, timeout=max(0.01, deadline - time.monotonic()),
                                    initiator=initiator, tls=tls is not None)
            sock.settimeout(timeout)
        except BaseException:
            sock.close()
            raise
        return cls(channel, me, peer, keys, timeout=timeout, max_bytes=max_bytes, queue=queue)

    @classmethod
    def connect(cls, me, peer, host, port, *, secret, tls, timeout, max_bytes, queue=8,
                handshake_timeout=HANDSHAKE_TIMEOUT) -> Endpoint:
        """Connect to `peer` at host:port, retrying until `timeout` s have passed: it may start later, or drop
        this connection unauthenticated while it is busy with others."""
        deadline, delay, last = time.monotonic() + timeout, 0.02, None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(
                    f"site {me!r} could not connect to site {peer!r} at {host}:{port} within {timeout} s "
                    f"(last error: {last})"
                )
            try:
                sock = socket.create_connection((host, port), timeout=left)
                return cls._start(sock, me, peer, secret=secret, tls=tls, initiator=True, timeout=timeout,
                                  handshake_timeout=min(handshake_timeout, left), max_bytes=max_bytes, queue=queue)
            except PeerError as e:
                if e.reason != "closed":  # refused for a reason: trying again would not change it
                    raise
                last = e
            except OSError as e:
                last = e
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.5)

    # -- sending -------------------------------------------------------------------------------------------------

    def send(self, kind, array: np.ndarray, *, step: int, microbatch: int = 0, stage: int = 0, codec="none") -> int:
        """Queue `array` for the peer, compressed with `codec` (a name or a Codec); returns the frame's bytes on the
        wire. Blocks only while the queue is full, at most `timeout` s, then PeerError."""
        codec = codecs.get_codec(codec) if isinstance(codec, str) else codec
        array = np.asarray(array)
        payload = codec.encode(array)  # a copy: the caller may reuse `array` as soon as we return
        item = (Kind(kind), payload, array.shape, array.dtype, codec.id, step, microbatch, stage)
        # Validate dtype, shape and counters here, on the caller's thread, where an error can be raised to the
        # caller; framing an empty payload costs microseconds (the real HMAC runs on the sender thread).
        wire.encode(kind, b"", key=self._send_key, step=step, microbatch=microbatch, stage=stage,
                    codec=codec.id, shape=array.shape, dtype=array.dtype)
        self._raise_if_failed()
        deadline = time.monotonic() + self.timeout
        while True:  # wait in slices so a sender failure surfaces at once instead of after the full timeout
            try:
                self._queue.put(item, timeout=min(0.05, max(0.0, deadline - time.monotonic())))
                break
            except queue_lib.Full:
                self._raise_if_failed()
                if time.monotonic() >= deadline:
                    raise PeerError(
                        f"send queue from site {self.me!r} to site {self.peer!r} stayed full ({self._queue.maxsize} "
                        f"frames) for {self.timeout} s: site {self.peer!r} is not reading or the link is too slow"
                    ) from None
        return wire.frame_size(len(payload))

    def _send_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, payload, shape, dtype, codec_id, step, mb, stage = item
            t0 = time.perf_counter()
            try:
                frame = wire.encode(kind, payload, key=self._send_key, seq=self._send_seq, step=step,
                                    microbatch=mb, stage=stage, codec=codec_id, shape=shape, dtype=dtype)
                self._send_seq += 1
                self._sock.sendall(frame)
            except TimeoutError:
                self._fail(f"site {self.peer!r} did not accept data for {self.timeout} s "
                           f"(not reading, or the link is stalled)")
                return
            except OSError as e:
                self._fail(f"sending to site {self.peer!r} failed: {e} (site {self.peer!r} closed or reset?)")
                return
            except Exception as e:  # never die silently: the next send/recv must say what happened
                self._fail(f"sender thread for site {self.peer!r} failed: {e!r}")
                return
            with self._cond:
                s = self._stats
                self._stats = LinkStats(s.bytes_sent + len(frame), s.bytes_received, s.frames_sent + 1,
                                        s.frames_received, s.send_seconds + time.perf_counter() - t0)

    # -- receiving -----------------------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        while True:
            try:
                header, payload = wire.read_frame(self._sock, key=self._recv_key, max_bytes=self.max_bytes,
                                                  timeout=self.timeout)
                if header.seq != self._recv_seq:
                    raise FrameError("sequence", f"frame number {header.seq} arrived where {self._recv_seq} was due "
                                                 "(duplicated, dropped or reordered on the path)")
                self._recv_seq += 1
                self._count_received(header)
                if header.kind == Kind.BYE:
                    self._fail(f"site {self.peer!r} closed the connection (it said goodbye)")
                    return
                if header.dtype is not None and header.codec != 0:
                    payload = codecs.codec_by_id(header.codec).decode(payload, header.shape, header.dtype)
            except TimeoutError:
                if self._closed:
                    return
                continue  # an idle link is fine; only a frame stalled midway is an error (FrameError)
            except FrameError as e:
                if e.reason == "closed":
                    self._fail(f"site {self.peer!r} closed the connection")
                else:
                    _log.warning("bad frame from site %r: %s; closing the link", self.peer, e)
                    self._fail(f"site {self.peer!r} sent a bad frame ({e.reason}): {e}; connection closed",
                               reason=e.reason)
                return
            except ValueError as e:  # authenticated but undecodable: a sender bug, still never delivered
                self._fail(f"site {self.peer!r} sent an undecodable payload ({e}); connection closed", reason="codec")
                return
            except ssl.SSLError as e:  # a TLS record failed its tag: duplicated, reordered or altered on the path
                self._fail(f"TLS link from site {self.peer!r} failed: {e.reason or e} (a record was duplicated, "
                           "reordered or altered on the path); connection closed", reason="tls")
                return
            except OSError as e:
                self._fail(f"connection to site {self.peer!r} failed: {e}")
                return
            key = (header.kind, header.step, header.microbatch, header.stage)
            with self._cond:
                self._inbox.setdefault(key, []).append((header, payload))
                self._cond.notify_all()

    def _count_received(self, header: Header) -> None:
        with self._cond:
            s = self._stats
            self._stats = LinkStats(s.bytes_sent, s.bytes_received + header.frame_bytes, s.frames_sent,
                                    s.frames_received + 1, s.send_seconds)

    def recv(self, *, kind=None, step=None, microbatch=None, stage=None, timeout=None) -> tuple[Header, np.ndarray]:
        """The oldest received frame matching the given fields (None = any), waiting up to `timeout` s (default:
        the endpoint's). Frames that arrived before a failure are still delivered; then PeerError."""
        want = (None if kind is None else Kind(kind), step, microbatch, stage)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for key, items in self._inbox.items():
                    if all(w is None or w == k for w, k in zip(want, key)):
                        item = items.pop(0)
                        if not items:
                            del self._inbox[key]
                        return item
                if self._error is not None:
                    raise self._error
                if self._closed:
                    raise PeerError(f"link from site {self.me!r} to site {self.peer!r} is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    what = ", ".join(f"{n}={v}" for n, v in zip(("kind", "step", "microbatch", "stage"), want)
                                     if v is not None) or "any frame"
                    raise PeerError(f"no frame from site {self.peer!r} within {timeout} s (wanted {what})")
                self._cond.wait(left)

    # -- status and shutdown -------------------------------------------------------------------------------------

    @property
    def stats(self) -> LinkStats:
        with self._cond:
            return self._stats

    @property
    def error(self) -> PeerError | None:
        """The recorded failure of this link, if any; `error.reason` says which bad frame, when one did."""
        return self._error

    def _fail(self, message: str, reason: str | None = None) -> None:
        with self._cond:
            if self._error is None and not self._closed:
                self._error = PeerError(message, reason)
            self._cond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the other thread; the socket is closed in close()
        except OSError:
            pass

    def abort(self, message: str) -> None:
        """Fail the link from this side: record PeerError(message) (unless one is already recorded), wake a
        waiting `recv` and shut the socket (the peer sees the connection close). For a caller that lost a frame
        it meant to send, so the link's stream is no longer what the peer expects."""
        self._fail(message)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error
        if self._closed:
            raise PeerError(f"link from site {self.me!r} to site {self.peer!r} is closed")

    def close(self) -> None:
        """Flush queued frames (up to `timeout` s), say BYE, close the socket. Idempotent."""
        if self._closed:
            return
        if self._error is None:
            try:
                self._queue.put((Kind.BYE, b"", (), None, 0, 0, 0, 0), timeout=self.timeout)
            except queue_lib.Full:
                pass
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        try:
            self._queue.put_nowait(None)
        except queue_lib.Full:
            pass
        self._sender.join(self.timeout)
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(self.timeout)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()



def _tls_handshake(channel: TlsChannel, me: str, peer, deadline: float, seconds: float) -> str:
    """The TLS handshake and the site-name check, as PeerErrors: reason "closed" when the other end dropped the
    connection before authenticating (`connect` tries again), "tls" when it refused or was refused. `peer`: a
    site name, or a tuple of the names an accepting end takes; returns the one the certificate names."""
    peers = (peer,) if isinstance(peer, str) else tuple(peer)
    peer = "/".join(peers)  # in messages, until the certificate says which
    try:
        channel.handshake(deadline)
        names = channel.peer_names()
        peer = next((p for p in peers if p in names), peer)
        check_peer_name(names, peer, me=me)
        return peer
    except TimeoutError:
        raise PeerError(f"no TLS handshake from site {peer!r} within {seconds} s", "timeout") from None
    except ssl.SSLCertVerificationError as e:
        raise PeerError(f"site {me!r} refused the certificate of the peer it expected as site {peer!r}: "
                        f"{e.verify_message}", "tls") from None
    except (ssl.SSLEOFError, ConnectionError) as e:
        raise PeerError(f"site {peer!r} closed the connection during the TLS handshake ({e})", "closed") from None
    except ssl.SSLError as e:
        raise PeerError(f"TLS handshake with site {peer!r} failed: {e.reason or e}", "tls") from None
    except ValueError as e:  # a certificate of the run's CA that names another site: tell the other end why
        with contextlib.suppress(OSError, ssl.SSLError):
            channel.sendall(wire.encode(Kind.ERROR, str(e).encode(), key=None))
        raise PeerError(str(e), "tls") from None
    except OSError as e:
        raise PeerError(f"site {peer!r} dropped the connection during the TLS handshake ({e})", "closed") from None
