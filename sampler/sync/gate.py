"""The update gate of one engine's callers: generation calls run side by side, a weight update
holds new ones back (and a draining one waits for those in flight), so every request runs on one
complete set of weights."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from sampler.errors import UpdateTimeoutError


class UpdateGate:
    """Generation calls run side by side; a weight update holds new ones back while the
    weights change (``holding_new_calls``), and a draining update also waits until none
    is in flight (``updating``), so every request runs on one complete set of weights."""

    def __init__(self):
        self._cond = threading.Condition()
        self._active = 0
        self._updating = False
        self._update_lock = threading.Lock()

    @contextlib.contextmanager
    def generating(self, check: Callable[[], None] | None = None):
        """One generation call; ``check()`` runs as it is admitted, never while weights change."""
        with self._cond:
            self._cond.wait_for(lambda: not self._updating)
            if check is not None:
                check()
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def one_update(self, timeout: float):
        """Updates run one at a time."""
        if not self._update_lock.acquire(timeout=timeout):
            raise UpdateTimeoutError(f"another weight update is still running after {timeout:.0f} s")
        try:
            yield
        finally:
            self._update_lock.release()

    @contextlib.contextmanager
    def holding_new_calls(self, drain_timeout: float | None = None):
        """New generation calls wait until the body ends; with ``drain_timeout`` the body also
        waits until no call is in flight (UpdateTimeoutError, nothing changed, after it)."""
        with self._cond:
            self._updating = True
            if drain_timeout is not None and not self._cond.wait_for(lambda: self._active == 0, drain_timeout):
                self._updating = False
                self._cond.notify_all()
                raise UpdateTimeoutError(
                    f"{self._active} generation calls were still running after {drain_timeout:.0f} s; "
                    "the weights were not changed"
                )
        try:
            yield
        finally:
            with self._cond:
                self._updating = False
                self._cond.notify_all()

    @contextlib.contextmanager
    def updating(self, timeout: float):
        """A draining update: one at a time, no generation call in flight, new ones held."""
        with self.one_update(timeout), self.holding_new_calls(timeout):
            yield
