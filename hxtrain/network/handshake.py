"""The authenticating handshake that opens every link between sites (`hxtrain.network.tcp`), and `PeerError`,
the error any failed link raises (the handshake being the first thing that can fail).

It proves that both ends hold this run's shared secret (`hxtrain launch` draws a fresh one per run), over TLS (whose
certificates say which site is at the other end) or, opted out, over plain loopback TCP:

1. both ends send HELLO{version, site, 32-byte nonce} (not tagged: it proves nothing and reveals nothing);
2. the initiator (the end that connected) sends its proof = HMAC(secret, "hxtrain-proof" | prover | verifier |
   verifier's nonce | prover's nonce);
3. the responder (the listener) checks it and only then sends its own proof; the initiator checks that.

Fresh nonces make a recorded handshake useless and names in the proof stop a reflected one. A stranger who connects
to a listener never receives anything computed from the secret, so it cannot test guesses offline. Over plain TCP,
data frames are then tagged with per-direction session keys derived from the secret and both nonces (frames of
another session or direction are refused as "auth"); over TLS the frames carry no tags of their own.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import ssl

from hxtrain.links import wire
from hxtrain.links.wire import FrameError, Kind

_HANDSHAKE_MAX_BYTES = 4096
_NONCE_BYTES = 32


class PeerError(RuntimeError):
    """A link to a peer site failed; the message names the peer and what happened. `reason` is the wire's
    FrameError reason ("checksum", "auth", ...) when a bad frame caused it, else None."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


class _Refused(PeerError):
    """The peer sent ERROR during the handshake: nothing to tell it back."""


def _check_name(field: str, name: str) -> bytes:
    raw = name.encode() if isinstance(name, str) else b""
    if not raw or len(raw) > 255 or b"\0" in raw:
        raise ValueError(f"{field} must be a non-empty site name (<= 255 bytes, no NUL), got {name!r}")
    return raw


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"\0".join(parts), hashlib.sha256).digest()


def handshake(sock, me: str, peer: str | tuple[str, ...], *, secret: bytes, timeout: float, initiator: bool,
              tls: bool = False) -> tuple[bytes | None, bytes | None, str]:
    """Authenticate `peer` on a connected socket or `TlsChannel`; returns (send_key, recv_key, the peer's name):
    the keys for data frames, (None, None) over TLS. The accepting end may name several sites (a tuple): any one
    of them may answer, and the name says which did.

    PeerError on a wrong secret, a version mismatch, an unexpected site name or a silent peer.
    """
    peers = (peer,) if isinstance(peer, str) else tuple(peer)
    me_b = _check_name("me", me)
    if not peers or (initiator and len(peers) > 1):
        raise ValueError(f"peer: expected one site name (or several on the accepting end), got {peer!r}")
    for p in peers:
        if _check_name("peer", p) == me_b:  # the proofs and session keys are bound to the (prover, verifier) order
            raise ValueError(f"me and peer must be different sites, got {me!r} for both")
    peer = peers[0] if len(peers) == 1 else "/".join(peers)  # named in messages until the peer says who it is
    wire.check_key(secret)
    nonce = os.urandom(_NONCE_BYTES)
    hello = json.dumps({"version": wire.FORMAT_VERSION, "site": me, "nonce": nonce.hex()}).encode()

    def read(step: int) -> bytes:
        try:
            header, payload = wire.read_frame(sock, key=None, max_bytes=_HANDSHAKE_MAX_BYTES, timeout=timeout)
        except FrameError as e:
            if e.reason == "version":
                raise PeerError(
                    f"site {peer!r} speaks hxtrain wire format version {e.version}, site {me!r} speaks version "
                    f"{wire.FORMAT_VERSION}: run the same hxtrain version on both sites"
                ) from None
            if e.reason == "closed":
                raise PeerError(f"site {peer!r} closed the connection during the handshake", "closed") from None
            raise PeerError(f"site {peer!r} sent a bad handshake frame ({e})", e.reason) from None
        except TimeoutError:
            raise PeerError(f"no handshake from site {peer!r} within {timeout} s", "timeout") from None
        except ssl.SSLError as e:  # over TLS: the peer refused this end's certificate, or a record failed its tag
            raise PeerError(f"TLS link with site {peer!r} failed during the handshake: {e.reason or e}", "tls") from None
        except OSError as e:
            raise PeerError(f"site {peer!r} dropped the connection during the handshake ({e})", "closed") from None
        if header.kind == Kind.ERROR:
            raise _Refused(f"site {peer!r} refused the connection: {payload.decode(errors='replace')}")
        if header.kind != Kind.HELLO or header.step != step:
            raise PeerError(f"site {peer!r} sent {header.kind.name} (step {header.step}) instead of HELLO {step}")
        return payload

    def send(kind, payload: bytes, step: int = 0) -> None:
        sock.sendall(wire.encode(kind, payload, key=None, step=step))

    try:
        send(Kind.HELLO, hello)
        theirs = json.loads(read(0))
        if theirs.get("site") not in peers:
            raise PeerError(f"expected site {peer!r} at the other end, but site {theirs.get('site')!r} answered")
        peer = theirs["site"]
        peer_b = peer.encode()
        their_nonce = bytes.fromhex(theirs["nonce"])
        if len(their_nonce) != _NONCE_BYTES:
            raise ValueError(f"nonce of {len(their_nonce)} bytes, expected {_NONCE_BYTES}")
        proof = _mac(secret, b"hxtrain-proof", me_b, peer_b, their_nonce, nonce)
        expected = _mac(secret, b"hxtrain-proof", peer_b, me_b, nonce, their_nonce)
        if initiator:
            send(Kind.HELLO, proof, 1)
        if not hmac.compare_digest(read(1), expected):
            raise PeerError(f"site {peer!r} failed the challenge-response: it does not hold the secret of site {me!r} "
                            "(the two sites use different secrets, or the handshake was replayed)", "auth")
        if not initiator:
            send(Kind.HELLO, proof, 1)
    except _Refused:
        raise
    except PeerError as e:  # tell the peer why, so both logs say the same thing (best effort)
        with contextlib.suppress(OSError):
            send(Kind.ERROR, str(e).encode())
        raise
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:  # socket error or malformed HELLO
        raise PeerError(f"handshake with site {peer!r} failed: {e!r}") from None
    if tls:
        return None, None, peer
    nonces = sorted([nonce, their_nonce])
    send_key = _mac(secret, b"hxtrain-data", me_b, peer_b, *nonces)
    recv_key = _mac(secret, b"hxtrain-data", peer_b, me_b, *nonces)
    return send_key, recv_key, peer
