"""Stops a model run that takes too long.

A tenant's model chooses its own run time (a Loop whose trip count is an input), so
every run is guarded: one watchdog thread per worker sets the run's
`onnxruntime.RunOptions.terminate` once its time is up, and ONNX Runtime returns with an
error at its next check. Runs on a worker never overlap (inline runs happen only while
the exec thread is idle), so one slot is enough.
"""

from __future__ import annotations

import math
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
        self._options: Any = None  # RunOptions of the run being guarded, None when idle
        self._deadline = math.inf  # monotonic time the guarded run must end by
        self._stop = threading.Event()

    @contextmanager
    def guard(self, seconds: float) -> Iterator[Any]:
        """RunOptions to pass to `session.run`; `.terminate` is True if time ran out."""
        import onnxruntime as ort

        options = ort.RunOptions()
        with self._lock:
            self._options, self._deadline = options, time.monotonic() + seconds
        try:
            yield options
        finally:
            with self._lock:
                self._options = None

    def run(self) -> None:
        while not self._stop.wait(TICK):
            with self._lock:
                if self._options is not None and time.monotonic() > self._deadline:
                    self._options.terminate = True

    def stop(self) -> None:
        self._stop.set()
