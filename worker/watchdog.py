"""Stops a model run that takes too long.

A tenant's model chooses its own run time (a Loop whose trip count is an input), so
every run is guarded: one watchdog thread per worker sets the run's
`onnxruntime.RunOptions.terminate` once its time is up, and ONNX Runtime returns with an
error at its next check. Several exec threads may run at once, so each guarded run has
its own entry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

TICK = 0.02  # seconds between checks: the precision of a limit


class Watchdog(threading.Thread):
    """Sets `terminate` on the guarded run's options when its limit passes."""

    def __init__(self) -> None:
        super().__init__(name="mtserve-watchdog", daemon=True)
        self._lock = threading.Lock()
        self._runs: dict[int, tuple[Any, float]] = {}  # id -> (RunOptions, monotonic deadline)
        self._stop = threading.Event()

    @contextmanager
    def guard(self, seconds: float) -> Iterator[Any]:
        """RunOptions to pass to `session.run`; `.terminate` is True if time ran out."""
        import onnxruntime as ort

        options = ort.RunOptions()
        with self._lock:
            self._runs[id(options)] = (options, time.monotonic() + seconds)
        try:
            yield options
        finally:
            with self._lock:
                del self._runs[id(options)]

    def run(self) -> None:
        while not self._stop.wait(TICK):
            now = time.monotonic()
            with self._lock:
                for options, deadline in self._runs.values():
                    if now > deadline:
                        options.terminate = True

    def stop(self) -> None:
        self._stop.set()
