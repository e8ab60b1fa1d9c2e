"""This process's part of an engine spanning several processes (sglang-jax's multi-node
mode): started with the topology's ranks, parked in lockstep with process 0."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import jax

from sampler import compat
from sampler.compat import multinode
from sampler.config import SamplerConfig
from sampler.engine.handle import PAUSE_TIMEOUT_S, EngineHandle
from sampler.engine.validation import RequestLimits
from sampler.errors import UpdateTimeoutError
from sampler.multiprocess.process import Topology

logger = logging.getLogger(__name__)

#: How long a shutting-down follower waits for process 0's engine to stop first (s).
FOLLOWER_SHUTDOWN_S = 60.0
#: How long a leader's shutdown waits for its scheduler to tell the followers (s).
LEADER_STOP_S = 10.0


class MultiNodeEngineHandle(EngineHandle):
    """This process's part of an engine spanning several processes (sglang-jax nnodes > 1)."""

    def __init__(self, config: SamplerConfig, topo: Topology):
        self.topology = topo
        multinode.check_devices(config.tp_size, jax.device_count())
        self._silence_s = config.peer_timeout_s
        super().__init__(dataclasses.replace(config, device_indexes=None))

    @property
    def leader(self) -> bool:
        return self.topology.leader

    def _start_engine(self, engine_class: type, kwargs: dict[str, Any]) -> Any:
        kwargs = {
            **kwargs,
            "nnodes": self.topology.nnodes,
            "node_rank": self.topology.node_rank,
            "dist_init_addr": self.topology.dist_init_addr,
        }
        if not self.leader:
            kwargs = multinode.follower_kwargs(kwargs)
        env = contextlib.nullcontext() if self.leader else multinode.follower_env()
        multinode.patch_lockstep_broadcast()
        with multinode.capture_scheduler() as captured, env:
            engine = engine_class(**kwargs)
        self._captured = captured
        return engine

    def _attach_scheduler(self) -> None:
        multinode.attach_scheduler_info(self.engine, self._captured)
        self.scheduler = compat.scheduler_of(self.engine)
        self.model_runner = compat.model_runner_of(self.engine)
        self._park = None  # parking goes through the lockstep park on every process
        self.lockstep = multinode.lockstep_of(self.scheduler)
        self.lockstep.silence_s = self._silence_s
        if self.leader:
            self._scheduler_stop = compat.quiet_idle_scheduler(self.scheduler)
            self.lockstep.stop = self._scheduler_stop
            self.lockstep.ready = self._idle
        else:
            self._scheduler_stop = self.lockstep.stop

    def _attach_validator(self, config: SamplerConfig) -> None:
        """Process 0's engine checks every request as it arrives (the others have no
        tokenizer manager: their prompts reach it through collective generation); every
        process checks its own calls against the same limits first."""
        if self.leader:
            super()._attach_validator(config)
        else:  # the same limits, read from this process's scheduler; nothing to hook
            self.limits = RequestLimits.of(self.engine, config.max_batch_size)
            self.validator = None

    def _idle(self) -> bool:
        """From the leader's scheduler thread: nothing in flight, nothing queued or running."""
        return not compat.requests_in_flight(self.tokenizer_manager) and compat.scheduler_idle(self.scheduler)

    @contextlib.contextmanager
    def quiesced(self, timeout: float):
        """Leader: hold new requests, wait for those in flight, park every scheduler at the
        same iteration. Raises UpdateTimeoutError (nothing parked) after ``timeout``."""
        if not self.leader:
            raise RuntimeError("only process 0 quiesces the engine; the others follow its park")
        tm = self.tokenizer_manager
        self.run(compat.set_paused(tm, True), timeout=PAUSE_TIMEOUT_S)
        try:
            self.lockstep.request()
            if not self.lockstep.wait_parked(timeout) and not self.lockstep.cancel():
                raise UpdateTimeoutError(
                    f"{compat.requests_in_flight(tm)} requests were still running after {timeout:.0f} s; "
                    "the weights were not changed"
                )
            try:
                yield
            finally:
                self.lockstep.release()
        finally:
            self.run(compat.set_paused(tm, False), timeout=PAUSE_TIMEOUT_S)

    def shutdown(self) -> None:
        if self.closed:
            return
        thread = next((t for t in self.threads if "scheduler" in t.name), None)
        if self.leader:
            # The next batch tells every follower to stop, then the leader's scheduler ends.
            self.lockstep.stop_followers()
            if thread is not None:
                thread.join(LEADER_STOP_S)
        elif thread is not None and thread.is_alive():
            # A follower's scheduler runs every forward pass with process 0's: it ends when
            # process 0's engine stops (or gives up after FOLLOWER_SHUTDOWN_S).
            if not self.lockstep.leader_stopped.wait(FOLLOWER_SHUTDOWN_S):
                logger.warning("process 0's engine did not stop within %.0f s; stopping anyway", FOLLOWER_SHUTDOWN_S)
            thread.join(LEADER_STOP_S)
        super().shutdown()
