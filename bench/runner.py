"""Load drivers for `mtbench`: open loop on a schedule, closed loop, and a pipelined raw client.

Open loop follows the plan, not the answers: each request is sent at its scheduled time
whether or not earlier ones have been answered, and its latency is measured from the
*scheduled* time, so a generator that falls behind (or a server that stalls it) shows
up as latency instead of silently lowering the load (coordinated omission, as in
wrk2 and Gil Tene's talks). How late sends really were is recorded as well, and a run
whose generator fell behind says so.

`pipelined_throughput` is the fastest client this project can write in Python: one raw
DEALER, pre-encoded tensors, `window` requests in flight. It speaks MTS1, so it drives
mtserve and the bare ZeroMQ server alike; with `window=1` it is the one-at-a-time round
trip the latency scenarios report.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import sys
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TextIO

import msgpack
import numpy as np
import zmq

from bench.report import TIMEOUT_STATUS, RequestRecord, ServerSample
from bench.targets import Inputs, Target
from bench.workload import Arrival, zipf_weights
from mtcore import keys
from mtcore.protocol import TAG, Cmd, encode_header, encode_tensors, frame_bytes
from mtcore.transport import make_socket, recv_frames, send_frames

PROGRESS_EVERY_S = 0.5  # at most two progress updates a second
SAMPLE_EVERY_S = 1.0
START_LEAD_S = 0.05  # the first arrival is this far after the clock starts
LATE_WARN_MS = 5.0  # p99 send lateness above this means the generator fell behind
# asyncio's timers wake up to ~1 ms late (epoll has millisecond timeouts), so the last
# SPIN_S before a send is spent yielding to the loop instead of sleeping. Spinning costs
# CPU the server under test could use, so it is only done at rates up to SPIN_MAX_RPS,
# where it costs at most SPIN_S * rate of a core (20% at the limit).
SPIN_S = 0.001
SPIN_MAX_RPS = 200.0


# ---------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Counters the live line reads; latencies of the last second only."""

    started: float = field(default_factory=time.perf_counter)
    sent: int = 0
    answered: int = 0
    errors: int = 0
    recent: deque = field(default_factory=deque)  # (done time, latency ms) of OK answers

    def answer(self, ok: bool, latency_ms: float | None) -> None:
        self.answered += 1
        if not ok or latency_ms is None:
            self.errors += 1
            return
        self.recent.append((time.perf_counter(), latency_ms))

    def line(self) -> str:
        now = time.perf_counter()
        while self.recent and self.recent[0][0] < now - 1.0:
            self.recent.popleft()
        rate = len(self.recent)  # OK answers in the last second
        p99 = np.percentile([v for _, v in self.recent], 99) if self.recent else float("nan")
        return (
            f"\r  {now - self.started:6.1f} s  sent {self.sent:7d}  answered {self.answered:7d}"
            f"  {rate:6d} ok/s  p99(1s) {p99:8.2f} ms  errors {self.errors:5d} "
        )


async def _show_progress(progress: Progress, out: TextIO) -> None:
    try:
        while True:
            await asyncio.sleep(PROGRESS_EVERY_S)
            out.write(progress.line())
            out.flush()
    finally:
        out.write(progress.line() + "\n")
        out.flush()


async def _sample_every(
    target: Target, t0: float, samples: list[ServerSample], pool: ThreadPoolExecutor
) -> None:
    """Sample the target every second on a thread, so a slow STATUS never delays a send."""
    loop = asyncio.get_running_loop()
    while True:
        sample = await loop.run_in_executor(pool, target.sample, time.perf_counter() - t0)
        if sample is not None:
            samples.append(sample)
        await asyncio.sleep(SAMPLE_EVERY_S)


