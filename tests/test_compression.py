"""Boundary compression in both transports: codecs per link and direction, exact byte counts, training still works.

The codecs' own round-trip bounds are in test_codecs.py; here: what the transports do with them.
"""

import dataclasses
import functools
import socket
import threading
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import hxtrain
from hxtrain.links import codecs
from hxtrain.config import topology as T
from hxtrain.links import wire
from hxtrain.network.handshake import PeerError
from hxtrain.network.transport import NetTransport
from helpers import endpoint_pair
from hxtrain.core.optim import OptimizerConfig
from hxtrain.engine.transport import InProcessTransport, link_codecs
from hxtrain.training.trainer import build_model

SECRET = b"compression-test-secret-0123456789"
SHAPE = (4, 16, 32)  # [mb, T, D] as TINY sends with microbatch 4


@functools.cache
def meshes():
    devs = jax.devices()
    return [Mesh(np.array(devs[0:2]).reshape(2, 1), ("data", "tensor")),
            Mesh(np.array(devs[2:4]).reshape(2, 1), ("data", "tensor"))]


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32) * 3


def _with_codecs(topo, activations="none", cotangents="none"):
    links = tuple(dataclasses.replace(ln, activations=activations, cotangents=cotangents) for ln in topo.links)
    return dataclasses.replace(topo, links=links)


# ---- in-process transport --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expect_bytes", [
    ("none", 4 * np.prod(SHAPE)),
    ("bf16", 2 * np.prod(SHAPE)),
    ("int8", np.prod(SHAPE) + 4 * SHAPE[0] * SHAPE[1]),
])
def test_in_process_send_goes_through_the_codec_and_counts_encoded_bytes(name, expect_bytes):
    x = _x()
    t = InProcessTransport(meshes(), codecs={(0, 1, "act"): name})
    t.send(jax.device_put(x, jax.sharding.NamedSharding(meshes()[0], jax.sharding.PartitionSpec("data"))),
           0, 1, ("act", 1, 0))
    got = t.recv(1, ("act", 1, 0))
    c = codecs.get_codec(name)
    np.testing.assert_array_equal(np.asarray(got), c.decode(c.encode(x), x.shape, x.dtype))
    assert got.sharding.mesh == meshes()[1]
    assert t.bytes_per_link() == {"0->1": expect_bytes}
    err = np.abs(np.asarray(got) - x)
    assert (err <= c.error_bound().max_error(x)).all()
    if name != "none":
        assert err.max() > 0  # the codec really ran


def test_in_process_codec_is_per_direction():
    x = _x(1)
    t = InProcessTransport(meshes(), codecs={(0, 1, "act"): "int8", (1, 0, "cot"): "none"})
    t.send(x, 1, 0, ("cot", 0, 0))  # cotangent direction: uncompressed
    np.testing.assert_array_equal(np.asarray(t.recv(0, ("cot", 0, 0))), x)
    t.send(x, 0, 1, ("act", 1, 0))
    assert not np.array_equal(np.asarray(t.recv(1, ("act", 1, 0))), x)
    assert t.stats[(1, 0, "cot")].bytes == 4 * x.size
    assert t.stats[(0, 1, "act")].bytes == x.size + 4 * SHAPE[0] * SHAPE[1]


def test_in_process_codec_errors():
    with pytest.raises(ValueError, match=r"codecs\[\(0, 1, 'act'\)\]: unknown codec 'zip'; choose one of"):
        InProcessTransport(meshes(), codecs={(0, 1, "act"): "zip"})
    with pytest.raises(ValueError, match=r"keys must be \(src site, dst site, 'act' \| 'cot'\), got \(0, 1\)"):
        InProcessTransport(meshes(), codecs={(0, 1): "bf16"})
    t = InProcessTransport(meshes(), codecs={(0, 1, "act"): "int8"})
    # A diverged activation stops the run loudly, where the receiving task reads it (the codec's host round trip
    # runs off the sender's path).
    t.send(np.full(SHAPE, np.nan, np.float32), 0, 1, ("act", 1, 0))
    with pytest.raises(ValueError, match="codec 'int8'.*NaN/inf"):
        t.recv(1, ("act", 1, 0))


# ---- codecs from the topology ----------------------------------------------------------------------------------


def test_link_codecs_follow_the_topology_per_direction():
    topo = _with_codecs(T.uniform(3), activations="bf16", cotangents="int8")
    got = {k: c.name for k, c in link_codecs(topo).items()}
    for i in (0, 1):  # per kind, the same codec both ways (interleaved sends activations back to the first site)
        for src, dst in ((i, i + 1), (i + 1, i)):
            assert (got.pop((src, dst, "act")), got.pop((src, dst, "cot"))) == ("bf16", "int8")
    assert got == {}


@pytest.mark.parametrize("kinds,expect", [
    (("H100", "H100"), ("fp8", 3)),  # both NVIDIA: e4m3fn
    (("MI300X", "MI300X"), ("fp8", 4)),  # both AMD: e4m3fnuz
    (("H100", "MI300X"), ("bf16", 1)),  # formats differ (0x80 is -0 in one, NaN in the other): bf16 instead
    (("Ascend910B", "H100"), ("bf16", 1)),  # no fp8 on Ascend
])
def test_fp8_only_where_both_sides_share_a_format(kinds, expect):
    topo = _with_codecs(T.uniform(2, backend="cuda"), activations="fp8", cotangents="fp8")
    topo = topo.replace_site("s0", device_kind=kinds[0]).replace_site("s1", device_kind=kinds[1])
    for c in link_codecs(topo).values():
        assert (c.name, c.id) == expect


