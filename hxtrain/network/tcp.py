"""TCP links between sites: one `Endpoint` per (site, neighbouring site), numpy + stdlib only (no JAX).

Each Endpoint owns one socket and two threads:
- a sender thread drains a bounded queue of encoded payloads, so `send()` returns as soon as the payload is
  queued (the caller's compute goes on) and blocks only while the queue is full;
- a reader thread reads frames into an inbox keyed by (kind, step, microbatch, stage), so frames may arrive in
  any order and `recv()` picks the one it wants.

A peer that dies, stalls or sends a bad frame never crashes this process and never yields a corrupt tensor: the
thread records a `PeerError` naming the peer and the reason, closes the link, and the next send/recv raises it.

This module holds the `Listener`, the `Endpoint` and its `LinkStats`; the authenticating handshake every new
connection passes first (and `PeerError`) is `hxtrain.network.handshake`.
"""

from __future__ import annotations

import logging
import queue as queue_lib
import socket
import threading
import time
from dataclasses import dataclass

import numpy as np

from hxtrain.links import codecs
from hxtrain.links import wire
from hxtrain.links.wire import FrameError, Header, Kind
from hxtrain.network.handshake import PeerError, handshake

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinkStats:
    """What crossed one link after the handshake: data frames and the closing BYE, headers included."""

    bytes_sent: int = 0
    bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    send_seconds: float = 0.0  # time the sender thread spent framing + writing


class Listener:
    """A bound listening socket; `accept()` turns the next connection into an Endpoint. Use port 0 for an
    ephemeral port and read it back from `.port`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._sock = socket.create_server((host, port))
        self.host, self.port = self._sock.getsockname()[:2]

    def accept(self, me: str, peer: str, *, secret: bytes, timeout: float, max_bytes: int, queue: int = 8):
        """Wait up to `timeout` s for `peer` to connect and pass the handshake; returns the Endpoint."""
        self._sock.settimeout(timeout)
        try:
            sock, _ = self._sock.accept()
        except TimeoutError:
            raise PeerError(
                f"site {me!r} waited {timeout} s for site {peer!r} to connect on {self.host}:{self.port}"
            ) from None
        return Endpoint._start(sock, me, peer, secret=secret, timeout=timeout, max_bytes=max_bytes, queue=queue)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Endpoint:
    """One site's end of a link to one peer. Build with `listen`, `connect` or `Listener.accept`."""

    def __init__(self, sock, me, peer, keys, *, timeout, max_bytes, queue):
        self.me, self.peer, self.timeout, self.max_bytes = me, peer, timeout, max_bytes
        self._sock = sock
        self._send_key, self._recv_key = keys
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

    @classmethod
    def _start(cls, sock, me, peer, *, secret, timeout, max_bytes, queue):
        wire._check_secret(secret)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small control frames must not wait
        try:
            sock.settimeout(timeout)  # bounds every sendall; reads use select deadlines (wire.read_frame)
            keys = handshake(sock, me, peer, secret=secret, timeout=timeout)
        except BaseException:
            sock.close()
            raise
        return cls(sock, me, peer, keys, timeout=timeout, max_bytes=max_bytes, queue=queue)

    @classmethod
    def listen(cls, me, peer, host="127.0.0.1", port=0, *, secret, timeout, max_bytes, queue=8) -> Endpoint:
        """Bind host:port, wait up to `timeout` s for `peer` to connect, handshake. For an ephemeral port that the
        peer must learn first, use `Listener` directly."""
        with Listener(host, port) as listener:
            return listener.accept(me, peer, secret=secret, timeout=timeout, max_bytes=max_bytes, queue=queue)

    @classmethod
    def connect(cls, me, peer, host, port, *, secret, timeout, max_bytes, queue=8) -> Endpoint:
        """Connect to `peer` at host:port, retrying until `timeout` s have passed (it may start later)."""
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
                break
            except OSError as e:
                last = e
                time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 2, 0.5)
        return cls._start(sock, me, peer, secret=secret, timeout=timeout, max_bytes=max_bytes, queue=queue)

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
        wire.encode(kind, b"", secret=self._send_key, step=step, microbatch=microbatch, stage=stage,
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
                frame = wire.encode(kind, payload, secret=self._send_key, step=step, microbatch=mb, stage=stage,
                                    codec=codec_id, shape=shape, dtype=dtype)
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
                header, payload = wire.read_frame(self._sock, secret=self._recv_key, max_bytes=self.max_bytes,
                                                  timeout=self.timeout)
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

