"""The broker: tenant frontend, worker backend and the controller, in one `mediate()` loop.

One thread owns both ROUTER sockets. Every turn it reads what arrived (bounded batches
from each socket), lets the scheduler turn queues into actions, sends them, and on a
timer purges lost workers, sends heartbeats and expires what waited too long. Tensor
frames are forwarded zero-copy; the broker reads only headers. Every tenant request gets
exactly one answer: answers go through `answer()`, which pops the request from the
table of in-flight requests, so a second answer is impossible.

`Broker` is one object whose verbs live in one module per responsibility:

- `broker/frontend.py` (`Frontend`): tenant messages in, decoded once, and their handlers;
- `broker/commits.py` (`Commits`): an upload's commit from validation to publication,
  profiles of published models, and the blobs nothing needs any more;
- `broker/backend.py` (`Backend`): workers, the scheduler and the actions it emits; the
  only part that calls the scheduler or touches a worker's `loaded` and `inflight`;
- `broker/status.py` (`StatusReport`): what STATUS reports;
- here: the loop (`mediate`, `turn`, `tick`, `shutdown`) and the one way back to tenants
  (`reply`, `answer`).

They are mixins, not collaborator objects, because every request crosses them all: a
handler submits to the scheduler, a worker's result answers a tenant, a lost worker fails
a commit. Collaborators would each hold the broker and call back through it; as mixins,
each step is a method of the one broker, and a request's path reads from the names:
`on_client_message` -> `on_infer` -> `submit` -> `dispatch` -> `send_action` ->
`on_worker_message` -> `on_action_result` -> `on_infer_result` -> `answer`. Each part
declares the state it owns in its `init_*` method; methods annotate `self: Broker`.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import zmq

from broker.auth import ZapHandler
from broker.backend import Backend
from broker.commits import Commits
from broker.frontend import Frontend
from broker.metering import Meter
from broker.principals import Principals, broker_key
from broker.quotas import TenantBook
from broker.registry import Registry
from broker.replies import REPLY_HWM, ReplyQueue
from broker.state import PendingRequest
from broker.status import StatusReport
from broker.uploads import Uploads
from ext import RequestTable
from mtcore.config import BrokerConfig
from mtcore.errors import DeadlineExpired, InternalError, MTError, ShuttingDown
from mtcore.keys import KeyFile
from mtcore.protocol import TAG, Cmd, Limits, encode_header
from mtcore.transport import NOBLOCK, make_socket, recv_from

log = logging.getLogger("mtserve.broker")

TICK = 0.05  # seconds between housekeeping passes
COMMIT_POLL = 0.005  # seconds between checks of commits being validated off the loop
# Messages read per loop turn. Tenant requests come in small gulps so that worker
# results (and the dispatch they enable) are never stuck behind a long tenant backlog.
FRONTEND_BATCH = 32
BACKEND_BATCH = 256


class Broker(Frontend, Commits, Backend, StatusReport):
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
        self.registry = Registry(config.state_dir)  # models: SQLite + blobs
        # Secure (the default): CURVE on both sockets, keys checked by the ZAP handler,
        # which must be bound before them. Insecure: neither, by the operator's choice.
        self.principals: Principals | None = None
        self.zap: ZapHandler | None = None
        self.server_key: KeyFile | None = None
        if not config.insecure:
            self.principals = Principals(self.registry.db)
            self.principals_seen = self.principals.generation
            self.zap = ZapHandler(self.ctx, self.principals)
            self.server_key = broker_key(config.state_dir)
        self.frontend = self._bind(config.frontend, self.limits.max_frame_bytes, "tenant")
        self.replies = ReplyQueue(self.frontend)  # answers a tenant does not read yet
        self.backend = self._bind(config.backend, self.worker_limits.max_frame_bytes, "worker")
        self.poller = zmq.Poller()  # the sockets `turn` waits on
        self.poller.register(self.frontend, zmq.POLLIN)
        self.poller.register(self.backend, zmq.POLLIN)
        if self.zap is not None:
            self.poller.register(self.zap.sock, zmq.POLLIN)
        self.uploads = Uploads(config.state_dir / "uploads", config.max_model_bytes)
        self.meter = Meter(self.registry.db)  # usage per tenant, added to the registry
        self.pending = RequestTable()  # rid -> PendingRequest, until answered
        self.pending_bytes = 0  # input bytes those requests hold
        self.counters: Counter[str] = Counter()  # messages by command, loads, evictions
        self.answered: Counter[int] = Counter()  # tenant replies by status code
        self.started = time.monotonic()
        self._next_tick = 0.0
        self._stopping = False
        # Busy-polling after a message saves the wake-up of a sleeping thread on the
        # answer that usually follows (a worker's result, a tenant's next request).
        self._spin_s = config.spin_us / 1e6
        self._spin_until = 0.0
        self.init_backend()  # workers, predictor, scheduler
        self.init_commits()  # validator, commits in progress, blobs to collect
        self.init_frontend()  # handlers, request ids

    def _bind(self, address: str, max_frame: int, domain: str) -> zmq.Socket:
        sock = make_socket(self.ctx, zmq.ROUTER)
        # A frame far over the limit is not worth reading to answer TOO_LARGE: ZeroMQ
        # drops that connection instead, before buffering the frame.
        sock.setsockopt(zmq.MAXMSGSIZE, 4 * max_frame)
        if domain == "tenant":  # replies beyond this wait, accounted, in the ReplyQueue
            sock.setsockopt(zmq.SNDHWM, REPLY_HWM)
        if self.server_key is not None:
            self.server_key.apply_server(sock, domain)
        sock.bind(address)
        return sock

    # ------------------------------------------------------------------ loop

    def mediate(self) -> None:
        """Serve until `stop()`; then answer what is left with SHUTTING_DOWN."""
        log.info(
            "broker serving tenants on %s, workers on %s", self.config.frontend, self.config.backend
        )
        if self.config.insecure:
            log.warning(
                "INSECURE MODE: no authentication. Any peer that reaches %s can act as any "
                "tenant (the `tenant` header field is trusted) and any peer that reaches %s "
                "can register as a worker. Use it only on loopback, for tests and demos.",
                self.config.frontend, self.config.backend,
            )  # fmt: skip
        try:
            while not self._stopping:
                now = time.monotonic()
                if self._spin_until > now:
                    self.turn(0)  # busy-poll: the next message is likely close
                else:
                    self.turn(self.idle_ms(now))
        finally:
            self.shutdown()

    def idle_ms(self, now: float) -> float:
        """How long the loop may sleep when no message comes: until the scheduler's next
        planned action or expiry (at once if that is due), or else at least a millisecond
        until the next housekeeping tick or commit check. poll() takes whole ms."""
        until = self._next_tick if not self.commits else min(self._next_tick, now + COMMIT_POLL)
        housekeeping = max(1, math.ceil((until - now) * 1000))
        planned = self.next_wakeup(now)
        if planned - now >= housekeeping / 1000:
            return housekeeping
        return max(0, math.ceil((planned - now) * 1000))

    def turn(self, timeout_ms: float) -> None:
        """One pass of the loop: wait for messages, handle them, housekeeping, dispatch."""
        events = dict(self.poller.poll(timeout_ms))
        if events and self._spin_s:
            self._spin_until = time.monotonic() + self._spin_s
        if self.zap is not None and self.zap.sock in events:
            self.zap.handle_all()  # handshakes: before the messages they let in
        if self.replies.backlogs:
            self.replies.flush()
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

    def _drain(
        self, sock: zmq.Socket, handle: Callable[[list[Any], str | None], None], limit: int
    ) -> None:
        for _ in range(limit):
            try:
                user_id, frames = recv_from(sock, NOBLOCK)  # user_id: the sender's key
            except zmq.Again:
                return
            try:
                handle(frames, user_id)
            except Exception:  # a bug must not stop the broker; the request was answered
                log.exception("unhandled error while handling a message")
                self.counters["internal_errors"] += 1

    def stop(self, *_: Any) -> None:
        self._stopping = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def tick(self, now: float) -> None:
        """Housekeeping: keys changed outside, lost workers, heartbeats, expiries, garbage."""
        self.refresh_principals()
        self.purge_lost_workers(now)
        self.expire_actions(now)
        self.send_heartbeats(now)
        self.expire_answers(now)
        self.uploads.expire(now, self.config.upload_timeout)
        self.expire_profiles(now)
        self.collect_garbage()
        self.meter_memory(now)
        self.meter.flush(now)

    def refresh_principals(self) -> None:
        """Re-read keys, limits and grants if `mtserve tenant` changed them."""
        if self.principals is None:
            return
        self.principals.refresh()  # the ZAP handler may have re-read it already: compare
        if self.principals.generation != self.principals_seen:
            self.principals_seen = self.principals.generation
            self.revoke_workers()
            self.refresh_books()
            self.registry.load_shares()  # `mtserve tenant remove` drops the removed's grants

    def meter_memory(self, now: float) -> None:
        """Charge each tenant for the bytes of its models the workers say they hold."""
        if not self.meter.due(now):
            return
        blobs = self.registry.owners_by_sha()
        held = []
        for worker in self.workers.values():
            tiers = worker.tiers
            if tiers is None:
                continue
            for tier, shas in (("device", tiers.device_models), ("host", tiers.host_models)):
                held += [(tier, *blobs[sha]) for sha in shas if sha in blobs]
        self.meter.sample(now, held)
        self.bound_host_memory(blobs)

    def shutdown(self) -> None:
        error = ShuttingDown("the broker is stopping; retry against its replacement")
        for key in self.pending.keys():  # noqa: SIM118 (a RequestTable, not a dict)
            request = self.pending.pop(key)
            self.settle(request)
            self.reply_error(request.envelope, Cmd.INFER, request.client_id, error)
        self.replies.flush()
        self.close_commits(error)
        self.meter.flush(time.monotonic(), force=True)
        self.uploads.close()
        self.registry.close()
        self.pending.close()
        self.frontend.close(linger=100)
        self.backend.close(linger=0)
        if self.zap is not None:
            self.zap.close()

    # ------------------------------------------------------------------ answers

    def reply(
        self,
        envelope: list[Any],
        cmd: Cmd | bytes,
        header: dict[str, Any],
        payload: list[Any] = (),
        book: TenantBook | None = None,
    ) -> None:
        """Send a reply, or hold it (charged to `book`) while its tenant reads nothing."""
        status = header.setdefault("status", 0)
        self.answered[status] += 1
        value = cmd.value if isinstance(cmd, Cmd) else cmd
        frames = [*envelope, b"", TAG, value, encode_header(header), *payload]
        self.replies.send(frames, book)

    def reply_error(
        self, envelope: list[Any], cmd: Cmd | bytes, client_id: int | None, exc: MTError
    ) -> None:
        header: dict[str, Any] = {"status": int(exc.status), "error": exc.message}
        if client_id is not None:
            header["id"] = client_id
        self.reply(envelope, cmd, header)

    def answer(self, request: PendingRequest, header: dict[str, Any], payload: list[Any]) -> None:
        """Send the one answer of a request, unless it was answered already."""
        if self.pending.pop(request.rid, None) is None:
            return
        self.settle(request)
        header["id"] = request.client_id
        self.reply(request.envelope, Cmd.INFER, header, payload, request.book)

    def settle(self, request: PendingRequest) -> None:
        """A request leaves the table: release what it held of the broker and its tenant."""
        request.answered = True
        self.pending_bytes -= request.nbytes
        if request.book is not None:
            request.book.answered(request.reply_bytes)

    def answer_error(self, request: PendingRequest, exc: MTError) -> None:
        self.answer(request, {"status": int(exc.status), "error": exc.message}, [])

    def expire_answers(self, now: float) -> None:
        """Answer what no worker answered in time: DEADLINE_EXPIRED past its deadline and
        `answer_grace`, INTERNAL past the lifetime of a request without one. A worker that
        runs late or never answers cannot hold a request longer."""
        late = DeadlineExpired("no worker answered by the deadline (a worker late or lost)")
        abandoned = InternalError("no answer from a worker within the request's lifetime")
        for _, request in self.pending.pop_expired(now):
            self.settle(request)
            self.cancel(request)  # it may still wait in a queue (no deadline, lifetime over)
            error = late if request.deadline <= now else abandoned
            self.reply_error(request.envelope, Cmd.INFER, request.client_id, error)
