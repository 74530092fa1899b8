"""The authenticating handshake that opens every TCP link between sites (`hxtrain.network.tcp`), and `PeerError`,
the error any failed link raises (the handshake being the first thing that can fail).

Handshake (both sides, symmetric): HELLO{version, site, 32-byte nonce} each way, then HELLO{proof} each way with
proof = HMAC(secret, "hxtrain-proof" | prover | verifier | verifier's nonce | prover's nonce). Fresh nonces make
a recorded handshake useless; names in the proof stop a reflected one. Data frames are then authenticated with
per-direction session keys derived from the secret and both nonces, so frames of another session or of the other
direction are refused as "auth".
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import socket

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


def handshake(sock: socket.socket, me: str, peer: str, *, secret: bytes, timeout: float) -> tuple[bytes, bytes]:
    """Authenticate `peer` on a connected socket; returns (send_key, recv_key) for data frames.

    PeerError on a wrong secret, a version mismatch, an unexpected site name or a silent peer.
    """
    me_b, peer_b = _check_name("me", me), _check_name("peer", peer)
    if me_b == peer_b:  # the proofs and session keys are bound to the (prover, verifier) order
        raise ValueError(f"me and peer must be different sites, got {me!r} for both")
    nonce = os.urandom(_NONCE_BYTES)
    hello = json.dumps({"version": wire.FORMAT_VERSION, "site": me, "nonce": nonce.hex()}).encode()

    def read(step: int) -> bytes:
        try:
            header, payload = wire.read_frame(sock, secret=secret, max_bytes=_HANDSHAKE_MAX_BYTES, timeout=timeout)
        except FrameError as e:
            if e.reason == "version":
                raise PeerError(
                    f"site {peer!r} speaks hxtrain wire format version {e.version}, site {me!r} speaks version "
                    f"{wire.FORMAT_VERSION}: run the same hxtrain version on both sites"
                ) from None
            if e.reason == "auth":
                raise PeerError(
                    f"site {peer!r} failed authentication during the handshake: its HELLO does not verify with "
                    f"site {me!r}'s secret (the two sites use different secrets?)"
                ) from None
            if e.reason == "closed":
                raise PeerError(f"site {peer!r} closed the connection during the handshake") from None
            raise PeerError(f"site {peer!r} sent a bad handshake frame ({e})") from None
        except TimeoutError:
            raise PeerError(f"no handshake from site {peer!r} within {timeout} s") from None
        except OSError as e:
            raise PeerError(f"site {peer!r} dropped the connection during the handshake ({e})") from None
        if header.kind == Kind.ERROR:
            raise _Refused(f"site {peer!r} refused the connection: {payload.decode(errors='replace')}")
        if header.kind != Kind.HELLO or header.step != step:
            raise PeerError(f"site {peer!r} sent {header.kind.name} (step {header.step}) instead of HELLO {step}")
        return payload

    try:
        sock.sendall(wire.encode(Kind.HELLO, hello, secret=secret, step=0))
        theirs = json.loads(read(0))
        if theirs.get("site") != peer:
            raise PeerError(f"expected site {peer!r} at the other end, but site {theirs.get('site')!r} answered")
        their_nonce = bytes.fromhex(theirs["nonce"])
        if len(their_nonce) != _NONCE_BYTES:
            raise ValueError(f"nonce of {len(their_nonce)} bytes, expected {_NONCE_BYTES}")
        proof = _mac(secret, b"hxtrain-proof", me_b, peer_b, their_nonce, nonce)
        sock.sendall(wire.encode(Kind.HELLO, proof, secret=secret, step=1))
        expected = _mac(secret, b"hxtrain-proof", peer_b, me_b, nonce, their_nonce)
        if not hmac.compare_digest(read(1), expected):
            raise PeerError(f"site {peer!r} failed the challenge-response (wrong secret or replayed handshake)")
    except _Refused:
        raise
    except PeerError as e:  # tell the peer why, so both logs say the same thing (best effort)
        with contextlib.suppress(OSError):
            sock.sendall(wire.encode(Kind.ERROR, str(e).encode(), secret=secret))
        raise
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as e:  # socket error or malformed HELLO
        raise PeerError(f"handshake with site {peer!r} failed: {e!r}") from None
    nonces = sorted([nonce, their_nonce])
    send_key = _mac(secret, b"hxtrain-data", me_b, peer_b, *nonces)
    recv_key = _mac(secret, b"hxtrain-data", peer_b, me_b, *nonces)
    return send_key, recv_key
