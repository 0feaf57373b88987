"""Upload commits: validate off the event loop, profile on a worker, then publish.

Validating a model (hashing, parsing, `onnx.checker`) takes from milliseconds to seconds, so it
runs in a thread pool while the broker keeps serving; the broker polls `done()` every
loop turn. A validated model is moved into the store (so a worker can fetch it), then
profiled by one worker; only then is it recorded in the registry and the tenant
answered. A model ONNX Runtime cannot load fails at profiling and leaves nothing behind.

`Commits` is that state machine, mixed into `broker.broker.Broker` (see its docstring for
why mixins): `begin_commit` -> `advance_commits` (validated: `_validated` stores the blob
and starts the PROFILE) -> `on_profile_result` -> `_publish`, or `_fail_commit` from any
step (invalid, profile failed, timed out, worker lost, broker stopping). It also profiles,
on a worker that joins, the models published while no worker was there (`reprofile`), and
removes the blobs no model needs any more (`collect_garbage`: failed commits, replaced
and deleted models). Workers are reached only through the backend's verbs
(`start_profile`, `profiling`, `model_in_use`, `forget_model`).
"""

from __future__ import annotations

import logging
import statistics
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from broker.registry import ModelRecord
from broker.uploads import Upload, verify_sha256
from mtcore import actions as wire
from mtcore.errors import InternalError, LoadFailed, ModelExists, ModelInvalid, MTError, error_for
from mtcore.modelcheck import ModelSignature, check_model
from mtcore.protocol import Cmd

if TYPE_CHECKING:
    from broker.broker import Broker
    from broker.state import Action, WorkerState

log = logging.getLogger("mtserve.broker")

PROFILE_TIMEOUT = 120.0  # seconds a worker may take to profile an upload


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


