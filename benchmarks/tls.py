"""What encryption costs on a link: one large activation sent over loopback between two Endpoints in this process,
mutual TLS 1.3 (the default; frames untagged, TLS authenticates every record) against the plaintext opt-out
(frames HMAC-SHA256-tagged), rounds alternating in one run. Also prints what HMAC-SHA256 alone costs on this
machine, the reason frames over TLS carry no HMAC of their own.

    python benchmarks/tls.py                      # [8, 1024, 2048] fp32 = 64 MiB, 9 rounds of 4 frames
    python benchmarks/tls.py --shape 4,512,1024 --rounds 5
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import statistics
import tempfile
import threading
import time

import numpy as np

from hxtrain.links.wire import Kind
from hxtrain.network.certs import mint_run_certs
from hxtrain.network.listener import Listener
from hxtrain.network.tcp import Endpoint

SECRET = b"benchmark-secret-0123456789abcdef"


def _pair(tls_a, tls_b):
    with Listener() as listener:
        box = {}
        th = threading.Thread(target=lambda: box.setdefault("a", listener.accept(
            "a", "b", secret=SECRET, tls=tls_a, timeout=30, max_bytes=1 << 31)))
        th.start()
        b = Endpoint.connect("b", "a", "127.0.0.1", listener.port, secret=SECRET, tls=tls_b, timeout=30,
                             max_bytes=1 << 31)
        th.join()
    return box["a"], b


def _round(a, b, x, frames: int, step0: int) -> float:
    t0 = time.perf_counter()
    for i in range(frames):
        a.send(Kind.ACTIVATION, x, step=step0 + i)
    for i in range(frames):
        b.recv(step=step0 + i)
    return frames * x.nbytes / (time.perf_counter() - t0)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8,1024,2048", help="activation shape, fp32 (default 8,1024,2048 = 64 MiB)")
    p.add_argument("--frames", type=int, default=4, help="frames per round (default 4)")
    p.add_argument("--rounds", type=int, default=9, help="rounds per mode, alternating (default 9)")
    args = p.parse_args(argv)
    x = np.random.default_rng(0).standard_normal(tuple(int(d) for d in args.shape.split(","))).astype(np.float32)
    certs = mint_run_certs(tempfile.mkdtemp(prefix="hxtrain-bench-certs-"), ["a", "b"])
    links = {"tls": _pair(certs["a"], certs["b"]), "plaintext+hmac": _pair(None, None)}
    speed = {m: [] for m in links}
    step = 0
    for _ in range(args.rounds):
        for mode, (a, b) in links.items():
            speed[mode].append(_round(a, b, x, args.frames, step))
            step += args.frames
    for a, b in links.values():
        a.close()
        b.close()
    t0 = time.perf_counter()
    hmac.new(SECRET, x.tobytes(), hashlib.sha256).digest()
    mac_speed = x.nbytes / (time.perf_counter() - t0)
    print(f"activation {x.shape} fp32 = {x.nbytes / 2**20:.0f} MiB, {args.frames} frames x {args.rounds} rounds, "
          "loopback, one direction")
    print(f"{'link':16} {'median MB/s':>12} {'min':>8} {'max':>8}")
    for mode, v in speed.items():
        print(f"{mode:16} {statistics.median(v) / 1e6:12.0f} {min(v) / 1e6:8.0f} {max(v) / 1e6:8.0f}")
    ratios = [t / p for t, p in zip(speed["tls"], speed["plaintext+hmac"])]
    print(f"tls / plaintext+hmac throughput, per round: {', '.join(f'{r:.2f}' for r in ratios)}; "
          f"median {statistics.median(ratios):.2f}")
    print(f"HMAC-SHA256 alone on this machine: {mac_speed / 1e6:.0f} MB/s (one core)")


if __name__ == "__main__":
    main()
