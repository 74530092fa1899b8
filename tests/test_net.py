"""TCP endpoints over loopback (plaintext, the loopback-only opt-out; TLS is tests/test_tls.py): round trips,
out-of-order recv, bad frames, handshake refusals, dead peers, timeouts and the bounded send queue. Every socket is
closed; timeouts are <= 2 s."""

import contextlib
import socket
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from hxtrain.network import tcp as net
from hxtrain.links import wire
from hxtrain.links.codecs import get_codec
from hxtrain.network.handshake import PeerError
from hxtrain.network.listener import Listener
from hxtrain.network.tcp import Endpoint
from hxtrain.links.wire import Kind

SECRET = b"x" * 32
MAX = 1 << 26
T = 2.0


def _accept_in_thread(listener, me, peer, **kw):
    """Start listener.accept in a thread; returns a function giving its Endpoint (or raising its error)."""
    out = {}

    def run():
        try:
            out["ep"] = listener.accept(me, peer, **{"secret": SECRET, "tls": None, "timeout": T, "max_bytes": MAX,
                                                     **kw})
        except Exception as e:  # handed to the test thread
            out["err"] = e

    th = threading.Thread(target=run)
    th.start()

    def result():
        th.join(2 * T)
        if "err" in out:
            raise out["err"]
        return out["ep"]

    return result


@contextlib.contextmanager
def _pair(**kw):
    """Endpoints a <-> b in this process (threads)."""
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "b", **kw)
        b = Endpoint.connect("b", "a", "127.0.0.1", listener.port,
                             **{"secret": SECRET, "tls": None, "timeout": T, "max_bytes": MAX, **kw})
        a = accepted()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


@contextlib.contextmanager
def _raw_peer(rcvbuf=None, **kw):
    """Endpoint 'a' and a raw socket that passed the handshake as site 'raw': (endpoint, sock, send_key)."""
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "raw", **kw)
        sock = socket.socket()
        try:
            if rcvbuf:  # a small receive buffer (set before connect) makes a non-reading peer fill up fast
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.connect(("127.0.0.1", listener.port))
            send_key, _, _ = net.handshake(sock, "raw", "a", secret=SECRET, timeout=T, initiator=True)
            ep = accepted()
            try:
                yield ep, sock, send_key
            finally:
                ep.close()
        finally:
            sock.close()


def _wait_for(pred, seconds=T):
    deadline = time.monotonic() + seconds
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_roundtrip_dtypes_codecs_and_byte_counters():
    rng = np.random.default_rng(0)
    cases = [(np.float32, (4, 8), "none"), (np.float16, (3,), "none"), (ml_dtypes.bfloat16, (2, 2, 2), "none"),
             (np.int32, (5,), "none"), (np.uint8, (), "none"), (np.float32, (16, 32), "bf16"),
             (np.float32, (8, 64), "int8"), (np.float32, (8, 64), "fp8"), (np.float32, (0, 4), "none")]
    with _pair() as (a, b):
        sent = 0
        for i, (dtype, shape, codec) in enumerate(cases):
            x = rng.standard_normal(shape).astype(dtype)
            n = a.send(Kind.ACTIVATION, x, step=i, microbatch=1, stage=2, codec=codec)
            assert n == wire.HEADER_SIZE + get_codec(codec).wire_bytes(shape, dtype)
            sent += n
            h, y = b.recv(step=i)
            assert (h.kind, h.step, h.microbatch, h.stage, h.shape) == (Kind.ACTIVATION, i, 1, 2, shape)
            assert y.dtype == np.dtype(dtype) and y.shape == shape
            if codec == "none":
                assert y.tobytes() == x.tobytes()
            else:
                np.testing.assert_allclose(y, x, atol=0.1 * np.abs(x).max())
        b.send(Kind.COTANGENT, np.ones(3, np.float32), step=0)  # the other direction works too
        assert a.recv(kind=Kind.COTANGENT)[1].tolist() == [1, 1, 1]
        # the sender thread counts after sendall() returns, which may be after the peer already has the frame
        _wait_for(lambda: a.stats.frames_sent == len(cases) and b.stats.frames_sent == 1)
        assert a.stats.bytes_sent == sent == b.stats.bytes_received
        assert b.stats.frames_received == len(cases) and a.stats.send_seconds > 0
        assert b.stats.bytes_sent == a.stats.bytes_received == wire.HEADER_SIZE + 12


