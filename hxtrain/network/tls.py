"""Mutual TLS 1.3 for links between sites, through the standard library's `ssl` (stdlib only, no JAX).

    tls = TlsConfig(cert="a.pem", key="a.key", ca="ca.pem")   # this site's certificate, and the CA it trusts
    channel = TlsChannel(sock, tls.context(server_side=True), server_side=True)
    channel.handshake(deadline)                               # CERT_REQUIRED both ways
    check_peer_name(channel.peer_names(), "b", me="a")       # the certificate must name the expected site

Both ends present a certificate signed by the run's CA (`hxtrain.network.certs` mints one per site for `hxtrain
launch`; `hxtrain site --tls-cert/--tls-key/--tls-ca` takes the user's own). A certificate names its site in its
subject alternative name (DNS) or common name, and each end checks it against the topology's site it expects.

`TlsChannel` runs the TLS state machine over memory BIOs with the socket I/O outside it, so that an endpoint's
reader and sender threads can use one connection at once: an OpenSSL connection object must not be used by two
threads concurrently, and a lock around `ssl.SSLSocket` calls would hold the reader's lock across blocking reads.
TLS records carry their own sequence numbers and AEAD tags: a record duplicated, reordered or altered on the path
fails its tag, and the link ends with an `ssl.SSLError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import socket
import ssl
import threading
import time

from hxtrain.links import wire

_CHUNK = 1 << 18  # plaintext bytes encrypted per lock hold when sending (encryption and sending interleave)


class TlsError(ValueError):
    """A TLS setting that cannot be used; the message names the flag or file."""


@dataclasses.dataclass(frozen=True)
class TlsConfig:
    """Paths of this site's certificate (PEM, its chain), its private key and the CA certificate it trusts."""

    cert: str
    key: str
    ca: str

    def check(self, flags=("--tls-cert", "--tls-key", "--tls-ca")) -> None:
        """TlsError naming the flag of a missing or unreadable file, or of a certificate/key that does not load."""
        for flag, path in zip(flags, (self.cert, self.key, self.ca)):
            if not os.path.isfile(path):
                raise TlsError(f"{flag}: expected a PEM file, got {path!r}, which does not exist")
        try:
            self.context(server_side=True)
        except ssl.SSLError as e:
            raise TlsError(f"{flags[0]}/{flags[1]}: {self.cert!r} and {self.key!r} do not load as a certificate "
                           f"and its private key, or {flags[2]} {self.ca!r} as a CA certificate ({e.reason or e})")

    def context(self, *, server_side: bool) -> ssl.SSLContext:
        return _context(self, server_side)


@functools.lru_cache(maxsize=16)
def _context(cfg: TlsConfig, server_side: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # site names are checked against the topology by `check_peer_name`
    ctx.verify_mode = ssl.CERT_REQUIRED  # both ways: a peer without a certificate of the run's CA is refused
    ctx.load_cert_chain(cfg.cert, cfg.key)
    ctx.load_verify_locations(cafile=cfg.ca)
    if server_side:
        ctx.num_tickets = 0  # no session tickets: nothing is written after the handshake but our own frames
    return ctx


def from_flags(site: str, cert: str | None, key: str | None, ca: str | None, *, plaintext: bool = False):
    """`hxtrain site`'s TLS flags as a checked `TlsConfig` (its certificate must name `site`), or None for the
    plaintext opt-out; TlsError naming the flag."""
    given = [f for f, v in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)) if v]
    if plaintext:
        if given:
            raise TlsError(f"--insecure-plaintext: links are either TLS or plaintext, got it with {given[0]}; "
                           "leave one out")
        return None
    if len(given) < 3:
        missing = [f for f in ("--tls-cert", "--tls-key", "--tls-ca") if f not in given]
        raise TlsError(f"{missing[0]}: every link between sites is mutual TLS; give this site's certificate, its key "
                       "and the run's CA (--tls-cert, --tls-key, --tls-ca; `hxtrain launch` mints them), or "
                       "--insecure-plaintext for sites on one machine (loopback only)")
    tls = TlsConfig(cert=cert, key=key, ca=ca)
    tls.check()
    from hxtrain.network.certs import certificate_names

    names = certificate_names(tls.cert)
    if site not in names:
        raise TlsError(f"--tls-cert: the certificate {tls.cert!r} names {', '.join(map(repr, names)) or 'no site'}, "
                       f"not this site {site!r}; its peers would refuse it")
    return tls


def check_peer_name(names: tuple[str, ...], peer: str, *, me: str) -> None:
    """ValueError unless the peer's verified certificate (`names`: `TlsChannel.peer_names()`) names site `peer`."""
    if peer not in names:
        shown = ", ".join(repr(n) for n in names) or "no site name"
        raise ValueError(f"site {me!r} expected site {peer!r} at the other end, but its certificate names {shown}")


class TlsChannel:
    """One TLS connection over a connected socket, for one reader thread and one sender thread at once.

    `sendall(data)` and `read_into(view, deadline)` stand in for the socket's; `shutdown` and `close` pass
    through. The socket's own timeout bounds `sendall`; reads wait with poll() until `deadline`."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool):
        self._sock = sock
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._lock = threading.Lock()  # the TLS object and its two BIOs
        self._wire = threading.Lock()  # the order of bytes on the socket

    def handshake(self, deadline: float) -> None:
        """Run the TLS handshake (TimeoutError at `deadline`, ssl.SSLError when refused, OSError/EOF when the
        other end drops the connection)."""
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill(deadline):
                    raise ssl.SSLEOFError("the other end closed the connection during the TLS handshake") from None
            except ssl.SSLError:
                with contextlib.suppress(OSError):
                    self._flush()  # the alert saying why, so the other end can name it
                raise

    def peer_names(self) -> tuple[str, ...]:
        """The site names the peer's verified certificate carries: DNS subject alternative names, then the CN."""
        cert = self._tls.getpeercert() or {}
        names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
        names += [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
        return tuple(dict.fromkeys(names))

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def sendall(self, data) -> None:
        view = memoryview(data).cast("B")
        with self._wire:
            for i in range(0, max(len(view), 1), _CHUNK):
                with self._lock:
                    self._tls.write(view[i : i + _CHUNK])
                    out = self._out.read()
                self._sock.sendall(out)

    def read_into(self, view: memoryview, deadline: float | None) -> int:
        """Read up to len(view) plaintext bytes; 0 at the end of the stream. TimeoutError at `deadline`."""
        while True:
            with self._lock:
                try:
                    n = self._tls.read(len(view), view)
                except ssl.SSLWantReadError:
                    n = None
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0  # closed (cleanly or not): the frame layer tells a boundary from a truncation
                pending = self._out.pending
            if pending:  # a post-handshake message the TLS layer answers (a key update)
                self._flush()
            if n is not None:
                return n
            if not self._fill(deadline):
                with self._lock:
                    self._in.write_eof()

    def _fill(self, deadline: float | None) -> bool:
        """Move what the socket has into the TLS layer; False at the end of the stream."""
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not wire.wait_readable(self._sock, left):
                raise TimeoutError("no TLS record arrived before the deadline")
        data = self._sock.recv(1 << 16)
        if not data:
            return False
        with self._lock:
            self._in.write(data)
        return True

    def _flush(self) -> None:
        with self._wire:
            with self._lock:
                out = self._out.read()
            if out:
                self._sock.sendall(out)

    def shutdown(self, how: int) -> None:
        self._sock.shutdown(how)

    def close(self) -> None:
        self._sock.close()