@contextlib.asynccontextmanager
async def _background(target: Target, t0: float, samples: list, progress: Progress | None):
    """Sampler and progress line for the duration of a run; one last sample at the end."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="mtbench-sampler")
    tasks = [asyncio.create_task(_sample_every(target, t0, samples, pool))]
    if progress is not None:
        tasks.append(asyncio.create_task(_show_progress(progress, sys.stderr)))
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        last = await asyncio.get_running_loop().run_in_executor(
            pool, target.sample, time.perf_counter() - t0
        )
        if last is not None:
            samples.append(last)
        pool.shutdown(wait=True)


# ---------------------------------------------------------------------------- open loop


@dataclass
class OpenLoopStats:
    """How well the generator kept to the plan (milliseconds late, at hand-off to the target)."""

    late_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        if not self.late_ms:
            return {"mean": None, "p99": None, "max": None}
        arr = np.asarray(self.late_ms)
        return {
            "mean": float(arr.mean()),
            "p99": float(np.percentile(arr, 99)),
            "max": float(arr.max()),
        }

    def fell_behind(self) -> bool:
        p99 = self.summary()["p99"]
        return p99 is not None and p99 > LATE_WARN_MS


async def _one_arrival(
    target: Target,
    arrival: Arrival,
    inputs: Inputs,
    scheduled: float,
    stats: OpenLoopStats,
    progress: Progress,
) -> RequestRecord:
    stats.late_ms.append((time.perf_counter() - scheduled) * 1e3)
    progress.sent += 1
    status, batch = await target.infer(arrival.model, inputs, arrival.deadline_ms, arrival.tenant)
    latency = (time.perf_counter() - scheduled) * 1e3 if status != TIMEOUT_STATUS else None
    progress.answer(status == 0, latency)
    return RequestRecord(
        arrival.t, latency, status, arrival.model, arrival.tenant, arrival.deadline_ms, batch
    )


async def _until(when: float, spin: float) -> None:
    """Sleep until `when` (perf_counter), spinning through the last `spin` seconds."""
    delay = when - time.perf_counter() - spin
    if delay > 0:
        await asyncio.sleep(delay)
    while time.perf_counter() < when:
        await asyncio.sleep(0)  # lets answers in while waiting


def _unanswered(arrival: Arrival) -> RequestRecord:
    return RequestRecord(
        arrival.t, None, TIMEOUT_STATUS, arrival.model, arrival.tenant, arrival.deadline_ms
    )


async def _send_on_schedule(
    target: Target,
    arrivals: Sequence[Arrival],
    inputs_by_model: dict[str, Inputs],
    t0: float,
    stats: OpenLoopStats,
    progress: Progress,
) -> list[asyncio.Task]:
    """Start each arrival's task at its time; never wait for answers."""
    tasks = []
    span = arrivals[-1].t if arrivals else 0.0
    spin = SPIN_S if span > 0 and len(arrivals) / span <= SPIN_MAX_RPS else 0.0
    for arrival in arrivals:
        scheduled = t0 + arrival.t
        await _until(scheduled, spin)
        inputs = inputs_by_model[arrival.model]
        coro = _one_arrival(target, arrival, inputs, scheduled, stats, progress)
        tasks.append(asyncio.create_task(coro))
    return tasks


async def run_open_loop(
    target: Target,
    arrivals: Sequence[Arrival],
    inputs_by_model: dict[str, Inputs],
    *,
    duration: float | None = None,
    progress: bool = True,
    drain_s: float = 30.0,
    stats: OpenLoopStats | None = None,
) -> tuple[list[RequestRecord], list[ServerSample], float]:
    """Replay `arrivals` on schedule; return (records in plan order, samples, duration).

    `duration` is the plan's nominal length (default: just past the last arrival); rates
    in the report divide by it. Requests still unanswered `drain_s` after it are
    abandoned and recorded as timeouts (status -1).
    """
    arrivals = sorted(arrivals, key=lambda a: a.t)
    if duration is None:
        duration = max(1e-3, math.nextafter(arrivals[-1].t, math.inf)) if arrivals else 1e-3
    stats = stats if stats is not None else OpenLoopStats()
    prog = Progress()
    samples: list[ServerSample] = []
    t0 = time.perf_counter() + START_LEAD_S
    prog.started = t0
    async with _background(target, t0, samples, prog if progress else None):
        tasks = await _send_on_schedule(target, arrivals, inputs_by_model, t0, stats, prog)
        remaining = t0 + duration + drain_s - time.perf_counter()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, remaining))
        records = [_finish(task, arrival) for task, arrival in zip(tasks, arrivals, strict=True)]
    if stats.fell_behind():
        print(
            f"warning: the load generator fell behind: sends were up to "
            f"{stats.summary()['p99']:.1f} ms late (p99); latencies count from the "
            "scheduled time, so they include it",
            file=sys.stderr,
        )
    return records, samples, float(duration)