def test_out_of_order_recv_by_key():
    with _pair() as (a, b):
        for step in range(2):
            for mb in range(3):
                a.send(Kind.ACTIVATION, np.full(2, 10 * step + mb, np.int32), step=step, microbatch=mb)
        a.send(Kind.COTANGENT, np.full(2, -1, np.int32), step=0, microbatch=0)
        h, y = b.recv(kind=Kind.COTANGENT)  # arrived last, asked first
        assert (h.kind, y[0]) == (Kind.COTANGENT, -1)
        for step, mb in [(1, 2), (0, 1), (1, 0), (0, 2)]:
            h, y = b.recv(kind=Kind.ACTIVATION, step=step, microbatch=mb)
            assert (h.step, h.microbatch, y[0]) == (step, mb, 10 * step + mb)
        assert b.recv()[1][0] == 0  # wildcard: the oldest remaining frame
        assert b.recv(step=1)[1][0] == 11


def test_recv_timeout_names_peer_and_wanted_key():
    with _pair() as (a, b):
        a.send(Kind.ACTIVATION, np.zeros(1, np.float32), step=3, microbatch=0)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match=r"no frame from site 'a' within 0.2 s \(wanted step=3, microbatch=1\)"):
            b.recv(step=3, microbatch=1, timeout=0.2)
        assert 0.15 < time.monotonic() - t0 < 1.0
        assert b.recv(step=3, microbatch=0)[0].step == 3  # the link is still fine


def _bad_frames(key):  # each is the link's second frame (seq 1)
    good = wire.encode(Kind.ACTIVATION, np.arange(8, dtype=np.float32), key=key, seq=1, step=1)
    corrupt = bytearray(good)
    corrupt[-2] ^= 0x10
    return {
        "truncated": (good[:-3], "stream ended after"),
        "checksum": (bytes(corrupt), "CRC32 mismatch"),
        "auth": (wire.encode(Kind.ACTIVATION, np.ones(8, np.float32), key=SECRET, seq=1, step=1), "HMAC"),  # not the session key
        "oversize": (wire.encode(Kind.ACTIVATION, np.ones(300, np.float32), key=key, seq=1, step=1),
                     "max_bytes=1000"),
        "version": (wire.encode(Kind.ACTIVATION, np.ones(8, np.float32), key=key, seq=1, version=3), "version 3"),
        "sequence": (wire.encode(Kind.ACTIVATION, np.ones(8, np.float32), key=key, seq=0, step=1),  # a replay
                     "frame number 0 arrived where 1 was due"),
        "magic": (b"XXXX" + good[4:], "expected magic"),
    }


@pytest.mark.parametrize("reason", list(_bad_frames(SECRET)))
def test_bad_frame_closes_link_and_raises_on_next_recv(reason):
    with _raw_peer(max_bytes=1000) as (ep, sock, key):
        sock.sendall(wire.encode(Kind.ACTIVATION, np.ones(4, np.float32), key=key, step=0))
        buf, detail = _bad_frames(key)[reason]
        sock.sendall(buf)
        if reason == "truncated":
            sock.shutdown(socket.SHUT_WR)  # the rest never comes
        assert ep.recv(step=0)[1].tolist() == [1, 1, 1, 1]  # frames before the bad one are delivered
        with pytest.raises(PeerError, match=rf"site 'raw' sent a bad frame \({reason}\): .*{detail}.*closed") as e:
            ep.recv(step=1, timeout=1.0)  # the bad frame is never delivered
        assert e.value.reason == reason and ep.error is e.value
        sock.settimeout(T)
        assert sock.recv(1 << 16) == b""  # the endpoint closed its side of the connection
        with pytest.raises(PeerError, match=f"sent a bad frame \\({reason}\\)"):
            ep.send(Kind.ACTIVATION, np.ones(1, np.float32), step=9)


def test_stalled_frame_is_truncated_after_timeout():
    with _raw_peer(timeout=0.3) as (ep, sock, key):
        sock.sendall(wire.encode(Kind.ACTIVATION, np.ones(4, np.float32), key=key)[:50])
        with pytest.raises(PeerError, match=r"bad frame \(truncated\): .*stalled after 50 bytes"):
            ep.recv(timeout=1.0)


