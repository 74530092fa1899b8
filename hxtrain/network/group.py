"""A site spanning several processes (hosts): `jax.distributed` inside the site, one TCP leader outside it.

The processes of a site form one JAX cluster (`init_site_cluster`); the site's Mesh(('data',
'tensor')) covers every process's devices, and every process runs the same stage programs in the same order.
Only process 0, the *leader*, has TCP links to the neighbouring sites. `GroupTransport` gives the site loop the
`NetTransport` surface on every process:

    send     every process takes part in gathering the global [mb, T, D] array to the host
             (`process_allgather`, which waits for the array: a multi-process site does not overlap the
             gather with its next program); the leader ships the host copy with its NetTransport.
    recv     the leader receives the host array; it is broadcast to the other processes (`broadcast_one_to_all`,
             they pass zeros of the expected shape and dtype, known from the key); every process then builds the
             global array, sharded P('data'), with `jax.make_array_from_callback`.
    exchange_norms / barrier: the leader does them over TCP; the result (or a token) is broadcast.
    same-site transfers (interleaved schedules) stay on the site's devices, never leaving the cluster.

Byte counters (`bytes_per_link`, ...) count what *this process* sent over TCP: the leader's frames; zero on the
other processes.

Failure: a collective whose peer process died raises at once on CPU (gloo: "Connection closed by peer");
`GroupError` names the site, the process and what it was doing. A process that stops without closing its sockets
(a stalled host) is declared dead by the coordination service after `heartbeat_timeout` seconds, which then
aborts every process of the cluster.

Shapes: mb microbatch size, T sequence length, D model width; activations / cotangents [mb, T, D] in the compute
dtype of the stage that produced them (`LocalSite.arrival`).
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from hxtrain.core.placement import DATA


class GroupError(RuntimeError):
    """A collective between the processes of one site failed (a process of the site died or left)."""


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A host array, the same on every process, as one global array laid out by `sharding` (which may span
    processes): each process fills only its own devices' shards. Call on every process of the site."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def put_tree(tree, shardings):
    """`put_global` leaf by leaf: host or device values (the same on every process) onto `shardings`."""
    return jax.tree.map(lambda a, s: put_global(np.asarray(a), s), tree, shardings)


def put_stage(x: np.ndarray, stage, spec=P(DATA)) -> jax.Array:
    """`executor.run_step`'s `put`: a host array onto the stage's (multi-process) site, laid out by `spec`."""
    return put_global(x, NamedSharding(stage.role.mesh, spec))


def leader_mesh(mesh: Mesh) -> Mesh:
    """A 1 x 1 ('data', 'tensor') mesh on the first device of `mesh` this process holds: where the leader's
    NetTransport lands a received frame before it is broadcast to the site."""
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return Mesh(np.array(local[:1]).reshape(1, 1), mesh.axis_names)


def check_mesh(mesh: Mesh, site) -> None:
    """ValueError unless `mesh` holds `devices_per_process` devices of each of the site's processes, process 0
    first (what `jax.devices()` lists under jax.distributed), so that process k holds a contiguous block."""
    procs = [d.process_index for d in mesh.devices.flat]
    want = [p for p in range(site.processes) for _ in range(site.devices_per_process)]
    if procs != want:
        raise ValueError(f"site {site.name!r}: expected the mesh's devices to belong to processes {want} (in "
                         f"order, {site.devices_per_process} per process), got processes {procs}; is every "
                         f"process started with {site.devices_per_process} devices of backend {site.backend!r}?")


class GroupTransport:
    """The `NetTransport` surface for one process of a multi-process site.

    inner: the leader's NetTransport (its mesh a `leader_mesh`), None on the other processes. mesh: the site's
    global mesh. shape_of(key) -> (shape, dtype) of what arrives under `key`, e.g. ((mb, T, D), float32).
    """

    def __init__(self, inner, site: int, name: str, mesh: Mesh, shape_of: Callable[[tuple], tuple]):
        self.inner, self.site, self.name, self.mesh, self.shape_of = inner, site, name, mesh, shape_of
        self.process = jax.process_index()
        if (inner is None) != (self.process != 0):
            raise ValueError(f"site {name!r} process {self.process}: the leader (process 0) needs the TCP "
                             f"transport and only it; got inner={type(inner).__name__}")
        self._step = 0
        self._box: dict[tuple, jax.Array] = {}  # same-site transfers (interleaved), global arrays

    @property
    def leader(self) -> bool:
        return self.inner is not None

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        self._step = value
        if self.inner is not None:
            self.inner.step = value

    def _collective(self, what: str, fn, *args):
        try:
            return fn(*args)
        except (RuntimeError, ValueError) as e:  # gloo failures surface as either, depending on the call
            raise GroupError(f"site {self.name!r} process {self.process}: {what} across the site's processes "
                             f"failed: {str(e).splitlines()[0]}") from e

    def _broadcast(self, what: str, x: np.ndarray) -> np.ndarray:
        return self._collective(what, multihost_utils.broadcast_one_to_all, x)

    def send(self, x: jax.Array, src: int, dst: int, key: tuple) -> None:
        """Ship the global array `x` [mb, ...] to site `dst` under `key`. Every process of the site calls it."""
        if src != self.site:
            raise ValueError(f"send: this process is site {self.site}, asked to send from site {src}")
        if dst == src:
            self._box[key] = x
            return
        host = self._collective(f"gathering {key} to send", multihost_utils.process_allgather, x, True)
        if self.inner is not None:
            self.inner.send(host, src, dst, key)

    def recv(self, dst: int, key: tuple) -> jax.Array:
        """What was sent to this site under `key`, as a global array sharded P('data') on the site's mesh.
        Every process of the site calls it; only the leader reads the socket (PeerError there, as NetTransport)."""
        if key in self._box:
            return self._box.pop(key)
        shape, dtype = self.shape_of(key)
        if self.inner is not None:
            host = np.asarray(self.inner.recv(dst, key))
            if host.shape != tuple(shape):
                raise ValueError(f"site {self.name!r}: received {key} with shape {host.shape}, expected "
                                 f"{tuple(shape)}")
            host = host.astype(dtype, copy=False)
        else:
            host = np.zeros(shape, dtype)
        host = self._broadcast(f"broadcasting {key}", host)
        return put_global(host, NamedSharding(self.mesh, P(DATA)))

    def exchange_norms(self, local: dict[int, float], n_stages: int) -> np.ndarray:
        """Every stage's squared gradient norm, float32 [n_stages], on every process (see NetTransport)."""
        vec = self.inner.exchange_norms(local, n_stages) if self.inner is not None else None
        vec = np.zeros(n_stages, np.float32) if vec is None else np.asarray(vec, np.float32)
        return self._broadcast("broadcasting the gradient norms", vec)

    def barrier(self, timeout: float) -> None:
        """The leader waits for every site (NetTransport.barrier); the other processes wait for the leader."""
        if self.inner is not None:
            self.inner.barrier(timeout)
        self._broadcast("waiting for the site's leader at the barrier", np.zeros(1, np.int32))

    def warm_up(self, key: tuple) -> None:
        """Compile the gather and broadcast programs for arrays shaped like `key`'s (before the first step, so
        that the link timeout only has to cover compute). Every process calls it."""
        shape, dtype = self.shape_of(key)
        x = put_global(np.zeros(shape, dtype), NamedSharding(self.mesh, P(DATA)))
        self._collective("warming up the gather", multihost_utils.process_allgather, x, True)
        self._broadcast("warming up the broadcast", np.zeros(shape, dtype))

    def flush(self) -> None:
        """Wait until the leader's sends are on their links (NetTransport.flush, where it has one)."""
        if self.inner is not None and hasattr(self.inner, "flush"):
            self.inner.flush()

    def clear(self) -> None:
        self._box.clear()
        if self.inner is not None:
            self.inner.clear()

    def pending(self) -> list:
        return sorted(self._box, key=repr)

    def reset_stats(self) -> None:
        if self.inner is not None:
            self.inner.reset_stats()

    def bytes_per_link(self) -> dict[str, int]:
        return self.inner.bytes_per_link() if self.inner is not None else {}

    def payload_bytes_per_link(self) -> dict[str, int]:
        return self.inner.payload_bytes_per_link() if self.inner is not None else {}

    @property
    def control_bytes(self) -> int:
        return self.inner.control_bytes if self.inner is not None else 0

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


__all__ = ["GroupError", "GroupTransport", "check_mesh", "leader_mesh", "put_global", "put_stage", "put_tree"]


def init_site_cluster(coordinator: str, num_processes: int, process_id: int, *, timeout: float = 60.0,
                      heartbeat_timeout: float = 100.0, shutdown_timeout: float = 300.0) -> None:
    """Join this process to its site's `jax.distributed` cluster (a site spanning several hosts); call before JAX
    initialises. Afterwards `jax.devices()` lists every process's devices and collectives span them. On CPU the
    cross-process collectives need the gloo implementation, selected here where this JAX has the option.

    timeout: seconds to wait for every process to join. heartbeat_timeout: a process silent this long is declared
    dead and the coordination service aborts every process. shutdown_timeout: the most a clean exit waits for the
    others at JAX's shutdown barrier."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, KeyError, ValueError):  # newer JAX: gloo is the default or the option is gone
        pass
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id,
                               initialization_timeout=int(timeout), heartbeat_timeout_seconds=int(heartbeat_timeout),
                               shutdown_timeout_seconds=int(shutdown_timeout))
