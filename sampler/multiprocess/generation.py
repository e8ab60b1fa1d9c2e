"""Generation on a multi-process engine: direct on process 0; inside
``collective_generation()`` every process calls, process 0 runs every process's prompts in
one batch, and each gets its own results (or the error, raised on every process)."""

from __future__ import annotations

import contextlib
import pickle
import threading
from typing import Iterator

from sampler.engine.validation import samples_per_prompt
from sampler.errors import NotLeaderError, PeerFailureError
from sampler.multiprocess.engine import MultiNodeEngineHandle
from sampler.multiprocess.group import ProcessGroup, status


class CollectiveGeneration:
    """``generate_ids`` for a multi-process engine: direct on process 0; inside
    ``collective_generation()`` every process calls and process 0 runs them all."""

    def __init__(self, handle: MultiNodeEngineHandle, group: ProcessGroup):
        self.handle = handle
        self.group = group
        self._local = threading.local()

    @property
    def active(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def collective(self) -> Iterator[None]:
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1

    def check_direct(self) -> None:
        if not self.handle.leader:
            raise NotLeaderError(
                f"this is process {self.handle.topology.node_rank} of a {self.handle.topology.nnodes}-process "
                "engine: generation runs on process 0 (its tokenizer manager serves the engine). Call it there, "
                "or call it on every process inside `with sampler.collective_generation():` (process 0 runs "
                "every process's prompts; each gets its own results)"
            )

    def generate(self, run_local, prompts, sampling_params, *, return_logprob, logprob_start_len, timeout):
        """Every process posts its prompts; process 0 runs them together and posts each
        process its results (or the error, raised on every process)."""
        n = len(prompts)
        params = [dict(sampling_params)] * n if isinstance(sampling_params, dict) else list(sampling_params)
        starts = (
            [logprob_start_len] * n
            if logprob_start_len is None or isinstance(logprob_start_len, int)
            else list(logprob_start_len)
        )
        request = pickle.dumps(([list(map(int, p)) for p in prompts], params, starts))
        asked = self.group.round("generate")
        answered = self.group.round("generated")
        asked.post(request)
        if self.handle.leader:
            batches = [pickle.loads(asked.get(r, timeout)) for r in range(self.group.size)]
            all_prompts = [p for b in batches for p in b[0]]
            results, error = [], None
            try:
                if all_prompts:
                    results = run_local(
                        all_prompts,
                        [p for b in batches for p in b[1]],
                        return_logprob=return_logprob,
                        logprob_start_len=[s if s is not None else -1 for b in batches for s in b[2]]
                        if any(s is not None for b in batches for s in b[2])
                        else None,
                        timeout=timeout,
                    )
            except Exception as e:  # noqa: BLE001 - every process raises it
                error = e
            k = samples_per_prompt([p for b in batches for p in b[1]])  # answers per prompt, prompt-major
            offset = 0
            for r, b in enumerate(batches):
                mine = None if error is not None else results[offset * k : (offset + len(b[0])) * k]
                offset += len(b[0])
                answered.post(pickle.dumps((mine, None if error is None else status(error).decode())), rank=r)
            if error is not None:
                raise error
            return results[: n * k]
        out, message = pickle.loads(answered.get(self.group.rank, timeout))
        if message is not None:
            raise PeerFailureError(f"process 0 could not generate ({message})")
        return out
