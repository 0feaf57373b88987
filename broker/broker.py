"""The broker: tenant frontend, worker backend and the controller, in one `mediate()` loop.

One thread owns both ROUTER sockets. Every turn it reads what arrived (bounded batches
from each socket), lets the scheduler turn queues into actions, sends them, and on a
timer purges lost workers, sends heartbeats and expires what waited too long. Tensor
frames are forwarded zero-copy; the broker reads only headers. Every tenant request gets
exactly one answer: answers go through `answer()`, which pops the request from the
table of in-flight requests, so a second answer is impossible.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import secrets
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from broker.commits import CommitValidator, PendingCommit, batch_cap
from broker.registry import ModelRecord, Registry
from broker.scheduler import make_scheduler
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from broker.uploads import Uploads
from broker.validate import plan_inputs
from ext import RequestTable
from mtcore import actions as wire
from mtcore import messages
from mtcore.config import BrokerConfig
from mtcore.errors import (
    BadArgument,
    InternalError,
    LoadFailed,
    ModelExists,
    ModelInvalid,
    ModelNotFound,
    MTError,
    Overloaded,
    ShuttingDown,
    Status,
    WorkerLost,
    error_for,
)
from mtcore.predictor import Predictor
from mtcore.protocol import (
    SHA256_HEX,
    TAG,
    VERSION,
    WORKER_TAG,
    Cmd,
    Limits,
    Message,
    WCmd,
    build,
    encode_header,
    frame_buffer,
    frame_bytes,
    frame_size,
    parse_body,
    peek_cmd,
    peek_id,
    split_envelope,
)
from mtcore.transport import NOBLOCK, make_socket, recv_frames, send_frames

log = logging.getLogger("mtserve.broker")

TICK = 0.05  # seconds between housekeeping passes
# Messages read per loop turn. Tenant requests come in small gulps so that worker
# results (and the dispatch they enable) are never stuck behind a long tenant backlog.
FRONTEND_BATCH = 32
BACKEND_BATCH = 256
PROFILE_TIMEOUT = 120.0  # seconds a worker may take to profile an upload
PROFILE_SAMPLES = 10  # runs measured per batch size when profiling


class Broker:
    """Tenant frontend + controller + worker backend."""

    def __init__(self, config: BrokerConfig, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.ctx = ctx or zmq.Context.instance()
        self.limits = config.limits  # bounds on tenant messages
        # Worker results carry whole batches and model bytes travel to workers: wider bounds.
        self.worker_limits = Limits(
            max_frame_bytes=max(config.max_model_bytes, config.limits.max_frame_bytes),
            max_message_bytes=config.max_model_bytes + config.limits.max_message_bytes,
            max_header_bytes=16 * config.limits.max_header_bytes,
            max_frames=65536,
        )
        self.frontend = self._bind(config.frontend, self.limits.max_frame_bytes)  # tenants
        self.backend = self._bind(config.backend, self.worker_limits.max_frame_bytes)  # workers
        self.poller = zmq.Poller()  # both sockets, for `turn`
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        self.registry = Registry(config.state_dir)  # models: SQLite + blobs
        self.uploads = Uploads(config.state_dir / "uploads", config.max_model_bytes)
        self.pending = RequestTable()  # rid -> PendingRequest, until answered
        self.pending_bytes = 0  # input bytes those requests hold
        self.predictor = Predictor()  # exec and load times, learned from every result
        self.scheduler = make_scheduler(
            config.scheduler, config.max_queue, self.pending.__contains__, self.predictor
        )
        self.workers: dict[bytes, WorkerState] = {}  # wid -> worker
        for record in self.registry.models.values():
            self.seed_predictor(record)
        self.validator = CommitValidator()  # model checks off the loop
        self.commits: list[PendingCommit] = []  # commits being validated or profiled
        self.gc_shas: set[str] = set(self.registry.orphans())  # blobs to remove once unused
        self.counters: Counter[str] = Counter()  # messages by command, loads, evictions
        self.answered: Counter[int] = Counter()  # tenant replies by status code
        self.by_command: Counter[Cmd] = Counter()  # tenant requests by command
        self.started = time.monotonic()
        self._rids = itertools.count(secrets.randbits(40) << 16)  # request ids (random start)
        self._next_tick = 0.0
        self._stopping = False
        # Busy-polling after a message saves the wake-up of a sleeping thread on the
        # answer that usually follows (a worker's result, a tenant's next request).
        self._spin_s = config.spin_us / 1e6
        self._spin_until = 0.0
        # Each handler gets the routing envelope, the decoded request and the payload frames.
        self.handlers: dict[Cmd, Callable[[list[Any], Any, list[Any]], None]] = {
            Cmd.PING: self.on_ping,
            Cmd.UPLOAD_BEGIN: self.on_upload_begin,
            Cmd.UPLOAD_CHUNK: self.on_upload_chunk,
            Cmd.UPLOAD_COMMIT: self.on_upload_commit,
            Cmd.INFER: self.on_infer,
            Cmd.LIST: self.on_list,
            Cmd.INFO: self.on_info,
            Cmd.DELETE: self.on_delete,
            Cmd.STATUS: self.on_status,
        }

    def _bind(self, address: str, max_frame: int) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.ROUTER)
        # A frame far over the limit is not worth reading to answer TOO_LARGE: ZeroMQ
        # drops that connection instead, before buffering the frame.
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * max_frame)
        sock.bind(address)
        return sock

    # ------------------------------------------------------------------ loop

    def mediate(self) -> None:
        """Serve until `stop()`; then answer what is left with SHUTTING_DOWN."""
        log.info(
            "broker serving tenants on %s, workers on %s", self.config.frontend, self.config.backend
        )
        idle_ms = TICK * 1000
        try:
            while not self._stopping:
                if self._spin_until > time.monotonic():
                    self.turn(0)  # busy-poll: the next message is likely close
                else:
                    self.turn(5 if self.commits else idle_ms)
        finally:
            self.shutdown()

    def turn(self, timeout_ms: float) -> None:
        """One pass of the loop: wait for messages, handle them, housekeeping, dispatch."""
        events = dict(self.poller.poll(timeout_ms))
        if events and self._spin_s:
            self._spin_until = time.monotonic() + self._spin_s
        if self.backend in events:
            self._drain(self.backend, self.on_worker_message, BACKEND_BATCH)
        if self.frontend in events:
            self._drain(self.frontend, self.on_client_message, FRONTEND_BATCH)
        now = time.monotonic()
        if self.commits:
            self.advance_commits()
        if now >= self._next_tick:
            self.tick(now)
            self._next_tick = now + TICK
        self.dispatch(now)

    def _drain(self, sock: zmq.Socket, handle: Callable[[list[Any]], None], limit: int) -> None:
        for _ in range(limit):
            try:
                frames = recv_frames(sock, NOBLOCK)
            except zmq.Again:
                return
            try:
                handle(frames)
            except Exception:  # a bug must not stop the broker; the request was answered
                log.exception("unhandled error while handling a message")
                self.counters["internal_errors"] += 1

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def tick(self, now: float) -> None:
        """Housekeeping: lost workers, heartbeats, expiries, garbage blobs."""
        self.purge_lost_workers(now)
        self.expire_actions(now)
        self.send_heartbeats(now)
        for request in self.scheduler.expire(now):
            waited_ms = (now - request.arrival) * 1e3
            error = MTError(
                f"deadline passed after {waited_ms:.1f} ms queued", Status.DEADLINE_EXPIRED
            )
            self.answer_error(request, error)
        abandoned = InternalError("no answer from a worker in time (deadline + grace, or lifetime)")
        for _, request in self.pending.pop_expired(now):
            self.pending_bytes -= request.nbytes
            self._reply_error(request.envelope, Cmd.INFER, request.client_id, abandoned)
        self.uploads.expire(now, self.config.upload_timeout)
        for commit in [c for c in self.commits if c.profile_action and c.profile_deadline < now]:
            self._fail_commit(commit, ModelInvalid(
                f"profiling did not finish within {PROFILE_TIMEOUT:.0f} s; a model must run on "
                "random inputs in bounded time"))  # fmt: skip
        self.collect_garbage()

    def shutdown(self) -> None:
        error = ShuttingDown("the broker is stopping; retry against its replacement")
        for key in self.pending.keys():  # noqa: SIM118 (a RequestTable, not a dict)
            request = self.pending.pop(key)
            self._reply_error(request.envelope, Cmd.INFER, request.client_id, error)
        for commit in self.commits:
            self._reply_error(commit.envelope, Cmd.UPLOAD_COMMIT, commit.client_id, error)
            commit.path.unlink(missing_ok=True)
        self.commits.clear()
        self.validator.close()
        self.uploads.close()
        self.registry.close()
        self.pending.close()
        self.frontend.close(linger=100)
        self.backend.close(linger=0)

    # ------------------------------------------------------------------ tenants

    def on_client_message(self, frames: list[Any]) -> None:
        self.counters["messages"] += 1
        try:
            envelope, body = split_envelope(frames)
        except MTError as exc:  # no delimiter: still routable by the first frame
            self._reply_error(frames[:1], Cmd.PING.value, None, exc)
            return
        try:
            msg = parse_body(body, TAG, Cmd, self.limits)
        except MTError as exc:
            self._reply_error(envelope, peek_cmd(body), peek_id(body), exc)
            return
        request = None
        try:
            request = messages.decode(msg.cmd, msg.header, self.limits)  # every field, once
            self.by_command[msg.cmd] += 1
            self.handlers[msg.cmd](envelope, request, msg.payload)
        except Exception as exc:
            if not isinstance(exc, MTError):
                log.exception("bug while handling %s", msg.cmd.name)
                exc = InternalError(f"{type(exc).__name__} in {msg.cmd.name} handler: {exc}")
            client_id = request.id if request is not None else messages.reply_id(msg.header)
            self._reply_error(envelope, msg.cmd, client_id, exc)

    def reply(
        self, envelope: list[Any], cmd: Cmd | bytes, header: dict[str, Any], payload: list[Any] = ()
    ) -> None:
        status = header.setdefault("status", 0)
        self.answered[status] += 1
        value = cmd.value if isinstance(cmd, Cmd) else cmd
        send_frames(self.frontend, [*envelope, b"", TAG, value, encode_header(header), *payload])

    def _reply_error(
        self, envelope: list[Any], cmd: Cmd | bytes, client_id: int | None, exc: MTError
    ) -> None:
        header: dict[str, Any] = {"status": int(exc.status), "error": exc.message}
        if client_id is not None:
            header["id"] = client_id
        self.reply(envelope, cmd, header)

    def on_ping(self, envelope: list[Any], request: messages.Ping, payload: list[Any]) -> None:
        self.reply(envelope, Cmd.PING, {"id": request.id, "server": f"mtserve {VERSION}"})

    def on_upload_begin(
        self, envelope: list[Any], request: messages.UploadBegin, payload: list[Any]
    ) -> None:
        name = request.name
        if not request.replace and self.registry.get(request.tenant, name):
            raise ModelExists(f"model '{name}' exists; upload with replace=true to overwrite it")
        upload = self.uploads.begin(
            request.tenant, name, request.size, request.sha256, request.replace, request.max_batch
        )
        self.reply(envelope, Cmd.UPLOAD_BEGIN, {"id": request.id, "upload": upload.handle})

    def on_upload_chunk(
        self, envelope: list[Any], request: messages.UploadChunk, payload: list[Any]
    ) -> None:
        upload = self.uploads.get(request.tenant, request.upload)
        if len(payload) != 1:
            raise BadArgument(f"UPLOAD_CHUNK carries exactly 1 payload frame, got {len(payload)}")
        received = self.uploads.write_chunk(upload, request.offset, frame_buffer(payload[0]))
        self.reply(envelope, Cmd.UPLOAD_CHUNK, {"id": request.id, "received": received})

    def on_upload_commit(
        self, envelope: list[Any], request: messages.UploadCommit, payload: list[Any]
    ) -> None:
        upload = self.uploads.get(request.tenant, request.upload)
        path = self.uploads.finish(upload)  # checks coverage; the hash runs off the loop
        future = self.validator.submit(path, upload.sha256)
        self.commits.append(PendingCommit(envelope, request.id, upload, path, future))

    def on_infer(self, envelope: list[Any], request: messages.Infer, payload: list[Any]) -> None:
        model = self._model(request.tenant, request.model)
        plan = plan_inputs(model, request.inputs)
        frames = plan.frames(payload)
        now = time.monotonic()
        deadline = request.deadline(now)
        nbytes = sum(frame_size(f) for f in frames)
        if self.pending_bytes + nbytes > self.config.max_pending_bytes:
            raise Overloaded(
                f"{self.pending_bytes} bytes of inputs already wait for answers; retry later"
            )
        rid = next(self._rids)
        pending = PendingRequest(
            rid, envelope, request.id, model, plan.descs, frames, plan.batch, now, deadline
        )
        pending.nbytes = nbytes
        pending.wire_inputs = plan.wire
        self.scheduler.add_request(pending, now)
        self.pending_bytes += nbytes
        give_up = min(deadline + self.config.answer_grace, now + self.config.max_request_time)
        self.pending.insert(pending.rid, give_up, pending)

    def on_list(
        self, envelope: list[Any], request: messages.ListModels, payload: list[Any]
    ) -> None:
        models = [m.to_info() for m in self.registry.list(request.tenant)]
        self.reply(envelope, Cmd.LIST, {"id": request.id, "models": models})

    def on_info(
        self, envelope: list[Any], request: messages.GetModelInfo, payload: list[Any]
    ) -> None:
        model = self._model(request.tenant, request.model)
        self.reply(envelope, Cmd.INFO, {"id": request.id, "model": model.to_info()})

    def on_delete(
        self, envelope: list[Any], request: messages.DeleteModel, payload: list[Any]
    ) -> None:
        model = self._model(request.tenant, request.model)
        self.registry.delete(request.tenant, model.name)
        self.gc_shas.add(model.sha256)
        self.reply(envelope, Cmd.DELETE, {"id": request.id})

    def on_status(
        self, envelope: list[Any], request: messages.GetStatus, payload: list[Any]
    ) -> None:
        info = self.status_info(request.tenant)
        self.reply(envelope, Cmd.STATUS, {"id": request.id, "status_info": info})

    def _model(self, tenant: str, name: str) -> ModelRecord:
        model = self.registry.get(tenant, name)
        if model is None:
            raise ModelNotFound(f"no model '{name}' for tenant '{tenant}'; `list` shows yours")
        return model

    def status_info(self, tenant: str) -> dict[str, Any]:
        answered = {str(status): count for status, count in self.answered.items()}
        return {
            "server": f"mtserve {VERSION}",
            "uptime_s": round(time.monotonic() - self.started, 3),
            "pid": os.getpid(),
            "scheduler": self.config.scheduler,
            "workers": [w.describe() for w in self.workers.values()],
            "models": self.registry.count(),
            "tenant_models": len(self.registry.list(tenant)),
            "queued": self.scheduler.queued(),
            "in_flight": len(self.pending),
            "uploads_in_progress": len(self.uploads.active),
            "messages": self.counters["messages"],
            "loads": self.counters["loads"],  # LOAD actions sent to workers
            "evictions": self.counters["evictions"],  # UNLOAD actions sent to workers
            "internal_errors": self.counters["internal_errors"],  # bugs caught by the loop
            "worker_malformed": self.counters["worker_malformed"],  # worker messages dropped
            "actions_expired": self.counters["actions_expired"],  # never answered: given up
            "loads_by_tier": {  # successful LOADs by where the worker found the model
                tier: self.counters[f"loads_from_{tier}"] for tier in ("device", "host", "cold")
            },
            "predicted_within": self.predictor.within_share,  # exec/load within prediction
            "answers_by_status": answered,
        }

    # ------------------------------------------------------------------ answers

    def answer(self, request: PendingRequest, header: dict[str, Any], payload: list[Any]) -> None:
        """Send the one answer of a request, unless it was answered already."""
        if self.pending.pop(request.rid, None) is None:
            return
        self.pending_bytes -= request.nbytes
        header["id"] = request.client_id
        self.reply(request.envelope, Cmd.INFER, header, payload)

    def answer_error(self, request: PendingRequest, exc: MTError) -> None:
        self.answer(request, {"status": int(exc.status), "error": exc.message}, [])

    # ------------------------------------------------------------------ commits

    def advance_commits(self) -> None:
        for commit in [c for c in self.commits if c.record is None and c.future.done()]:
            try:
                self._validated(commit)
            except MTError as exc:
                self._fail_commit(commit, exc)
            except Exception as exc:  # e.g. OSError from the store: fail this commit only
                log.exception("commit of %s failed", commit.upload.name)
                self._fail_commit(commit, InternalError(f"storing the model failed: {exc}"))

    def _validated(self, commit: PendingCommit) -> None:
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
        worker = min(self.workers.values(), key=lambda w: len(w.inflight), default=None)
        if worker is None:  # nobody to profile on: publish now, profile stays unknown
            self._publish(commit)
            return
        batches = [b for b in self.config.profile_batches if b <= max_batch] or [1]
        action = Action(ActionKind.PROFILE, worker, upload.sha256, context=(commit, batches))
        worker.inflight[action.id] = action
        commit.profile_action = action.id
        commit.profile_deadline = time.monotonic() + PROFILE_TIMEOUT
        self.send_action(action, time.monotonic())

    def _publish(
        self,
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

    def _fail_commit(self, commit: PendingCommit, exc: MTError) -> None:
        self.uploads.release(commit.upload)
        if commit in self.commits:
            self.commits.remove(commit)
        commit.path.unlink(missing_ok=True)
        if commit.record is not None:
            self.gc_shas.add(commit.record.sha256)
        self._reply_error(commit.envelope, Cmd.UPLOAD_COMMIT, commit.client_id, exc)

    def collect_garbage(self) -> None:
        in_commit = {c.upload.sha256 for c in self.commits}
        for sha in list(self.gc_shas):
            if self.registry.sha_in_use(sha) or sha in in_commit or self.scheduler.has_work(sha):
                continue
            self.gc_shas.discard(sha)
            self.registry.store.remove(sha)
            for worker in self.workers.values():  # from both tiers: its pages are freed too
                worker.loaded.pop(sha, None)
                forget = Action(ActionKind.UNLOAD, worker, sha, context="forget")
                self.send_action(forget, time.monotonic())

    # ------------------------------------------------------------------ workers

    def on_worker_message(self, frames: list[Any]) -> None:
        try:
            envelope, body = split_envelope(frames)
            msg = parse_body(body, WORKER_TAG, WCmd, self.worker_limits)
        except MTError as exc:
            log.warning("dropped a malformed worker message: %s", exc)
            self.counters["worker_malformed"] += 1
            return
        wid = frame_bytes(envelope[0])
        now = time.monotonic()
        if msg.cmd is WCmd.READY:
            self.on_worker_ready(wid, msg, now)
            return
        worker = self.workers.get(wid)
        if worker is None:  # e.g. it was declared lost, or we restarted: make it re-register
            self.send_worker(wid, WCmd.DISCONNECT, {"reason": "unknown worker; send READY"})
            return
        worker.last_seen = now
        if msg.cmd is WCmd.HEARTBEAT:
            self.on_worker_heartbeat(worker, msg)
            return
        if msg.cmd is WCmd.FETCH_MODEL:
            self.on_fetch_model(worker, msg)
        elif msg.cmd is WCmd.DISCONNECT:
            self.lose_worker(worker, "it disconnected")
        else:
            self.on_action_result(worker, msg, now)

    def on_worker_ready(self, wid: bytes, msg: Message, now: float) -> None:
        h = msg.header
        incarnation = str(h.get("incarnation", ""))
        for old in list(self.workers.values()):  # the same process on a new socket, or again
            if old.wid == wid or (incarnation and old.incarnation == incarnation):
                self.lose_worker(old, "it registered again")
        worker = WorkerState(
            wid,
            str(h.get("name", "")),
            str(h.get("kind", "cpu")),
            int(h.get("memory_budget", 0)),
            now,
            incarnation=incarnation,
        )
        self.workers[wid] = worker
        self.scheduler.add_worker(worker)
        ready = {
            "heartbeat_interval": self.config.heartbeat_interval,
            "heartbeat_liveness": self.config.heartbeat_liveness,
        }
        self.send_worker(wid, WCmd.READY, ready)
        self.reprofile(worker)
        log.info(
            "worker %s joined (%s, budget %d bytes)", worker.name, worker.kind, worker.memory_budget
        )

    def on_worker_heartbeat(self, worker: WorkerState, msg: Message) -> None:
        tiers = msg.header.get("tiers")
        if tiers is None:
            return
        try:
            worker.tiers = wire.TierReport.from_wire(tiers)
        except MTError as exc:
            log.warning("worker %s sent bad tiers: %s", worker.name, exc)
            self.counters["worker_malformed"] += 1
        worker.restarts = int(msg.header.get("restarts", 0) or 0)

    def on_fetch_model(self, worker: WorkerState, msg: Message) -> None:
        sha = str(msg.header.get("sha256", ""))
        store = self.registry.store
        if not SHA256_HEX.fullmatch(sha) or not store.has(sha):
            self.send_worker(
                worker.wid,
                WCmd.FETCH_MODEL,
                {
                    "sha256": sha,
                    "status": int(Status.LOAD_FAILED),
                    "error": "no such model in the store",
                },
            )
            return
        self.send_worker(
            worker.wid, WCmd.FETCH_MODEL, {"sha256": sha, "status": 0}, [store.read(sha)]
        )

    def on_action_result(self, worker: WorkerState, msg: Message, now: float) -> None:
        try:
            result = wire.decode_result(msg.cmd, msg.header)
        except MTError as exc:
            log.warning("dropped a malformed result from worker %s: %s", worker.name, exc)
            self.counters["worker_malformed"] += 1
            return
        action = worker.inflight.get(result.action)
        if action is None or result.sha256 != action.sha256:
            return  # late result of an action we gave up on, or not ours at all
        del worker.inflight[action.id]
        if result.tiers is not None:
            worker.tiers = result.tiers
        self.learn(action, result)
        self.scheduler.on_result(action, result.ok, now, result.evicted)
        if result.status is wire.ActionStatus.EXEC_MODEL_MISSING:
            # The worker dropped the model (its own budget, a failed load): forget it
            # there and give its requests another go rather than failing them.
            worker.loaded.pop(action.sha256, None)
            for request in action.requests:
                self.retry_or_fail(request, now, worker.name, "no longer held the model")
        elif isinstance(result, wire.InferResult):
            self.on_infer_result(action, result, msg.payload, now)
        elif isinstance(result, wire.ProfileModelResult):
            self.on_profile_result(action, result)
        elif not result.ok:
            log.warning("worker %s failed to load %s: [%d] %s", worker.name,
                        action.sha256[:12], result.status, result.error)  # fmt: skip
        else:
            self.counters[f"loads_from_{result.tier or 'unknown'}"] += 1

    def on_infer_result(
        self, action: Action, result: wire.InferResult, payload: list[Any], now: float
    ) -> None:
        by_rid = {r.rid: r for r in action.requests}
        timing = result.timing
        frames = iter(payload)
        for item in result.results:
            request = by_rid.pop(item.rid, None)
            own = [next(frames, b"") for _ in item.outputs]
            if request is None:
                continue
            if item.status != 0:
                self.answer_error(request, error_for(item.status, str(item.error)))
                continue
            self.answer(
                request,
                {
                    "outputs": item.outputs,
                    "timing": {
                        "queue": int((request.dispatched - request.arrival) * 1e6),
                        "exec": timing.exec,
                        "worker": timing.total,
                        "total": int((now - request.arrival) * 1e6),
                    },
                    "batch": len(action.requests),
                },
                own,
            )
        for request in by_rid.values():
            self.answer_error(request, InternalError("the worker's result omitted this request"))

    def on_profile_result(self, action: Action, result: wire.ProfileModelResult) -> None:
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

    def reprofile(self, worker: WorkerState) -> None:
        """Profile, on a worker that just joined, the models published without a profile."""
        pending = {a.sha256 for w in self.workers.values() for a in w.inflight.values()
                   if a.kind is ActionKind.PROFILE}  # fmt: skip
        for record in list(self.registry.models.values()):
            if record.profile or record.sha256 in pending:
                continue
            batches = [b for b in self.config.profile_batches if b <= record.max_batch] or [1]
            action = Action(ActionKind.PROFILE, worker, record.sha256, context=(record, batches))
            worker.inflight[action.id] = action
            self.send_action(action, time.monotonic())
            pending.add(record.sha256)

    def on_reprofile_result(
        self, record: ModelRecord, result: wire.ProfileModelResult, kind: str
    ) -> None:
        if not result.ok:
            log.warning("profiling %s/%s failed: [%d] %s", record.tenant, record.name,
                        result.status, result.error)  # fmt: skip
            return
        if self.registry.get(record.tenant, record.name) is record:
            self.registry.set_profile(record, *profile_of(result, kind))
            self.seed_predictor(record)

    def purge_lost_workers(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.config.heartbeat_liveness:
                self.lose_worker(worker, f"silent for {now - worker.last_seen:.1f} s")

    def expire_actions(self, now: float) -> None:
        """Give up on actions a live worker never answered (a lost result), so no pipeline
        slot and no model stays pinned: their requests are retried or answered."""
        limit = self.config.action_timeout
        for worker in self.workers.values():
            for action in [a for a in worker.inflight.values() if now - a.sent > limit]:
                del worker.inflight[action.id]
                self.counters["actions_expired"] += 1
                log.warning("worker %s never answered %s %d; giving up after %.0f s",
                            worker.name, action.kind.name, action.id, limit)  # fmt: skip
                self.scheduler.on_result(action, False, now, [])
                for request in action.requests:
                    self.retry_or_fail(request, now, worker.name, "never answered")

    def lose_worker(self, worker: WorkerState, why: str) -> None:
        log.warning("worker %s lost: %s", worker.name, why)
        self.workers.pop(worker.wid, None)
        for action in worker.inflight.values():
            if action.kind is ActionKind.PROFILE and action.context[0] in self.commits:
                self._fail_commit(action.context[0], LoadFailed(
                    f"worker {worker.name} was lost while profiling the model ({why}); if the "
                    "model crashed it, fix the model, otherwise upload it again"))  # fmt: skip
        now = time.monotonic()
        for request in self.scheduler.on_worker_lost(worker):
            self.retry_or_fail(request, now, worker.name)
        worker.inflight.clear()

    def retry_or_fail(
        self, request: PendingRequest, now: float, worker_name: str, why: str = "was lost"
    ) -> None:
        """Queue a request again once (if its deadline allows), else answer WORKER_LOST."""
        if request.rid not in self.pending:
            return
        if request.retries >= 1 or request.deadline <= now:
            self.answer_error(
                request, WorkerLost(f"worker {worker_name} {why} while running this request")
            )
            return
        request.retries += 1
        try:
            self.scheduler.add_request(request, now)
        except MTError as exc:
            self.answer_error(request, exc)

    def send_heartbeats(self, now: float) -> None:
        for worker in self.workers.values():
            if now - worker.last_sent > self.config.heartbeat_interval:
                self.send_worker(worker.wid, WCmd.HEARTBEAT, {})
                worker.last_sent = now

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> None:
        actions = self.scheduler.schedule(now)
        failed, self.scheduler.failed = self.scheduler.failed, []
        for request, exc in failed:
            self.answer_error(request, exc)
        for action in actions:
            self.send_action(action, now)

    def seed_predictor(self, record: ModelRecord) -> None:
        """Start the predictor's windows for a model from its upload profile."""
        samples = record.measurements.get("samples") or {}
        kind = str(record.measurements.get("kind", "cpu"))
        self.predictor.seed_exec(record.sha256, kind, {int(b): t for b, t in samples.items()})

    def learn(self, action: Action, result: wire.Result) -> None:
        """Feed a measured duration to the predictor (exec per batch, load per tier)."""
        kind = action.worker.kind
        if isinstance(result, wire.InferResult) and result.ok and action.requests:
            rows = sum(r.batch for r in action.requests)
            self.predictor.observe_exec(action.sha256, kind, rows, result.timing.exec)
        elif isinstance(result, wire.LoadModelResult) and result.ok and result.tier != "device":
            size = next((m.size for m in self.registry.models.values()
                         if m.sha256 == action.sha256), 0)  # fmt: skip
            self.predictor.observe_load(action.sha256, kind, result.tier, size,
                                        result.timing.load)  # fmt: skip

    def expected_duration(self, action: Action) -> float:
        """The predictor's seconds for an INFER (0.0 when it knows nothing yet)."""
        if action.kind is not ActionKind.INFER or not action.requests:
            return action.expected_duration
        rows = sum(r.batch for r in action.requests)
        us = self.predictor.exec_us(action.sha256, action.worker.kind, rows)
        return (us or 0.0) / 1e6

    def send_action(self, action: Action, now: float) -> None:
        action.sent = now
        action.expected_duration = self.expected_duration(action)
        message = wire_action(action, now)
        payload = [f for r in action.requests for f in r.frames]
        self.send_worker(action.worker.wid, message.cmd, message.to_header(), payload)
        action.worker.last_sent = now
        if action.kind is ActionKind.LOAD:
            self.counters["loads"] += 1
        elif action.kind is ActionKind.UNLOAD:
            self.counters["evictions"] += 1

    def send_worker(
        self, wid: bytes, cmd: WCmd, header: dict[str, Any], payload: list[Any] = ()
    ) -> None:
        send_frames(self.backend, [wid, *build(WORKER_TAG, cmd, header, payload)])


def wire_action(action: Action, now: float) -> wire.Action:
    """The worker-protocol struct of a controller action; windows relative to `now`."""
    latest = action.latest - now if not math.isinf(action.latest) else math.inf
    common = (action.id, action.sha256, 0.0, latest, action.expected_duration)
    if action.kind is ActionKind.INFER:
        requests = [[r.rid, r.wire_inputs] for r in action.requests]
        return wire.Infer(*common, requests=requests)
    if action.kind is ActionKind.LOAD:
        return wire.LoadModel(*common)
    if action.kind is ActionKind.UNLOAD:
        return wire.UnloadModel(*common, forget=action.context == "forget")
    batches = action.context[1]
    return wire.ProfileModel(*common, batches=batches, samples=PROFILE_SAMPLES)


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
