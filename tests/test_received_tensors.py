"""A site checks every tensor it receives: a NetTransport refuses an activation or cotangent of another shape or
dtype than its site expects under that key (PeerError naming the peer, the key, what was expected and what
arrived) and aborts the link; `LocalSite.expected` is what a site expects. Loopback endpoints in this process."""

import contextlib
import dataclasses
import functools
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh

from hxtrain.config import topology as T
from hxtrain.links.wire import Kind
from hxtrain.network.handshake import PeerError
from hxtrain.network.transport import NetTransport
from hxtrain.sites.program import LocalSite
from helpers import endpoint_pair

SECRET = b"received-tensors-secret-0123456789"
TIMEOUT = 2.0
SHAPE = (4, 8, 16)  # [microbatch, seq, width]


@functools.cache
def _mesh():
    return Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "tensor"))


def _endpoint_pair():
    return endpoint_pair(TIMEOUT)


@contextlib.contextmanager
def _site_b(expect):
    """(endpoint of peer site 'a', site 'b''s NetTransport expecting `expect`); site 'a' sends raw frames."""
    ea, eb = _endpoint_pair()
    tb = NetTransport(1, 2, _mesh(), {0: eb}, names=["a", "b"], overlap=False, expect=expect)
    try:
        yield ea, tb
    finally:
        ea.close()
        with contextlib.suppress(PeerError):
            tb.close()


def _fp32_site(key):
    return SHAPE, (np.float32,)


@pytest.mark.parametrize("sent,got", [
    (np.zeros((2, 8, 16), np.float32), "shape (2, 8, 16) float32"),  # another microbatch size
    (np.zeros(SHAPE, ml_dtypes.bfloat16), "shape (4, 8, 16) bfloat16"),  # bf16 into an fp32 site
])
def test_a_tensor_of_another_shape_or_dtype_is_refused_naming_peer_key_and_both(sent, got):
    with _site_b(_fp32_site) as (ea, tb):
        tb.step = 3
        ea.send(Kind.ACTIVATION, sent, step=3, microbatch=2, stage=1)
        with pytest.raises(PeerError) as e:
            tb.recv(1, ("act", 1, 2))
        assert str(e.value) == ("site 'b' received ('act', 1, 2) (step 3) from site 'a': expected shape (4, 8, 16) "
                                f"float32, got {got}")
        with pytest.raises(PeerError):  # the link is aborted: nothing more is taken from it
            tb.recv(1, ("act", 1, 3))


def test_what_a_site_expects_is_asked_at_every_arrival():
    """A DiLoCo replica of a group whose rows are dealt again (`ReplicaSteps._deal` -> `LocalSite.read_rows`)
    expects microbatches of the new size from the next step on: the transport asks its site at every arrival, so
    the new shape is taken and the old one refused (a CI run failed when the first answer was kept per key)."""
    rows = {"mb": 4}
    with _site_b(lambda key: ((rows["mb"], 8, 16), (np.float32,))) as (ea, tb):
        ea.send(Kind.ACTIVATION, np.zeros(SHAPE, np.float32), step=0, microbatch=0, stage=1)
        assert tb.recv(1, ("act", 1, 0)).shape == SHAPE
        rows["mb"] = 6  # dealt again
        tb.step = 1
        ea.send(Kind.ACTIVATION, np.ones((6, 8, 16), np.float32), step=1, microbatch=0, stage=1)
        assert tb.recv(1, ("act", 1, 0)).shape == (6, 8, 16)
        ea.send(Kind.ACTIVATION, np.ones(SHAPE, np.float32), step=1, microbatch=1, stage=1)
        with pytest.raises(PeerError, match=r"expected shape \(6, 8, 16\) float32, got shape \(4, 8, 16\) float32"):
            tb.recv(1, ("act", 1, 1))


def test_a_tensor_as_expected_is_placed_also_through_a_lossy_codec():
    x = np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)
    with _site_b(_fp32_site) as (ea, tb):
        ea.send(Kind.COTANGENT, x, step=0, microbatch=0, stage=0)
        ea.send(Kind.ACTIVATION, x, step=0, microbatch=1, stage=1, codec="bf16")  # decodes to the dtype sent
        dy = tb.recv(1, ("cot", 0, 0))
        act = tb.recv(1, ("act", 1, 1))
    np.testing.assert_array_equal(np.asarray(dy), x)
    assert act.shape == SHAPE and act.dtype == np.float32


def _site(sites, index):
    topo = T.Topology("t", tuple(sites), (T.Link(("a", "b"), 100.0, 1.0),), T.RunDefaults(), "<test>", "")
    return LocalSite(topology=topo, index=index, site=topo.sites[index], mesh=_mesh(), stages={}, n_stages=2,
                     order=(), microbatches=2, batch_size=8, seq=8, width=16, optimizer_config=None, batches=None)


CPU = T.Site("a", "cpu", 1, 1, 1)
B = T.Site("b", "cpu", 1, 1, 1)


@pytest.mark.parametrize("a,act_dtypes", [
    (CPU, ("float32",)),  # a CPU site computes in float32: a bf16 activation from it is refused
    (dataclasses.replace(CPU, compute_dtype="bfloat16"), ("bfloat16",)),
    (dataclasses.replace(CPU, backend="cuda", device_kind="H100"), ("bfloat16",)),
    # only site a sees its devices: its dtype is not pinned, any compute dtype may come, of the exact shape
    (dataclasses.replace(CPU, backend="cuda"), ("float32", "bfloat16", "float16")),
])
def test_a_site_expects_the_dtype_the_topology_pins_for_the_sender(a, act_dtypes):
    b = _site([a, B], 1)
    assert b.expected(("act", 1, 0)) == ((4, 8, 16), tuple(map(np.dtype, act_dtypes)))
    assert b.expected(("cot", 1, 5)) == ((4, 8, 16), (np.dtype("float32"),))  # in b's own dtype
