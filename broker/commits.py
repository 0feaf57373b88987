"""Upload commits: validate off the event loop, profile on a worker, then publish.

Validating a model (hashing, parsing, `onnx.checker`) takes from milliseconds to seconds, so it
runs in a thread pool while the broker keeps serving; the broker polls `done()` every
loop turn. A validated model is moved into the store (so a worker can fetch it), then
profiled by one worker; only then is it recorded in the registry and the tenant
answered. A model ONNX Runtime cannot load fails at profiling and leaves nothing behind.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.registry import ModelRecord
from broker.uploads import Upload, verify_sha256
from mtcore.errors import ModelInvalid
from mtcore.modelcheck import ModelSignature, check_model


@dataclass(eq=False)
class PendingCommit:
    """An UPLOAD_COMMIT between its request and its answer."""

    envelope: list[Any]  # tenant routing frames
    client_id: int  # tenant's request id
    upload: Upload
    path: Path  # verified temp file (until moved into the store)
    future: Future[ModelSignature]
    record: ModelRecord | None = None  # set once validated
    profile_action: int = 0  # id of the PROFILE action, 0 before it is sent
    profile_deadline: float = 0.0  # monotonic: the commit fails if no profile by then


def _check_file(path: Path, sha256: str) -> ModelSignature:
    return check_model(verify_sha256(path, sha256))


class CommitValidator:
    """Runs model checks in background threads."""

    def __init__(self, threads: int = 2) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="mtserve-validate")

    def submit(self, path: Path, sha256: str) -> Future[ModelSignature]:
        """Check the hash, then the model, in a pool thread."""
        return self.pool.submit(_check_file, path, sha256)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def batch_cap(signature: ModelSignature, requested: int | None, default: int) -> int:
    """The model's batch cap: what the tenant asked for, if the model can batch at all."""
    if signature.batchable:
        return requested or default
    if requested and requested > 1:
        raise ModelInvalid(
            f"max_batch={requested} was asked for, but the model cannot batch: "
            f"{signature.fixed_batch_reason()}; export it with a dynamic batch axis "
            "or upload with max_batch=1"
        )
    return 1
