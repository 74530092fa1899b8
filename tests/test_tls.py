"""Mutual TLS 1.3 links and a listener that strangers cannot stop, over loopback (no JAX).

Certificates are minted per test module by `hxtrain.network.certs` (a CA, one certificate per site). A relay between
the two ends records the stream and can duplicate or reorder TLS records, as a path the sites do not own could."""

import datetime as dt
import socket
import threading
import time

import numpy as np
import pytest

from hxtrain.links.wire import Kind
from hxtrain.network import tcp
from hxtrain.network.certs import certificate_names, mint_run_certs
from hxtrain.network.handshake import PeerError
from hxtrain.network.listener import Listener
from hxtrain.network.tcp import Endpoint
from hxtrain.network.tls import TlsConfig, TlsError
from hxtrain.sites import process as site_process

SECRET = b"tls-test-secret-0123456789abcdef"
T = 3.0
MAX = 1 << 24


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    root = tmp_path_factory.mktemp("certs")
    now = dt.datetime.now(dt.timezone.utc)
    return {"run": mint_run_certs(root / "run", ["a", "b", "c"]),
            "other": mint_run_certs(root / "other", ["a", "b"]),  # another CA
            "expired": mint_run_certs(root / "expired", ["b"], not_before=now - dt.timedelta(days=3),
                                      not_after=now - dt.timedelta(days=1))}


def _accept(listener, tls, *, me="a", peer="b", timeout=T):
    out = {}

    def run():
        try:
            out["ep"] = listener.accept(me, peer, secret=SECRET, tls=tls, timeout=timeout, max_bytes=MAX)
        except Exception as e:
            out["err"] = e

    th = threading.Thread(target=run)
    th.start()

    def result():
        th.join(timeout + 5)
        if "err" in out:
            raise out["err"]
        return out["ep"]

    return result


def _connect(port, tls, *, me="b", peer="a", timeout=T):
    return Endpoint.connect(me, peer, "127.0.0.1", port, secret=SECRET, tls=tls, timeout=timeout, max_bytes=MAX)


class Relay:
    """Forwards one TCP connection to `port`, recording both directions. `duplicate` / `swap`: repeat the next TLS
    record, or swap the next two, on the way from the connecting end to the listening one."""

    def __init__(self, port, records=True):
        self.records = records  # False: a plaintext stream, forwarded as it comes
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target, self.captured = port, bytearray()
        self.duplicate = self.swap = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        a, _ = self.server.accept()
        b = socket.create_connection(("127.0.0.1", self.target))
        threading.Thread(target=self._pump, args=(b, a, False), daemon=True).start()
        self._pump(a, b, True)

    def _pump(self, src, dst, upstream):
        buf, held = bytearray(), None
        try:
            while data := src.recv(1 << 16):
                self.captured += data
                if not (upstream and self.records):
                    dst.sendall(data)
                    continue
                buf += data
                while len(buf) >= 5 and len(buf) >= 5 + int.from_bytes(buf[3:5], "big"):
                    n = 5 + int.from_bytes(buf[3:5], "big")
                    record, buf = bytes(buf[:n]), buf[n:]
                    if self.duplicate:
                        self.duplicate = False
                        dst.sendall(record)
                    if self.swap and held is None:
                        held = record
                        continue
                    dst.sendall(record)
                    if held is not None:
                        dst.sendall(held)
                        held, self.swap = None, False
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _linked(certs, via_relay=False):
    listener = Listener()
    accepted = _accept(listener, certs["run"]["a"])
    relay = Relay(listener.port) if via_relay else None
    b = _connect(relay.port if relay else listener.port, certs["run"]["b"])
    a = accepted()
    listener.close()
    return a, b, relay


def test_a_tls_link_carries_frames_both_ways_and_its_stream_holds_none_of_the_tensor(certs):
    x = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    a, b, relay = _linked(certs, via_relay=True)
    try:
        assert a.encrypted and b.encrypted and a._sock.version == "TLSv1.3"
        b.send(Kind.ACTIVATION, x, step=1)
        h, y = a.recv(step=1)
        assert y.tobytes() == x.tobytes()
        a.send(Kind.COTANGENT, -x, step=1)
        assert (b.recv(step=1)[1] == -x).all()
        time.sleep(0.1)
        stream = bytes(relay.captured)
        assert len(stream) > 2 * x.nbytes
        for row in (0, 17, 63):  # no row of the tensor (1 KiB each) appears on the wire, either direction
            assert x[row].tobytes() not in stream and (-x[row]).tobytes() not in stream
    finally:
        a.close()
        b.close()