def _finish(task: asyncio.Task, arrival: Arrival) -> RequestRecord:
    """The task's record, or a timeout for a task cut off by the drain bound."""
    if task.done() and not task.cancelled() and task.exception() is None:
        return task.result()
    task.cancel()
    return _unanswered(arrival)


# ---------------------------------------------------------------------------- closed loop


async def run_closed_loop(
    target: Target,
    models: Sequence[str],
    inputs_by_model: dict[str, Inputs],
    *,
    clients: int,
    duration: float,
    max_requests: int,
    zipf_s: float = 0.0,
    deadline_ms: float | None = None,
    tenant: str = "bench",
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[RequestRecord], list[ServerSample], float]:
    """`clients` loops each sending its next request when the last is answered.

    Stops after `duration` seconds or `max_requests` sends, whichever comes first; the
    duration returned is the time actually spent, since a closed loop has no plan.
    Models are drawn by Zipf(`zipf_s`) over `models` (0: uniform), from one seeded RNG.
    """
    picks = _model_picks(len(models), zipf_s, seed, max_requests)
    records: list[RequestRecord] = []
    samples: list[ServerSample] = []
    prog = Progress()
    t0 = time.perf_counter()
    prog.started = t0
    stop_at = t0 + duration

    async def client() -> None:
        for index in picks:
            if time.perf_counter() >= stop_at:
                return
            model = models[index]
            sent = time.perf_counter()
            prog.sent += 1
            status, batch = await target.infer(model, inputs_by_model[model], deadline_ms, tenant)
            latency = (time.perf_counter() - sent) * 1e3 if status != TIMEOUT_STATUS else None
            prog.answer(status == 0, latency)
            records.append(
                RequestRecord(sent - t0, latency, status, model, tenant, deadline_ms, batch)
            )

    async with _background(target, t0, samples, prog if progress else None):
        await asyncio.gather(*(client() for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    records.sort(key=lambda r: r.t_send)
    return records, samples, max(elapsed, 1e-6)


def _model_picks(n: int, zipf_s: float, seed: int, limit: int) -> Iterator[int]:
    """Up to `limit` model indices by Zipf, drawn in chunks (the cap may be huge)."""
    rng = np.random.default_rng(seed)
    weights = zipf_weights(n, zipf_s)
    while limit > 0:
        chunk = min(limit, 4096)
        yield from rng.choice(n, size=chunk, p=weights).tolist()
        limit -= chunk


# ---------------------------------------------------------------------------- raw pipeline


def _infer_template(model: str, inputs: Inputs, tenant: str | None) -> tuple[dict, list[Any]]:
    descs, frames = encode_tensors(inputs)
    header: dict[str, Any] = {"model": model, "inputs": descs}
    if tenant is not None:
        header["tenant"] = tenant
    return header, frames


def _reply_status(frames: list[zmq.Frame]) -> tuple[int, int, int]:
    """(id, status, batch) of a reply, decoding only its header."""
    header = msgpack.unpackb(frame_bytes(frames[3]), raw=False)
    return int(header.get("id", -1)), int(header.get("status", 0)), int(header.get("batch", 1))


def pipelined_throughput(
    address: str,
    model: str,
    inputs: Inputs,
    *,
    n: int,
    window: int,
    tenant: str | None = "bench",
    deadline_ms: float | None = None,
    timeout: float = 60.0,
    key_file: Any = None,
) -> dict[str, Any]:
    """Send `n` requests keeping `window` in flight on one raw DEALER; time the whole run.
    With `key_file`, the DEALER authenticates with CURVE (a secure broker).

    Returns rps (answers / seconds from first send to last answer), answer counts by
    status and one `RequestRecord` per request (latency from its own send). A run with
    no reply for `timeout` seconds stops and counts the rest as timeouts.
    """
    header, payload = _infer_template(model, inputs, tenant)
    if deadline_ms is not None:
        header["deadline_ms"] = float(deadline_ms)
    prefix = [b"", TAG, Cmd.INFER.value]
    sock = make_socket(zmq.Context.instance(), zmq.DEALER)
    if key_file is not None:
        keys.read(key_file).apply_client(sock)
    sock.connect(address)
    sent_at: dict[int, float] = {}
    done: dict[int, tuple[float, int, int]] = {}  # id -> (latency ms, status, batch)
    ids = itertools.count(1)
    try:
        t0 = time.perf_counter()
        while len(done) < n:
            while len(sent_at) - len(done) < window and len(sent_at) < n:
                rid = next(ids)
                header["id"] = rid
                sent_at[rid] = time.perf_counter()
                send_frames(sock, [*prefix, encode_header(header), *payload])
            if not sock.poll(int(timeout * 1000), zmq.POLLIN):
                break
            _drain_replies(sock, sent_at, done)
        elapsed = time.perf_counter() - t0
    finally:
        sock.close(linger=0)
    return _pipeline_result(n, window, t0, elapsed, sent_at, done, model, tenant or "")


def _drain_replies(
    sock: zmq.Socket, sent_at: dict[int, float], done: dict[int, tuple[float, int, int]]
) -> None:
    """Take every reply already waiting, without blocking."""
    while True:
        try:
            frames = recv_frames(sock, zmq.NOBLOCK)
        except zmq.Again:
            return
        now = time.perf_counter()
        rid, status, batch = _reply_status(frames)
        if rid in sent_at and rid not in done:
            done[rid] = ((now - sent_at[rid]) * 1e3, status, batch)


def _pipeline_result(
    n: int,
    window: int,
    t0: float,
    elapsed: float,
    sent_at: dict[int, float],
    done: dict[int, tuple[float, int, int]],
    model: str,
    tenant: str,
) -> dict[str, Any]:
    records = []
    for rid in range(1, n + 1):
        t_send = sent_at.get(rid, t0 + elapsed) - t0
        if rid in done:
            latency, status, batch = done[rid]
            records.append(RequestRecord(t_send, latency, status, model, tenant, None, batch))
        else:
            records.append(RequestRecord(t_send, None, TIMEOUT_STATUS, model, tenant))
    statuses = Counter(r.effective_status for r in records)
    ok = statuses.get(0, 0)
    return {
        "n": n,
        "window": window,
        "answered": len(done),
        "ok": ok,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "seconds": elapsed,
        "rps": ok / elapsed if elapsed > 0 else 0.0,
        "records": records,
    }


def sequential_inprocess(run: Any, inputs: Inputs, n: int, model: str) -> dict[str, Any]:
    """Time `n` direct calls of `run(inputs)`: the in-process floor of a latency scenario."""
    records = []
    t0 = time.perf_counter()
    for _ in range(n):
        start = time.perf_counter()
        run(inputs)
        end = time.perf_counter()
        records.append(RequestRecord(start - t0, (end - start) * 1e3, 0, model))
    elapsed = time.perf_counter() - t0
    return {"n": n, "ok": n, "seconds": elapsed, "rps": n / elapsed, "records": records}
