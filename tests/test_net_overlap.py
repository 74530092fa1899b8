"""NetTransport with overlapped sends: `send` returns before the tensor is computed, frames keep their order and
step, failures of the sender thread surface naming the peer, and byte counts equal the synchronous mode's.
Two transports over loopback endpoints in this process; timeouts <= 2 s."""

import contextlib
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain.links import codecs
from hxtrain.links import wire
from hxtrain.network.handshake import PeerError
from hxtrain.network.transport import NetTransport
from helpers import endpoint_pair
from hxtrain.engine.transport import InProcessTransport
from hxtrain.links.wire import Kind

SECRET = b"overlap-test-secret-0123456789abcdef"
TIMEOUT = 2.0


@functools.cache
def _meshes():
    devs = jax.devices()
    return [Mesh(np.array(devs[i:i + 1]).reshape(1, 1), ("data", "tensor")) for i in (0, 1)]


@contextlib.contextmanager
def _linked(overlap=True, codecs_=None):
    """(transport a = site 0, transport b = site 1, endpoint a->b, endpoint b->a) over loopback."""
    ea, eb = endpoint_pair(TIMEOUT, max_bytes=1 << 22)
    ta = NetTransport(0, 2, _meshes()[0], {1: ea}, codecs_, names=["a", "b"], overlap=overlap)
    tb = NetTransport(1, 2, _meshes()[1], {0: eb}, codecs_, names=["a", "b"], overlap=overlap)
    try:
        yield ta, tb, ea, eb
    finally:
        for t in (ta, tb):
            with contextlib.suppress(PeerError):
                t.close()


@jax.jit
def _slow(x, w):  # [n, n] -> [n, n]: ~0.1-0.5 s of CPU matmuls, dispatched asynchronously
    return jax.lax.fori_loop(0, 80, lambda i, h: jnp.tanh(h @ w), x)


def _slow_inputs(n=512):
    x = jax.device_put(np.random.default_rng(0).normal(size=(n, n)).astype(np.float32) * 0.01, jax.devices()[0])
    w = jax.device_put(np.eye(n, dtype=np.float32), jax.devices()[0])
    _slow(x, w).block_until_ready()  # compiled before the timed part
    return x, w


@pytest.mark.parametrize("overlap", [True, False])
def test_send_returns_before_the_tensor_is_ready_and_frames_keep_order_and_step(overlap):
    x, w = _slow_inputs()
    with _linked(overlap) as (ta, tb, ea, eb):
        ta.step = 7
        y = _slow(x, w)
        ta.send(y, 0, 1, ("act", 1, 0))
        # the synchronous mode staged y on the host before returning; overlap returns while y is still computing
        assert y.is_ready() is (not overlap)
        ta.step = 8  # the frame already sent carries the step of its send() call
        fast = [np.full((3, 5), mb, np.float32) for mb in range(1, 6)]
        for mb, f in enumerate(fast, 1):
            ta.send(f, 0, 1, ("act", 1, mb))
        ta.flush()
        # raw frames in arrival order (distinct keys: the inbox keeps arrival order): the slow one first
        got = [eb.recv(kind=Kind.ACTIVATION) for _ in range(6)]
        assert [(h.microbatch, h.step) for h, _ in got] == [(0, 7)] + [(mb, 8) for mb in range(1, 6)]
        assert got[0][1].tobytes() == np.asarray(y).tobytes()
        for (_, arr), f in zip(got[1:], fast):
            assert arr.tobytes() == f.tobytes()
        # through the transport: placed on b's mesh, exactly the bytes sent
        ta.send(y, 0, 1, ("act", 1, 9))
        tb.step = 8
        z = tb.recv(1, ("act", 1, 9))
        assert z.sharding == NamedSharding(_meshes()[1], P("data"))
        assert np.asarray(z).tobytes() == np.asarray(y).tobytes()


def test_closed_peer_raises_on_next_send_and_flush_naming_it():
    with _linked() as (ta, tb, ea, eb):
        ta.send(np.ones(4, np.float32), 0, 1, ("act", 1, 0))
        tb.close()  # site b goes away (it says goodbye)
        t0 = time.monotonic()
        with pytest.raises(PeerError, match="site 'b' closed the connection"):
            for mb in range(1, 20):  # the first send after b's BYE may still be queued; a later call raises
                ta.send(np.ones(4, np.float32), 0, 1, ("act", 1, mb))
                time.sleep(0.02)
        with pytest.raises(PeerError, match="site 'b' closed the connection"):
            ta.flush()  # the failure stays raised
        with pytest.raises(PeerError, match="site 'b' closed the connection"):
            ta.exchange_norms({0: 1.0}, 2)
        assert time.monotonic() - t0 < TIMEOUT