def test_wrong_secret_refused_at_connect_and_the_listener_keeps_waiting():
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "b", timeout=0.8)
        with pytest.raises(PeerError, match="site 'a' refused the connection: site 'b' failed the challenge-response: "
                                            "it does not hold the secret of site 'a'"):
            Endpoint.connect("b", "a", "127.0.0.1", listener.port, secret=b"y" * 32, tls=None, timeout=T,
                             max_bytes=MAX)
        with pytest.raises(PeerError, match=r"site 'a' waited 0.8 s for site 'b' to connect on .*; 1 connection\(s\) "
                                            r"failed to authenticate, the last 127.0.0.1:\d+: site 'b' failed the "
                                            "challenge-response"):
            accepted()


def test_version_mismatch_refused_at_connect_both_ways():
    hello = b'{"version": 3, "site": "b", "nonce": "00"}'
    with Listener() as listener:  # a future peer connects to us
        accepted = _accept_in_thread(listener, "a", "b", timeout=0.8)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(wire.encode(Kind.HELLO, hello, key=None, version=3))
            with pytest.raises(PeerError, match="site 'b' speaks hxtrain wire format version 3, site 'a' speaks "
                                                "version 2: run the same hxtrain version"):
                accepted()
    with socket.create_server(("127.0.0.1", 0)) as server:  # we connect to a future peer
        def future_peer():
            conn, _ = server.accept()
            with conn:
                conn.sendall(wire.encode(Kind.HELLO, hello, key=None, version=3))
                conn.recv(4096)

        th = threading.Thread(target=future_peer)
        th.start()
        with pytest.raises(PeerError, match="site 'b' speaks hxtrain wire format version 3, site 'a' speaks version 2"):
            Endpoint.connect("a", "b", "127.0.0.1", server.getsockname()[1], secret=SECRET, tls=None, timeout=T,
                             max_bytes=MAX)
        th.join(T)


def test_unexpected_site_name_refused():
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "b", timeout=0.8)
        with pytest.raises(PeerError, match="site 'a' refused the connection: expected site 'b' at the other "
                                            "end, but site 'c' answered"):
            Endpoint.connect("c", "a", "127.0.0.1", listener.port, secret=SECRET, tls=None, timeout=T, max_bytes=MAX)
        with pytest.raises(PeerError, match="expected site 'b' at the other end, but site 'c' answered"):
            accepted()


def test_peer_close_surfaces_on_recv_and_send():
    with _pair() as (a, b):
        a.send(Kind.ACTIVATION, np.ones(2, np.float32), step=0)
        a.close()  # flushes, then says BYE
        t0 = time.monotonic()
        assert b.recv(step=0)[1].tolist() == [1, 1]  # queued before the close: still delivered
        with pytest.raises(PeerError, match="site 'a' closed the connection"):
            b.recv(step=1, timeout=1.5)
        assert time.monotonic() - t0 < 1.0
        with pytest.raises(PeerError, match="site 'a' closed the connection"):
            b.send(Kind.ACTIVATION, np.ones(2, np.float32), step=1)
        with pytest.raises(PeerError, match="link from site 'a' to site 'b' is closed"):
            a.send(Kind.ACTIVATION, np.ones(2, np.float32), step=1)


def test_peer_process_dies_without_bye():
    with _raw_peer() as (ep, sock, key):
        sock.close()  # as if the process was killed
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="site 'raw' closed the connection"):
            ep.recv(timeout=1.5)
        assert time.monotonic() - t0 < 1.0


def test_send_blocks_when_queue_full_and_resumes_when_peer_reads():
    big = np.zeros(2 * 1024 * 1024, np.float32)  # 8 MiB frames: more than the socket buffers hold
    with _raw_peer(rcvbuf=65536, queue=2) as (ep, sock, key):
        for step in range(3):  # one in the sender thread (stuck in sendall), two in the queue
            ep.send(Kind.ACTIVATION, big, step=step)
        blocked = threading.Thread(target=ep.send, args=(Kind.ACTIVATION, big), kwargs={"step": 3})
        blocked.start()
        time.sleep(0.3)
        assert blocked.is_alive(), "send() should block while the queue is full"
        total, want = 0, 4 * wire.frame_size(big.nbytes)
        sock.settimeout(T)
        while total < want:  # the peer starts reading: everything drains, the blocked send returns
            total += len(sock.recv(1 << 20))
        blocked.join(T)
        assert not blocked.is_alive() and total == want
        _wait_for(lambda: ep.stats.frames_sent == 4)
        assert ep.stats.bytes_sent == want


