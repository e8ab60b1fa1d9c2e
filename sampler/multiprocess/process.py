"""Where this process stands in a multi-process engine: joining the multi-controller JAX
program (``initialize``) and the engine layout a ``SamplerConfig`` asks for (``topology``)."""

from __future__ import annotations

import atexit
import dataclasses
import os

import jax

from sampler.compat import multinode
from sampler.config import SamplerConfig
from sampler.multiprocess import launch

#: Heartbeat timeout of the coordination service set by ``initialize`` (s).
HEARTBEAT_TIMEOUT_S = 10
#: How often a waiting process looks at the others' heartbeats (s).
PEER_POLL_S = 0.5
#: Offset of the engine's port from JAX's coordinator port, when neither
#: ``SamplerConfig.dist_init_addr`` nor ``$SAMPLER_DIST_INIT_ADDR`` gives one (sglang-jax
#: then binds that port + 5 and + 6).
ENGINE_PORT_OFFSET = 10


def initialize(*, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> None:
    """Join the multi-controller program ``python -m sampler.multiprocess.launch`` started (reads
    ``$SAMPLER_COORDINATOR``, ``$SAMPLER_NUM_PROCESSES``, ``$SAMPLER_PROCESS_ID``); call it
    before anything else uses JAX. On CPU, collectives go through gloo. A process that dies
    does not end the others (``jax_enable_recoverability``): they raise ``PeerFailureError``
    naming it. Calling ``jax.distributed.initialize`` yourself, set that option too, or JAX
    ends every survivor once its heartbeat timeout passes. At exit process 0 keeps JAX's
    coordination service up until the others have disconnected (a process leaving after it
    would abort: ``compat.multinode.outlive_followers``). No-op when ``jax.distributed`` is
    already initialised or the variables are not set."""
    if multinode.distributed_initialized() or launch.ENV_COORDINATOR not in os.environ:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # a process that dies must not end the others: they name it in a PeerFailureError
    # (without this, JAX's coordination service aborts every process after its heartbeat timeout)
    jax.config.update("jax_enable_recoverability", True)
    jax.distributed.initialize(
        os.environ[launch.ENV_COORDINATOR],
        num_processes=int(os.environ[launch.ENV_NUM_PROCESSES]),
        process_id=int(os.environ[launch.ENV_PROCESS_ID]),
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )
    atexit.register(multinode.outlive_followers)  # runs before JAX's own exit hook


@dataclasses.dataclass(frozen=True)
class Topology:
    """This process's place in a multi-process engine."""

    nnodes: int
    node_rank: int
    #: ``host:port``: sglang-jax's processes meet at port + 5 and + 6.
    dist_init_addr: str

    @property
    def leader(self) -> bool:
        return self.node_rank == 0


def _check_addr(addr: str, field: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 - 6:
        raise ValueError(f"{field}={addr!r} must be 'host:port' with a port below {65536 - 6}")
    return addr


def topology(config: SamplerConfig) -> Topology | None:
    """The multi-process layout ``config`` asks for, or None for a single-process engine.

    ``nnodes`` / ``node_rank`` default to an initialised ``jax.distributed``'s process count
    and index; the address to ``config.dist_init_addr``, ``$SAMPLER_DIST_INIT_ADDR``, or JAX's
    coordinator host with its port + ``ENGINE_PORT_OFFSET``. When ``nnodes > 1`` is given and
    ``jax.distributed`` is not initialised yet, it is initialised here at ``dist_init_addr``
    (JAX's coordinator at its port, as sglang-jax itself would), with gloo collectives on CPU.
    """
    initialized = multinode.distributed_initialized()
    if config.nnodes is None and not initialized:
        return None
    nnodes = config.nnodes if config.nnodes is not None else jax.process_count()
    if nnodes < 1:
        raise ValueError(f"nnodes={nnodes} must be >= 1")
    if nnodes == 1:
        return None
    addr = config.dist_init_addr or os.environ.get(launch.ENV_DIST_INIT_ADDR)
    if not initialized:
        if config.node_rank is None or addr is None:
            raise ValueError(
                f"nnodes={nnodes} without an initialised jax.distributed: set node_rank and dist_init_addr "
                "(or call jax.distributed.initialize first)"
            )
        if not 0 <= config.node_rank < nnodes:
            raise ValueError(f"node_rank={config.node_rank} must be in [0, {nnodes})")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU collectives across processes
        jax.distributed.initialize(_check_addr(addr, "dist_init_addr"), nnodes, config.node_rank)
    node_rank = config.node_rank if config.node_rank is not None else jax.process_index()
    if jax.process_count() != nnodes or jax.process_index() != node_rank:
        raise ValueError(
            f"nnodes={nnodes}, node_rank={node_rank} but jax.distributed has {jax.process_count()} processes "
            f"and this is process {jax.process_index()}: leave them unset to take jax.distributed's"
        )
    if addr is None:
        host, _, port = (multinode.coordinator_address() or "").rpartition(":")
        addr = f"{host}:{int(port) + ENGINE_PORT_OFFSET}"
    return Topology(nnodes, node_rank, _check_addr(addr, "dist_init_addr"))