def test_encoding_failure_in_sender_thread_surfaces_and_wakes_both_sides():
    with _linked() as (ta, tb, ea, eb):
        ta.send(np.ones(3, np.complex64), 0, 1, ("act", 1, 0))  # no wire dtype for complex: fails on the thread
        t0 = time.monotonic()
        msg = r"sending \('act', 1, 0\) from site 'a' to site 'b' failed: ValueError\(.*complex64"
        with pytest.raises(PeerError, match=msg):
            ta.recv(0, ("cot", 0, 0))  # a recv waiting on that link wakes up with the cause, not a timeout
        with pytest.raises(PeerError, match="site 'a' closed the connection"):  # the peer is not left waiting
            tb.recv(1, ("act", 1, 0))
        assert time.monotonic() - t0 < TIMEOUT
        with pytest.raises(PeerError, match=msg):
            ta.send(np.ones(3, np.float32), 0, 1, ("act", 1, 1))


def test_close_raises_a_send_failure_never_reported():
    with _linked() as (ta, tb, ea, eb):
        ta.send(np.ones(3, np.complex64), 0, 1, ("act", 1, 0))
        with pytest.raises(PeerError, match=r"from site 'a' to site 'b' failed: ValueError"):
            ta.close()
        ta.close()  # idempotent once reported


def test_byte_counts_after_flush_equal_the_synchronous_mode():
    cod = {(0, 1, "act"): codecs.get_codec("int8"), (1, 0, "cot"): codecs.get_codec("bf16")}
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(2, 8, 16)).astype(np.float32) for _ in range(4)]
    counts = {}
    for overlap in (True, False):
        with _linked(overlap, cod) as (ta, tb, ea, eb):
            for mb, x in enumerate(xs):
                ta.send(jax.device_put(x, jax.devices()[0]), 0, 1, ("act", 1, mb))
                tb.send(x, 1, 0, ("cot", 0, mb))
            counts[overlap] = [(t.bytes_per_link(), t.payload_bytes_per_link(), t.total_bytes(),
                                {k: s.transfers for k, s in t.stats.items()}) for t in (ta, tb)]
            ta.reset_stats()
            assert ta.bytes_per_link() == {} and ta.total_bytes() == 0
    assert counts[True] == counts[False]
    n = xs[0].size
    assert counts[True][0][0] == {"a->b": 4 * (wire.HEADER_SIZE + n + 4 * 2 * 8)}  # int8: a scale per row
    assert counts[True][1][1] == {"b->a": 4 * 2 * n}  # bf16
    # the in-process transport counts the same payload bytes with the same per-link function
    ip = InProcessTransport(_meshes(), codecs=cod)
    for mb, x in enumerate(xs):
        ip.send(jax.device_put(x, jax.devices()[0]), 0, 1, ("act", 1, mb))
    assert ip.bytes_per_link() == {"0->1": counts[True][0][1]["a->b"]} and ip.total_bytes() == 4 * (n + 64)


def test_norm_partial_sums_travel_the_way_the_backward_runs():
    """The last site sends its squared norms before it receives anything (its backward ends first), so the first
    site, whose backward ends the step, has the total as soon as it adds its own: it sends only the total, up."""
    import threading

    with _linked() as (ta, tb, ea, eb):
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("b", tb.exchange_norms({1: 2.5}, 2)))
        th.start()
        # b's partial vector arrives at a with nothing sent by a yet
        _, partial = ea.recv(kind=Kind.CONTROL, step=0, microbatch=0, timeout=TIMEOUT)
        np.testing.assert_array_equal(partial, [0.0, 2.5])
        assert th.is_alive()  # b now waits for the total
        ea.send(Kind.CONTROL, np.array([1.5, 2.5], np.float32), step=0, microbatch=1)
        th.join(TIMEOUT)
        np.testing.assert_array_equal(out["b"], [1.5, 2.5])
        # and the first site completes the exchange from the partial alone, sending the total back up
        th = threading.Thread(target=lambda: out.update(b2=tb.exchange_norms({1: 4.0}, 2)))
        th.start()
        np.testing.assert_array_equal(ta.exchange_norms({0: 3.0}, 2), [3.0, 4.0])
        th.join(TIMEOUT)
        np.testing.assert_array_equal(out["b2"], [3.0, 4.0])
