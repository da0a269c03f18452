"""Waking an idle engine at a lease's deadline.

An engine with no requests waits on its input (vLLM's engine core blocks on
its input queue), so nothing in it runs: the kit's ``tick`` would drop an
expired lease, and the host tier copy it out, only when the next request
arrives -- minutes late, with its blocks still pinned and the metrics
saying so. The waker is a thread that sleeps until the deadline the engine
gave it last and then calls the engine's ``wake`` (vLLM: post a wake-up to
that queue), so the engine runs one empty step, on its own thread, in which
the lease expires. The thread itself never touches the kit.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Callable

__all__ = ["DeadlineWaker"]

logger = logging.getLogger("kvttl.kit")

#: Seconds past a deadline to wake at, so that the deadline is due by then on any clock.
WAKE_SLACK_S = 0.005


class DeadlineWaker:
    """Calls ``wake()`` from a daemon thread once ``clock()`` passes the time
    last given to :meth:`wake_at` (None: no wake-up). Each time given wakes at
    most once; the engine gives the next one when it goes idle again."""

    def __init__(self, wake: Callable[[], None], *, clock: Callable[[], float] = time.monotonic,
                 name: str = "kvttl-deadline-waker"):
        self._wake = wake
        self._clock = clock
        self._cond = threading.Condition()
        self._at: float | None = None
        self._closed = False
        self.num_wakes = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wake_at(self, at: float | None) -> None:
        if at is not None and not math.isfinite(at):
            at = None  # never due: nothing to wake for
        with self._cond:
            if at != self._at:
                self._at = at
                self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed:
                    at = self._at
                    if at is None:
                        self._cond.wait()
                        continue
                    delay = at + WAKE_SLACK_S - self._clock()
                    if delay <= 0:
                        break
                    self._cond.wait(min(delay, threading.TIMEOUT_MAX))
                if self._closed:
                    return
                self._at = None
            try:
                self._wake()
                self.num_wakes += 1
            except Exception as e:  # the engine may be shutting down: then there is nothing to wake
                logger.warning("kvttl: could not wake the engine for a lease deadline: %s", e)