class Commits:
    """Commits from UPLOAD_COMMIT to their answer, and blobs to collect (a `Broker` mixin)."""

    def init_commits(self: Broker) -> None:
        self.validator = CommitValidator()  # model checks off the loop
        self.commits: list[PendingCommit] = []  # commits being validated or profiled
        self.gc_shas: set[str] = set(self.registry.orphans())  # blobs to remove once unused

    def begin_commit(
        self: Broker, envelope: list[Any], client_id: int, upload: Upload, path: Path
    ) -> None:
        """Start validating a complete upload; it is answered when published or failed."""
        future = self.validator.submit(path, upload.sha256)
        self.commits.append(PendingCommit(envelope, client_id, upload, path, future))

    def advance_commits(self: Broker) -> None:
        for commit in [c for c in self.commits if c.record is None and c.future.done()]:
            try:
                self._validated(commit)
            except MTError as exc:
                self._fail_commit(commit, exc)
            except Exception as exc:  # e.g. OSError from the store: fail this commit only
                log.exception("commit of %s failed", commit.upload.name)
                self._fail_commit(commit, InternalError(f"storing the model failed: {exc}"))

    def _validated(self: Broker, commit: PendingCommit) -> None:
        signature = commit.future.result()  # raises ModelInvalid from the check
        upload = commit.upload
        max_batch = batch_cap(signature, upload.max_batch, self.config.max_batch)
        self.registry.store.put_file(upload.sha256, commit.path)
        commit.record = ModelRecord(
            upload.tenant,
            upload.name,
            upload.sha256,
            upload.size,
            signature.inputs,
            signature.outputs,
            max_batch,
        )
        action = self.start_profile(upload.sha256, max_batch, commit)
        if action is None:  # nobody to profile on: publish now, profile stays unknown
            self._publish(commit)
            return
        commit.profile_action = action.id
        commit.profile_deadline = time.monotonic() + PROFILE_TIMEOUT

    def on_profile_result(self: Broker, action: Action, result: wire.ProfileModelResult) -> None:
        commit, _ = action.context
        if isinstance(commit, ModelRecord):  # a model published before any worker came
            self.on_reprofile_result(commit, result, action.worker.kind)
            return
        if commit not in self.commits:
            return
        if not result.ok:
            self._fail_commit(commit, profile_error(result))
            return
        self._publish(commit, *profile_of(result, action.worker.kind))

    def _publish(
        self: Broker,
        commit: PendingCommit,
        profile: dict[int, float] | None = None,
        measurements: dict[str, Any] | None = None,
    ) -> None:
        record = commit.record
        existing = self.registry.get(record.tenant, record.name)
        if existing and not commit.upload.replace:
            error = ModelExists(f"model '{record.name}' was created by a concurrent upload")
            self._fail_commit(commit, error)
            return
        record.profile = dict(profile or {})
        record.measurements = dict(measurements or {})
        self.seed_predictor(record)
        try:
            old = self.registry.put(record)
        except Exception as exc:  # disk or SQLite error: fail this commit, keep serving
            log.exception("recording %s failed", record.name)
            self._fail_commit(commit, InternalError(f"recording the model failed: {exc}"))
            return
        self.commits.remove(commit)
        self.uploads.release(commit.upload)
        if old and old.sha256 != record.sha256:
            self.gc_shas.add(old.sha256)
        self.reply(
            envelope=commit.envelope,
            cmd=Cmd.UPLOAD_COMMIT,
            header={"id": commit.client_id, "model": record.to_info()},
        )

    def _fail_commit(self: Broker, commit: PendingCommit, exc: MTError) -> None:
        self.uploads.release(commit.upload)
        if commit in self.commits:
            self.commits.remove(commit)
        commit.path.unlink(missing_ok=True)
        if commit.record is not None:
            self.gc_shas.add(commit.record.sha256)
        self.reply_error(commit.envelope, Cmd.UPLOAD_COMMIT, commit.client_id, exc)

    def expire_profiles(self: Broker, now: float) -> None:
        """Fail the commits whose profile did not come back in PROFILE_TIMEOUT."""
        for commit in [c for c in self.commits if c.profile_action and c.profile_deadline < now]:
            self._fail_commit(commit, ModelInvalid(
                f"profiling did not finish within {PROFILE_TIMEOUT:.0f} s; a model must run on "
                "random inputs in bounded time"))  # fmt: skip

    def profile_lost(self: Broker, action: Action, why: str) -> None:
        """The worker running a PROFILE was lost: fail the commit it was for, if any."""
        commit = action.context[0]
        if commit in self.commits:
            self._fail_commit(commit, LoadFailed(
                f"worker {action.worker.name} was lost while profiling the model ({why}); if "
                "the model crashed it, fix the model, otherwise upload it again"))  # fmt: skip

    def close_commits(self: Broker, error: MTError) -> None:
        """At shutdown: answer every commit still owed an answer, drop its temp file."""
        for commit in self.commits:
            self.reply_error(commit.envelope, Cmd.UPLOAD_COMMIT, commit.client_id, error)
            commit.path.unlink(missing_ok=True)
        self.commits.clear()
        self.validator.close()

    # ------------------------------------------------------------------ published models

    def reprofile(self: Broker, worker: WorkerState) -> None:
        """Profile, on a worker that just joined, the models published without a profile."""
        pending = self.profiling()
        for record in list(self.registry.models.values()):
            if record.profile or record.sha256 in pending:
                continue
            self.start_profile(record.sha256, record.max_batch, record, worker)
            pending.add(record.sha256)

    def on_reprofile_result(
        self: Broker, record: ModelRecord, result: wire.ProfileModelResult, kind: str
    ) -> None:
        if not result.ok:
            log.warning("profiling %s/%s failed: [%d] %s", record.tenant, record.name,
                        result.status, result.error)  # fmt: skip
            return
        if self.registry.get(record.tenant, record.name) is record:
            self.registry.set_profile(record, *profile_of(result, kind))
            self.seed_predictor(record)

    def release_blob(self: Broker, sha256: str) -> None:
        """A model no longer needs these bytes; they go once nothing else uses them."""
        self.gc_shas.add(sha256)

    def collect_garbage(self: Broker) -> None:
        in_commit = {c.upload.sha256 for c in self.commits}
        for sha in list(self.gc_shas):
            if self.registry.sha_in_use(sha) or sha in in_commit or self.model_in_use(sha):
                continue
            self.gc_shas.discard(sha)
            self.registry.store.remove(sha)
            self.forget_model(sha)  # from both tiers of every worker: its pages are freed too


def profile_of(
    result: wire.ProfileModelResult, kind: str
) -> tuple[dict[int, float], dict[str, Any]]:
    """(median microseconds per batch size, every measurement) of a profile."""
    medians = {b: statistics.median(t) for b, t in result.profile.items() if t}
    measurements = {
        "kind": kind,
        "samples": {str(b): t for b, t in result.profile.items()},
        "prepare_us": result.prepare_us,
        "build_us": result.build_us,
        "fresh_us": result.fresh_us,
        "weight_bytes": result.weight_bytes,
        "session_bytes": result.session_bytes,
    }
    return medians, measurements


def profile_error(result: wire.ProfileModelResult) -> MTError:
    """Why a profile failed, as the commit's error: a model that will not run is invalid."""
    if result.status is wire.ActionStatus.LOAD_FETCH_FAILED:
        return LoadFailed(result.error)
    if result.status in (wire.ActionStatus.LOAD_INVALID, wire.ActionStatus.INTERNAL):
        return ModelInvalid(result.error)
    return error_for(int(wire.TENANT_STATUS[result.status]), result.error)
