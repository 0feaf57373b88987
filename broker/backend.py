"""The broker's worker side: membership, the scheduler, and the actions sent and answered.

`Backend` is mixed into `broker.broker.Broker` (see its docstring for why mixins). It keeps
worker membership (`WorkerState`) and the map of the actions sent (`actions`, by id), and
it is the only part of the broker that calls the scheduler: the other parts ask through
the verbs below (`submit`, `dispatch`, `queued`, `start_profile`, `profiling`,
`model_in_use`, `forget_model`, `describe_workers`). What each worker holds, runs and will
be free, retries, and learning from results belong to the scheduler (`broker.scheduler`).

A worker registers with READY (a second READY from the same process replaces the first).
On a secure broker it is whoever its CURVE key belongs to: a `worker` principal (the ZAP
handler admits no other role on this socket); its name is the principal's (or
`principal:name` for one of several workers sharing a key, as the simulated ones do), the
same name registering again replaces the old registration, and a key removed or rotated
ends its registration at the next tick. In insecure mode a name held by a live worker is
refused. A worker may fetch only the bytes of a model it was sent an action for, and a
result counts only from the worker its action went to. A worker is heard from at least
every heartbeat interval and is lost after `heartbeat_liveness` of silence, on
DISCONNECT, or when it registers again. Every action sent (but UNLOAD, which needs no
answer) waits in `actions` until its result comes back under the same id
from the worker it was sent to, the worker is lost, or `action_timeout` passes; the
scheduler then decides what happens to its requests (queued once more if their deadline
allows, else answered WORKER_LOST).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from broker.registry import ModelRecord
from broker.scheduler import Scheduler, make_scheduler
from broker.state import Action, ActionKind, PendingRequest, WorkerState
from mtcore import actions as wire
from mtcore.errors import InternalError, MTError, Status, error_for
from mtcore.protocol import (
    SHA256_HEX,
    WORKER_TAG,
    Message,
    WCmd,
    build,
    frame_bytes,
    frame_size,
    parse_body,
    split_envelope,
)
from mtcore.transport import send_frames

if TYPE_CHECKING:
    from broker.broker import Broker

log = logging.getLogger("mtserve.broker")

PROFILE_SAMPLES = 10  # runs measured per batch size when profiling


class Backend:
    """Workers, the scheduler, and the timed actions between them (a `Broker` mixin)."""

    def init_backend(self: Broker) -> None:
        self.workers: dict[bytes, WorkerState] = {}  # wid -> worker
        self.actions: dict[int, Action] = {}  # id -> action sent and not yet answered
        self.scheduler: Scheduler = make_scheduler(
            self.config.scheduler,
            self.config.max_queue,
            objective=self.config.objective,
            weight=self.tenant_weight,
            isolation=self.config.isolation,
            device_limit=lambda tenant: self.book_of(tenant).limits.device_bytes,
            run_limit=lambda tenant: self.book_of(tenant).limits.run_bytes,
        )  # queued requests -> actions
        self.predictor = self.scheduler.predictor  # exec and load times, learned from results
        for record in self.registry.models.values():
            self.seed_predictor(record)

    # ------------------------------------------------------------------ messages in

    def on_worker_message(self: Broker, frames: list[Any], user_id: str | None = None) -> None:
        try:
            envelope, body = split_envelope(frames)
            msg = parse_body(body, WORKER_TAG, WCmd, self.worker_limits)
        except MTError as exc:
            log.warning("dropped a malformed worker message: %s", exc)
            self.counters["worker_malformed"] += 1
            return
        wid = frame_bytes(envelope[0])
        now = time.monotonic()
        principal = self.worker_principal(user_id)
        if principal is None:  # its key was removed or rotated after the handshake
            self.refuse_worker(wid, "this connection's worker key is no longer registered")
            return
        if msg.cmd is WCmd.READY:
            self.on_worker_ready(wid, msg, now, principal)
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

    def worker_principal(self: Broker, user_id: str | None) -> str | None:
        """The worker principal behind a key ("" in insecure mode); None if not one."""
        if self.principals is None:
            return ""
        principal = self.principals.by_key.get(user_id) if user_id else None
        return principal.name if principal is not None and principal.role == "worker" else None

    def refuse_worker(self: Broker, wid: bytes, why: str) -> None:
        """Tell a peer it may not be a worker; it must not simply register again."""
        self.counters["workers_refused"] += 1
        worker = self.workers.get(wid)
        if worker is not None:
            self.lose_worker(worker, why)
        log.warning("refused a worker connection: %s", why)
        self.send_worker(wid, WCmd.DISCONNECT, {"reason": why, "refused": True})

    def revoke_workers(self: Broker) -> None:
        """After the principals changed: end registrations whose key no longer holds."""
        for worker in list(self.workers.values()):
            if worker.key_owner and worker.key_owner not in self.principals.by_name:
                self.refuse_worker(worker.wid, f"worker key of '{worker.key_owner}' was removed")

    def on_worker_ready(
        self: Broker, wid: bytes, msg: Message, now: float, principal: str = ""
    ) -> None:
        h = msg.header
        incarnation = str(h.get("incarnation", ""))
        name = str(h.get("name", ""))[:128]
        if principal:  # secure: the key names the worker
            name = principal if name in ("", principal) else f"{principal}:{name}"
        for old in list(self.workers.values()):  # the same process on a new socket, or again
            same_name = old.name == name and old.wid != wid
            if same_name and not principal:
                self.refuse_worker(wid, f"a live worker is already named '{name}'")
                return
            if old.wid == wid or same_name or (incarnation and old.incarnation == incarnation):
                self.lose_worker(old, "it registered again")
        worker = WorkerState(
            wid,
            name,
            str(h.get("kind", "cpu")),
            int(h.get("memory_budget", 0)),
            now,
            lanes=max(1, int(h.get("exec_threads", 1) or 1)),
            incarnation=incarnation,
        )
        worker.key_owner = principal
        worker.run_memory = max(0, int(h.get("run_memory", 0) or 0))
        self.workers[wid] = worker
        self.scheduler.add_worker(worker, now)
        ready = {
            "heartbeat_interval": self.config.heartbeat_interval,
            "heartbeat_liveness": self.config.heartbeat_liveness,
        }
        self.send_worker(wid, WCmd.READY, ready)
        self.reprofile(worker)
        log.info(
            "worker %s joined (%s, budget %d bytes)", worker.name, worker.kind, worker.memory_budget
        )

    def on_worker_heartbeat(self: Broker, worker: WorkerState, msg: Message) -> None:
        tiers = msg.header.get("tiers")
        if tiers is None:
            return
        try:
            worker.report(wire.TierReport.from_wire(tiers))
        except MTError as exc:
            log.warning("worker %s sent bad tiers: %s", worker.name, exc)
            self.counters["worker_malformed"] += 1
        worker.restarts = int(msg.header.get("restarts", 0) or 0)

    def on_fetch_model(self: Broker, worker: WorkerState, msg: Message) -> None:
        sha = str(msg.header.get("sha256", ""))
        store = self.registry.store
        sent = any(a.worker is worker and a.sha256 == sha for a in self.actions.values())
        if not sent:  # a model's bytes go only to a worker told to load or run it
            self.counters["worker_fetch_refused"] += 1
        if not sent or not SHA256_HEX.fullmatch(sha) or not store.has(sha):
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
        data = store.read(sha)
        self.meter.shared(self.registry.owners(sha), fetched=len(data))
        self.send_worker(worker.wid, WCmd.FETCH_MODEL, {"sha256": sha, "status": 0}, [data])

    def on_action_result(self: Broker, worker: WorkerState, msg: Message, now: float) -> None:
        try:
            result = wire.decode_result(msg.cmd, msg.header)
        except MTError as exc:
            log.warning("dropped a malformed result from worker %s: %s", worker.name, exc)
            self.counters["worker_malformed"] += 1
            return
        action = self.actions.get(result.action)
        if action is None or action.worker is not worker or result.sha256 != action.sha256:
            if action is not None:  # another worker's action: never this worker's to answer
                self.counters["worker_forged"] += 1
            return  # late result of an action we gave up on, or not ours at all
        del self.actions[action.id]
        if result.tiers is not None:
            worker.report(result.tiers)
        if result.ok and isinstance(result, wire.LoadModelResult):
            self.counters[f"loads_from_{result.tier or 'unknown'}"] += 1
            owners = self.registry.owners(action.sha256)
            self.meter.shared(owners, load_ms=result.timing.load / 1e3)
        answers = self.scheduler.on_result(action, result, now)
        if isinstance(result, wire.InferResult):
            if answers:  # else the scheduler took the requests back (retried or failed)
                self.on_infer_result(action, result, msg.payload, now)
        elif isinstance(result, wire.ProfileModelResult):
            self.on_profile_result(action, result)
        elif not result.ok:
            log.warning("worker %s failed to load %s: [%d] %s", worker.name,
                        action.sha256[:12], result.status, result.error)  # fmt: skip

    def on_infer_result(
        self: Broker, action: Action, result: wire.InferResult, payload: list[Any], now: float
    ) -> None:
        by_rid = {r.rid: r for r in action.requests}
        timing = result.timing
        rows = sum(r.batch for r in action.requests)
        out_bytes = sum(frame_size(f) for f in payload)
        model = action.requests[0].model if action.requests else None
        if model is not None and rows and out_bytes > model.reply_row_bytes * rows:
            model.reply_row_bytes = -(-out_bytes // rows)  # learned: replies' quota charge
        frames = iter(payload)
        for item in result.results:
            request = by_rid.pop(item.rid, None)
            own = [next(frames, b"") for _ in item.outputs]
            if request is None:
                continue
            out_bytes = sum(frame_size(f) for f in own) if item.status == 0 else 0
            share = request.batch / rows if rows else 1.0
            self.meter.answered(request.who, timing.exec * share / 1e3, request.nbytes, out_bytes)
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

    # ------------------------------------------------------------------ liveness

    def purge_lost_workers(self: Broker, now: float) -> None:
        for worker in list(self.workers.values()):
            if now - worker.last_seen > self.config.heartbeat_liveness:
                self.lose_worker(worker, f"silent for {now - worker.last_seen:.1f} s")

    def expire_actions(self: Broker, now: float) -> None:
        """Give up on actions a live worker never answered (a lost result), so no pipeline
        slot and no model stays pinned: the scheduler retries or fails their requests."""
        limit = self.config.action_timeout
        for action in [a for a in self.actions.values() if now - a.sent > limit]:
            del self.actions[action.id]
            self.counters["actions_expired"] += 1
            log.warning("worker %s never answered %s %d; giving up after %.0f s",
                        action.worker.name, action.kind.name, action.id, limit)  # fmt: skip
            self.scheduler.on_result(action, None, now)
            if action.kind is ActionKind.PROFILE:
                self.profile_lost(action, f"it did not answer within {limit:.0f} s")

    def lose_worker(self: Broker, worker: WorkerState, why: str) -> None:
        log.warning("worker %s lost: %s", worker.name, why)
        self.workers.pop(worker.wid, None)
        for action in self.scheduler.remove_worker(worker, time.monotonic()):
            self.actions.pop(action.id, None)
            if action.kind is ActionKind.PROFILE:
                self.profile_lost(action, why)

    def send_heartbeats(self: Broker, now: float) -> None:
        for worker in self.workers.values():
            if now - worker.last_sent > self.config.heartbeat_interval:
                self.send_worker(worker.wid, WCmd.HEARTBEAT, {})
                worker.last_sent = now

    # ------------------------------------------------------------------ the scheduler

    def submit(self: Broker, request: PendingRequest, now: float) -> None:
        """Queue a new request; raises DeadlineUnmeetable/Overloaded to refuse it."""
        self.scheduler.add_request(request, now)

    def cancel(self: Broker, request: PendingRequest) -> None:
        """A request was answered without the scheduler (abandoned, or shutting down)."""
        self.scheduler.cancel(request)

    def dispatch(self: Broker, now: float) -> None:
        """Send what the scheduler decides now; answer what it gave up on."""
        actions = self.scheduler.schedule(now)
        failed, self.scheduler.failed = self.scheduler.failed, []
        for request, exc in failed:
            self.answer_error(request, exc)
        for action in actions:
            self.send_action(action, now)

    def next_wakeup(self: Broker, now: float) -> float:
        """When the scheduler next has work of its own (an expiry, an action due)."""
        return self.scheduler.next_wakeup(now)

    def queued(self: Broker) -> int:
        return self.scheduler.queued()

    def model_in_use(self: Broker, sha256: str) -> bool:
        """True while requests of that model are queued or running."""
        return self.scheduler.has_work(sha256)

    def start_profile(
        self: Broker, sha256: str, max_batch: int, context: Any, worker: WorkerState | None = None
    ) -> Action | None:
        """Send a PROFILE of a model (batch sizes up to `max_batch`) to `worker`, or to the
        least busy one; None when no worker is there. Its result comes back to
        `on_profile_result` with `context` (the commit or record it is for)."""
        batches = [b for b in self.config.profile_batches if b <= max_batch] or [1]
        action = self.scheduler.place_profile(sha256, (context, batches), worker)
        if action is not None:
            self.send_action(action, time.monotonic())
        return action

    def profiling(self: Broker) -> set[str]:
        """The models a PROFILE is in flight for, on any worker."""
        return {a.sha256 for a in self.actions.values() if a.kind is ActionKind.PROFILE}

    def forget_model(self: Broker, sha256: str) -> None:
        """Have every worker drop a model from both tiers (its bytes are gone)."""
        now = time.monotonic()
        for action in self.scheduler.forget_model(sha256):
            self.send_action(action, now)

    def bound_host_memory(self: Broker, blobs: dict[str, tuple[list[str], int]]) -> None:
        """Have workers drop host-tier copies of the models of a tenant over its host
        bound, least recently used first, from what their tier reports say they hold.
        `blobs`: sha256 -> (owners, size), as the registry has them."""
        held: dict[str, list[tuple[WorkerState, str, int]]] = {}
        for worker in self.workers.values():
            tiers = worker.tiers
            for sha in tiers.host_models if tiers is not None else ():
                owners, size = blobs.get(sha, ((), 0))
                for tenant in owners:
                    held.setdefault(tenant, []).append((worker, sha, size))
        now = time.monotonic()
        for tenant, copies in held.items():
            limit = self.book_of(tenant).limits.host_bytes
            over = sum(size for _, _, size in copies) - limit
            for worker, sha, size in copies if limit else ():  # least recent first per worker
                if over <= 0:
                    break
                action = self.scheduler.drop_host_copy(worker, sha)
                if action is not None:
                    self.send_action(action, now)
                    over -= size

    def describe_workers(self: Broker) -> list[dict[str, Any]]:
        return [w.describe() | self.scheduler.describe(w) for w in self.workers.values()]

    def seed_predictor(self: Broker, record: ModelRecord) -> None:
        """A model was published (or found at start): its profile seeds the predictions."""
        self.scheduler.seed(record)

    # ------------------------------------------------------------------ messages out

    def send_action(self: Broker, action: Action, now: float) -> None:
        action.sent = now
        if action.kind is not ActionKind.UNLOAD:  # an UNLOAD needs no answer
            self.actions[action.id] = action
        message = wire_action(action, now)
        payload = [f for r in action.requests for f in r.frames]
        self.send_worker(action.worker.wid, message.cmd, message.to_header(), payload)
        action.worker.last_sent = now
        if action.kind is ActionKind.LOAD:
            self.counters["loads"] += 1
        elif action.kind is ActionKind.UNLOAD:
            self.counters["evictions"] += 1

    def send_worker(
        self: Broker, wid: bytes, cmd: WCmd, header: dict[str, Any], payload: list[Any] = ()
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
