"""Several JAX processes, one engine: sglang-jax's multi-node mode driven as a
multi-controller (SPMD) JAX program.

Every process runs the same program: it builds a ``SglangJaxSampler`` (one engine spanning
every process's devices, ``tp_size`` = the global device count) and calls ``update_params``
with the same global trainer state. Each process writes only the shards it holds: leaves
whose global sharding is equivalent to the engine's are aliased, the rest are resharded
by JAX's own collectives. The processes agree at every step through JAX's coordination
service (its key-value store), never through a collective, so that a refusal on one
process is a refusal on all and no process is left waiting in a collective:

1. ``prepare``: each validates the tree; they exchange the outcome; all raise alike.
2. ``exclusive``: process 0 holds new requests back, waits for those in flight, and
   parks its scheduler at an idle iteration; the batch it publishes there parks every
   follower's scheduler too (``compat.LockstepPark``). No forward pass runs anywhere.
3. the swap (reshards are collectives: every process runs the same ones in the same
   order), the prefix cache flush; they exchange the outcome;
4. every scheduler is released. No process generates on the new version before all
   have it (3 completes on all before 4 starts on any).

Generation runs on process 0 (the engine's tokenizer manager lives there). On the other
processes ``generate_ids`` / ``__call__`` raise ``NotLeaderError``, except inside
``sampler.collective_generation()``: then every process calls, process 0 runs every
process's prompts in one batch, and each gets its own results (this is what
``SglangJaxRollout`` does, so Tunix code that runs on every process works unchanged).
``fingerprint()`` is collective too. Waits are bounded (``peer_timeout_s``) and check the
coordination service's heartbeats: a process that died is named in a ``PeerFailureError``.

Modules: ``process`` (``initialize``, where this process stands), ``group`` (agreement through
JAX's coordination service), ``engine`` (this process's part of the engine), ``sync`` (the
agreed weight sync), ``generation`` (collective generation), ``launch`` (several processes on
one machine: ``python -m sampler.multiprocess.launch``).
"""

from sampler.errors import NotLeaderError, PeerFailureError
from sampler.multiprocess.engine import FOLLOWER_SHUTDOWN_S, LEADER_STOP_S, MultiNodeEngineHandle
from sampler.multiprocess.generation import CollectiveGeneration
from sampler.multiprocess.group import HEARTBEAT_PERIOD_S, PEER_POLL_S, PEER_SILENCE_S, ProcessGroup, Round, agree
from sampler.multiprocess.process import ENGINE_PORT_OFFSET, HEARTBEAT_TIMEOUT_S, Topology, initialize, topology
from sampler.multiprocess.sync import MultiProcessSync

__all__ = [
    "ENGINE_PORT_OFFSET",
    "FOLLOWER_SHUTDOWN_S",
    "HEARTBEAT_PERIOD_S",
    "HEARTBEAT_TIMEOUT_S",
    "LEADER_STOP_S",
    "PEER_POLL_S",
    "PEER_SILENCE_S",
    "CollectiveGeneration",
    "MultiNodeEngineHandle",
    "MultiProcessSync",
    "NotLeaderError",
    "PeerFailureError",
    "ProcessGroup",
    "Round",
    "Topology",
    "agree",
    "initialize",
    "topology",
]