# ---- network transport, two endpoints in this process ----------------------------------------------------------


def _pair(timeout=5.0):
    return endpoint_pair(timeout)


def test_net_transport_codecs_byte_counts_and_norm_exchange():
    ea, eb = _pair()
    cod = link_codecs(_with_codecs(T.uniform(2), activations="int8", cotangents="bf16"))
    ta = NetTransport(0, 2, meshes()[0], {1: ea}, cod, names=["a", "b"])
    tb = NetTransport(1, 2, meshes()[1], {0: eb}, cod, names=["a", "b"])
    try:
        x = _x(2)
        for t in (ta, tb):
            t.step = 3
        ta.send(x, 0, 1, ("act", 1, 5))
        got = tb.recv(1, ("act", 1, 5))
        int8 = codecs.get_codec("int8")
        np.testing.assert_array_equal(np.asarray(got), int8.decode(int8.encode(x), x.shape, x.dtype))
        assert got.sharding.mesh == meshes()[1]
        tb.send(got, 1, 0, ("cot", 0, 5))
        back = ta.recv(0, ("cot", 0, 5))
        assert np.abs(np.asarray(back) - np.asarray(got)).max() <= 2**-8 * np.abs(np.asarray(got)).max()
        n, rows = x.size, SHAPE[0] * SHAPE[1]
        assert ta.bytes_per_link() == {"a->b": wire.HEADER_SIZE + n + 4 * rows}
        assert ta.payload_bytes_per_link() == {"a->b": n + 4 * rows}
        assert tb.bytes_per_link() == {"b->a": wire.HEADER_SIZE + 2 * n}
        # global-norm clipping: both sites end up with every stage's squared norm, control bytes counted apart
        out = {}
        th = threading.Thread(target=lambda: out.setdefault("b", tb.exchange_norms({1: 2.5}, 2)))
        th.start()
        out["a"] = ta.exchange_norms({0: 1.5}, 2)
        th.join()
        np.testing.assert_array_equal(out["a"], [1.5, 2.5])
        np.testing.assert_array_equal(out["b"], [1.5, 2.5])
        assert ta.control_bytes == tb.control_bytes == wire.HEADER_SIZE + 8
        assert ta.total_bytes() == wire.HEADER_SIZE + n + 4 * rows  # control not in the data bytes
        # a frame of another step is never taken for this one
        ta.send(x, 0, 1, ("act", 1, 6))
        tb.step = 4
        with pytest.raises(PeerError, match=r"no frame from site 'a' within 0.5 s \(wanted kind=1, step=4"):
            eb.timeout = 0.5
            tb.recv(1, ("act", 1, 6))
    finally:
        ta.close()
        tb.close()


def test_net_transport_names_a_peer_that_went_away():
    ea, eb = _pair()
    tb = NetTransport(1, 2, meshes()[1], {0: eb}, names=["a", "b"])
    ea._sock.shutdown(socket.SHUT_RDWR)  # site a vanishes without a goodbye (as when its process dies)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="site 'a' closed the connection"):
        tb.recv(1, ("act", 1, 0))
    assert time.monotonic() - t0 < 2  # noticed at once, not after the 5 s timeout
    with pytest.raises(RuntimeError, match=r"site 'b' has no link to site 'a' \(sending"):
        NetTransport(1, 2, meshes()[1], {}, names=["a", "b"]).send(_x(), 1, 0, ("cot", 0, 0))
    tb.close()
    ea.close()


# ---- training with compression ---------------------------------------------------------------------------------


def _fit(topo, steps):
    opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=steps)
    tr = hxtrain.Trainer(build_model("tiny"), topo, schedule="1f1b", microbatches=2, batch_size=8, optimizer=opt)
    tr.pipeline.transport = InProcessTransport(tr.pipeline.meshes, codecs=link_codecs(topo))
    hist = tr.fit(steps, progress=False)
    return [h["loss"] for h in hist], hist[-1]["bytes_per_link"]


def test_compressed_runs_still_train_and_send_fewer_bytes():
    base = T.uniform(2)
    steps = 12
    ref_loss, ref_bytes = _fit(base, steps)
    mb, seq, width = 4, 16, 32
    fp32 = 2 * mb * seq * width * 4  # 2 microbatches per step, each way
    assert ref_bytes == {"0->1": fp32, "1->0": fp32}
    for acts, cots in (("bf16", "bf16"), ("int8", "int8")):
        loss, nbytes = _fit(_with_codecs(base, acts, cots), steps)
        assert loss[-1] < loss[0] - 0.3, f"{acts}: loss did not fall: {loss}"
        assert abs(loss[-1] - ref_loss[-1]) < 0.05 * ref_loss[-1], f"{acts}: {loss[-1]} vs fp32 {ref_loss[-1]}"
        for link in ("0->1", "1->0"):
            if acts == "bf16":
                assert nbytes[link] <= fp32 / 2
            else:
                assert nbytes[link] <= fp32 / 4 + 4 * 2 * mb * seq  # + one fp32 scale per row
    assert ref_loss[-1] < ref_loss[0] - 0.3