def test_send_to_non_reading_peer_fails_after_timeout():
    big = np.zeros(2 * 1024 * 1024, np.float32)
    with _raw_peer(rcvbuf=65536, queue=1, timeout=0.5) as (ep, sock, key):
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="site 'raw'.*not reading"):
            for step in range(10):
                ep.send(Kind.ACTIVATION, big, step=step)
        assert 0.4 < time.monotonic() - t0 < 1.5


def test_connect_retries_until_listener_appears():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]  # a free port, released on exit; the listener takes it later
    out = {}

    def late_listener():
        time.sleep(0.3)
        with Listener("127.0.0.1", port) as listener:
            out["a"] = listener.accept("a", "b", secret=SECRET, tls=None, timeout=T, max_bytes=MAX)

    th = threading.Thread(target=late_listener)
    th.start()
    b = Endpoint.connect("b", "a", "127.0.0.1", port, secret=SECRET, tls=None, timeout=T, max_bytes=MAX)
    th.join(T)
    try:
        b.send(Kind.CONTROL, np.arange(3, dtype=np.int32), step=0)
        assert out["a"].recv(kind=Kind.CONTROL)[1].tolist() == [0, 1, 2]
    finally:
        b.close()
        out["a"].close()


def test_connect_and_accept_deadlines():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        port = probe.getsockname()[1]
    with pytest.raises(PeerError, match=rf"site 'b' could not connect to site 'a' at 127.0.0.1:{port} within 0.3 s"):
        Endpoint.connect("b", "a", "127.0.0.1", port, secret=SECRET, tls=None, timeout=0.3, max_bytes=MAX)
    with Listener() as listener:
        with pytest.raises(PeerError, match=r"site 'a' waited 0.2 s for site 'b' to connect on 127.0.0.1:"):
            listener.accept("a", "b", secret=SECRET, tls=None, timeout=0.2, max_bytes=MAX)


def test_bad_arguments_raise_on_the_callers_thread():
    with _pair() as (a, b):
        with pytest.raises(ValueError, match="dtype 'complex64' has no wire code"):
            a.send(Kind.ACTIVATION, np.zeros(2, np.complex64), step=0)
        with pytest.raises(ValueError, match="unknown codec 'lz4'"):
            a.send(Kind.ACTIVATION, np.zeros(2, np.float32), step=0, codec="lz4")
        with pytest.raises(ValueError, match="codec 'int8': array of shape \\(2,\\) has 1 NaN/inf"):
            a.send(Kind.ACTIVATION, np.array([1, np.nan], np.float32), step=0, codec="int8")
        a.send(Kind.ACTIVATION, np.ones(1, np.float32), step=5)  # the link survived all of that
        assert b.recv(step=5)[1].tolist() == [1]
    with socket.socket() as sock, pytest.raises(ValueError, match="me must be a non-empty site name"):
        net.handshake(sock, "", "a", secret=SECRET, timeout=T, initiator=True)
    with socket.socket() as sock, pytest.raises(ValueError, match="me and peer must be different sites, got 'a'"):
        net.handshake(sock, "a", "a", secret=SECRET, timeout=T, initiator=True)


def test_malformed_hello_refused():
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "b", timeout=0.8)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            sock.sendall(wire.encode(Kind.HELLO, b'{"site": "b", "nonce": "abcd"}', key=None))
            with pytest.raises(PeerError, match=r"handshake with site 'b' failed: ValueError\('nonce of 2 bytes"):
                accepted()


def test_replayed_proof_refused():
    """A proof recorded from another session (other nonces) does not pass."""
    with Listener() as listener:
        accepted = _accept_in_thread(listener, "a", "b", timeout=0.8)
        with socket.create_connection(("127.0.0.1", listener.port)) as sock:
            hello = b'{"site": "b", "nonce": "' + b"00" * 32 + b'"}'
            sock.sendall(wire.encode(Kind.HELLO, hello, key=None))
            sock.sendall(wire.encode(Kind.HELLO, b"\1" * 32, key=None, step=1))  # a stale proof
            with pytest.raises(PeerError, match="site 'b' failed the challenge-response"):
                accepted()