def test_the_relay_sees_the_tensor_on_a_plaintext_link():
    """The check above can fail: without TLS the same relay captures the tensor verbatim."""
    x = np.arange(4096, dtype=np.float32)
    with Listener() as listener:
        accepted = _accept(listener, None)
        relay = Relay(listener.port, records=False)
        b = _connect(relay.port, None)
        a = accepted()
    try:
        assert not a.encrypted
        b.send(Kind.ACTIVATION, x, step=0)
        a.recv(step=0)
        assert x.tobytes() in bytes(relay.captured)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("how", ["duplicate", "swap"])
def test_a_duplicated_or_reordered_record_ends_the_link_with_a_clear_error(certs, how):
    a, b, relay = _linked(certs, via_relay=True)
    try:
        setattr(relay, how, True)
        for step in range(3):
            b.send(Kind.ACTIVATION, np.full(8, step, np.float32), step=step)
        with pytest.raises(PeerError, match=r"TLS link from site 'b' failed: .*MAC.* \(a record was duplicated, "
                                            r"reordered or altered on the path\); connection closed") as e:
            for step in range(3):
                a.recv(step=step, timeout=T)
        assert e.value.reason == "tls"
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("case", ["other site name", "other CA", "expired"])
def test_tls_refuses_a_certificate_of_another_site_another_ca_or_expired(certs, case, tmp_path):
    """The listener drops the connection, names why, and goes on listening; the connecting end is told too. The
    connecting end trusts the run's CA, so the refusal is the listener's."""
    run, other, expired = certs["run"], certs["other"], certs["expired"]
    ca = run["a"].ca
    if case == "expired":  # the listener trusts the expired CA too, so the dates are what it refuses
        ca = tmp_path / "cas.pem"
        ca.write_text(open(run["a"].ca).read() + open(expired["b"].ca).read())
    listener_tls = TlsConfig(cert=run["a"].cert, key=run["a"].key, ca=str(ca))
    dialer = {"other site name": run["c"], "other CA": other["b"], "expired": expired["b"]}[case]
    dialer_tls = TlsConfig(cert=dialer.cert, key=dialer.key, ca=run["b"].ca)
    told = {"other site name": r"site 'a' refused the connection: site 'a' expected site 'b' at the other end, but "
                               r"its certificate names 'c'",
            "other CA": r"TLS link with site 'a' failed during the handshake: .*(UNKNOWN_CA|BAD_CERTIFICATE)",
            "expired": r"TLS link with site 'a' failed during the handshake: .*(CERTIFICATE_EXPIRED|BAD_CERTIFICATE)",
            }[case]
    why = {"other site name": "site 'a' expected site 'b' at the other end, but its certificate names 'c'",
           "other CA": r"site 'a' refused the certificate of the peer it expected as site 'b': unable to get local "
                       r"issuer certificate",
           "expired": r"site 'a' refused the certificate of the peer it expected as site 'b': certificate has "
                      r"expired"}[case]
    with Listener() as listener:
        accepted = _accept(listener, listener_tls, timeout=1.5)
        with pytest.raises(PeerError, match=told):
            _connect(listener.port, dialer_tls, timeout=1.5)
        with pytest.raises(PeerError, match=rf"site 'a' waited 1.5 s for site 'b'.* 1 connection\(s\) failed to "
                                            rf"authenticate, the last 127.0.0.1:\d+: {why}"):
            accepted()


def test_the_connecting_end_checks_the_listeners_name_too(certs):
    with Listener() as listener:
        accepted = _accept(listener, certs["run"]["c"], timeout=1.5)  # c answers where b dials a
        with pytest.raises(PeerError, match="site 'b' expected site 'a' at the other end, but its certificate "
                                            "names 'c'"):
            _connect(listener.port, certs["run"]["b"])
        with pytest.raises(PeerError):
            accepted()


def test_stray_connections_do_not_keep_the_real_peer_out(certs):
    """Garbage, a plaintext hxtrain peer, a silent socket and a 200-connection burst before and during the wait;
    at most 8 handshakes run at once, the rest are closed at once, and the real peer still links within its
    timeout."""
    strays = []
    with Listener(handshake_timeout=0.5) as listener:
        accepted = _accept(listener, certs["run"]["a"], timeout=10)
        for payload in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x00" * 5000, None):
            s = socket.create_connection(("127.0.0.1", listener.port))
            if payload:
                s.sendall(payload)
            strays.append(s)
        try:
            _connect(listener.port, None, timeout=1.0)  # a plaintext peer at a TLS listener
        except PeerError:
            pass
        strays += [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(200)]
        t0 = time.monotonic()
        b = _connect(listener.port, certs["run"]["b"], timeout=8)
        a = accepted()
        took = time.monotonic() - t0
        dropped = listener.dropped
    try:
        b.send(Kind.CONTROL, np.arange(3, dtype=np.int32), step=0)
        assert a.recv(kind=Kind.CONTROL)[1].tolist() == [0, 1, 2]
        assert dropped >= 190, dropped  # the burst was closed, not queued behind the handshakes
        assert took < 8
    finally:
        a.close()
        b.close()
        for s in strays:
            s.close()


