"""The CUDA streams a GPU worker orders its work on, and the events between them.

Four streams, one per kind of work, so that each kind overlaps the others: the loader
copies one model's weights on `weights` while `exec` runs another model and `inputs` and
`outputs` move a batch's tensors up and down. Order between them is explicit, by
events: a run of a model waits on the event recorded after its weight copy
(`order(exec, weights)`), nothing more, so a copy for another model never holds it up.

The streams are non-blocking: they do not synchronise with CUDA's legacy default
stream, on which CuPy and PyTorch put work by default. Work on the default stream is
therefore not ordered with them; a reader of their results waits on an event or on
`sync()` first.
"""

from __future__ import annotations

import operator
from typing import Any

from worker.gpu import require_gpu

NAMES = ("weights", "inputs", "exec", "outputs")


class GpuStreams:
    """The four non-blocking CuPy streams of one device: weights, inputs, exec, outputs.

    GpuUnavailable (a LoadFailed) where no GPU can be used. The streams live as long as
    this object (CuPy destroys a stream with its last reference).
    """

    def __init__(self, device: int = 0) -> None:
        cupy = require_gpu("CUDA streams")
        self.device = operator.index(device)
        with cupy.cuda.Device(self.device):
            self.weights: Any = cupy.cuda.Stream(non_blocking=True)  # host -> device weights
            self.inputs: Any = cupy.cuda.Stream(non_blocking=True)  # batch inputs up
            self.exec: Any = cupy.cuda.Stream(non_blocking=True)  # model runs
            self.outputs: Any = cupy.cuda.Stream(non_blocking=True)  # batch outputs down

    @property
    def all(self) -> tuple[Any, ...]:
        """The streams, in NAMES order."""
        return (self.weights, self.inputs, self.exec, self.outputs)

    def order(self, after: Any, before: Any) -> Any:
        """Make work queued on `after` from now on wait for all work queued on `before`
        so far, without blocking the host; return the event recorded on `before` (its
        `synchronize()` or `done` tell the host when that work is done)."""
        import cupy

        with cupy.cuda.Device(self.device):
            event = cupy.cuda.Event(block=False, disable_timing=True)
            event.record(before)
            after.wait_event(event)
        return event

    def sync(self) -> None:
        """Block until all work queued on the four streams is done."""
        for stream in self.all:
            stream.synchronize()