def test_plaintext_is_refused_off_loopback():
    class Sock:
        def getsockname(self):
            return ("10.1.2.3", 5000)

        def getpeername(self):
            return ("127.0.0.1", 5001)

    with pytest.raises(ValueError, match=r"plaintext link from site 'a' to site 'b' refused: 10.1.2.3 is not a "
                                         r"loopback address; plaintext \(--insecure-plaintext\) is for loopback only"):
        tcp._check_plaintext(Sock(), "a", "b")


def test_site_tls_flags_are_checked_before_anything_starts(certs, tmp_path):
    cfg = site_process.SiteConfig(mesh="x.toml", site="a")
    with pytest.raises(site_process.SiteError, match=r"^--tls-cert: every link between sites is mutual TLS; give "
                                                     r"this site's certificate, its key and the run's CA"):
        site_process.site_tls(cfg)
    a = certs["run"]["a"]
    both = cfg.__class__(**{**cfg.__dict__, "insecure_plaintext": True, "tls_cert": a.cert})
    with pytest.raises(site_process.SiteError, match="^--insecure-plaintext: links are either TLS or plaintext, got "
                                                     "it with --tls-cert"):
        site_process.site_tls(both)
    missing = cfg.__class__(**{**cfg.__dict__, "tls_cert": str(tmp_path / "no.pem"), "tls_key": a.key,
                               "tls_ca": a.ca})
    with pytest.raises(site_process.SiteError, match=r"^--tls-cert: expected a PEM file, got '.*no.pem', which does "
                                                     "not exist$"):
        site_process.site_tls(missing)
    b = certs["run"]["b"]
    wrong = cfg.__class__(**{**cfg.__dict__, "tls_cert": b.cert, "tls_key": b.key, "tls_ca": b.ca})
    with pytest.raises(site_process.SiteError, match=r"^--tls-cert: the certificate '.*b.pem' names 'b', not this "
                                                     "site 'a'; its peers would refuse it$"):
        site_process.site_tls(wrong)
    mismatched = TlsConfig(cert=a.cert, key=b.key, ca=a.ca)
    with pytest.raises(TlsError, match="^--tls-cert/--tls-key: .* do not load as a certificate and its private key"):
        mismatched.check()
    good = cfg.__class__(**{**cfg.__dict__, "tls_cert": a.cert, "tls_key": a.key, "tls_ca": a.ca})
    assert site_process.site_tls(good) == a
    assert certificate_names(a.cert) == ("a",)


@pytest.mark.parametrize("with_tls", [True, False])
def test_one_listener_takes_several_named_sites_in_any_order(certs, with_tls):
    """A site with more than one peer to accept (a DiLoCo replica group's site: its pipeline neighbour and its
    counterpart) names them all and takes them in whatever order they authenticate, even at once; a site not
    named is still refused, and one that never comes is named in the error."""
    run = certs["run"]
    tls = (lambda s: run[s]) if with_tls else (lambda s: None)
    with Listener() as listener:
        out = {}
        th = threading.Thread(target=lambda: out.update(listener.accept_all(
            "a", ("b", "c"), secret=SECRET, tls=tls("a"), timeout=T, max_bytes=MAX)))
        th.start()
        dialers = {}
        both = [threading.Thread(target=lambda s=s: dialers.update({s: _connect(listener.port, tls(s), me=s)}))
                for s in ("c", "b")]
        for t in both:
            t.start()
        for t in both + [th]:
            t.join(2 * T)
        assert sorted(out) == ["b", "c"] and sorted(dialers) == ["b", "c"]
        for s in ("b", "c"):
            assert out[s].peer == s
            dialers[s].send(Kind.ACTIVATION, np.arange(3.0), step=1)
            assert out[s].recv(kind=Kind.ACTIVATION, step=1)[1].tolist() == [0, 1, 2]
            dialers[s].close()
            out[s].close()
        accepted = _accept(listener, tls("a"), peer="b", timeout=1.0)
        with pytest.raises(PeerError, match="refused the connection"):
            _connect(listener.port, tls("c"), me="c")
        with pytest.raises(PeerError, match=r"waited 1.0 s for site 'b'"):
            accepted()
