"""The worker's threads as units: a real Worker whose broker socket is an inproc PAIR.

The test plays the broker: it submits decoded actions as the I/O thread would, pumps the
I/O thread's duties (`pump`), and reads the results the worker sends. No timing is
asserted; waits are bounded and fail loudly.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq

from bench import zoo
from ext import ActionTable
from mtcore.actions import ActionStatus, Infer, LoadModel, UnloadModel, decode_result
from mtcore.config import WorkerConfig
from mtcore.protocol import WCmd, decode_header, encode_tensor, frame_bytes
from mtcore.transport import NOBLOCK, recv_frames
from worker.executor import EXEC, ExecutorThread, Job
from worker.worker import MAX_RESTARTS, Worker

_ids = itertools.count(1)
SHA = "ab" * 32


class Harness:
    """A worker with its I/O duties pumped by the test, and the broker's end of its socket."""

    def __init__(self, config: WorkerConfig) -> None:
        self.ctx = zmq.Context()
        self.worker = Worker(config, self.ctx)
        self.peer = self.ctx.socket(zmq.PAIR)
        address = f"inproc://broker-{id(self)}"
        self.peer.bind(address)
        self.worker.broker = self.ctx.socket(zmq.PAIR)
        self.worker.broker.connect(address)
        self.worker.start_executors()
        self.fetches: list[str] = []

    def pump(self) -> None:
        w = self.worker
        while True:
            try:
                w.on_executor_message(recv_frames(w.results, NOBLOCK))
            except zmq.Again:
                break
        w.after_executors()
        w.check_executors()
        w.retry_fetches(time.monotonic())

    def messages(self, count: int, timeout: float = 30.0) -> list[tuple[WCmd, Any]]:
        """The next `count` messages the worker sends (results decoded), pumping meanwhile."""
        got: list[tuple[WCmd, Any]] = []
        end = time.monotonic() + timeout
        while len(got) < count:
            assert time.monotonic() < end, f"only {len(got)} of {count} messages: {got}"
            self.pump()
            try:
                frames = recv_frames(self.peer, NOBLOCK)
            except zmq.Again:
                time.sleep(0.005)
                continue
            cmd = WCmd(frame_bytes(frames[2]))
            header = decode_header(frames[3])
            if cmd is WCmd.FETCH_MODEL:
                self.fetches.append(header["sha256"])
                got.append((cmd, header))
            else:
                got.append((cmd, decode_result(cmd, header)))
        return got

    def close(self) -> None:
        self.worker._stopping = True
        self.worker.close()
        self.peer.close(linger=0)
        self.ctx.term()


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness(WorkerConfig(intra_op_threads=1, fetch_timeout=0.05, fetch_attempts=2,
                             host_budget=64 << 20))  # fmt: skip
    yield h
    h.close()


def infer_job(sha: str = SHA, latest: float = math.inf, generation: int = 0) -> Job:
    x = zoo.sample_inputs("tiny_add", 1)["input"]
    desc, buf = encode_tensor("input", x)
    return Job(Infer(next(_ids), sha, latest=latest, requests=[[7, [desc]]]), [buf],
               generation=generation)  # fmt: skip


def loaded(h: Harness) -> None:
    h.worker.host.prepare(SHA, zoo.model_bytes("tiny_add"))
    h.worker.submit(Job(LoadModel(next(_ids), SHA)))
    ((cmd, result),) = h.messages(1)
    assert cmd is WCmd.LOAD_MODEL and result.ok and result.tier == "host"


def test_an_infer_after_its_load_runs_once_the_load_is_done(harness: Harness) -> None:
    harness.worker.host.prepare(SHA, zoo.model_bytes("tiny_add"))
    harness.worker.submit(Job(LoadModel(next(_ids), SHA)))
    harness.worker.submit(infer_job())  # parked behind the LOAD, not failed as missing
    (c1, load), (c2, infer) = harness.messages(2)
    assert (c1, c2) == (WCmd.LOAD_MODEL, WCmd.INFER)
    assert load.ok and infer.ok and infer.results[0].status == 0
    assert infer.timing.exec > 0 and infer.timing.total >= infer.timing.exec


def test_a_window_already_missed_is_rejected_with_how_late(harness: Harness) -> None:
    loaded(harness)
    harness.worker.submit(infer_job(latest=-0.010))
    ((_, result),) = harness.messages(1)
    assert result.status is ActionStatus.EXEC_TOO_LATE
    assert "window closed" in result.error and result.results[0].status == 51


def test_jobs_of_a_forgotten_registration_are_skipped(harness: Harness) -> None:
    loaded(harness)
    harness.worker.generation += 1  # as on a DISCONNECT from the broker
    stale = infer_job(generation=harness.worker.generation - 1)
    harness.worker.put(stale)  # queued: inline runs would not check generations either way
    fresh = infer_job(generation=harness.worker.generation)
    harness.worker.put(fresh)
    ((_, result),) = harness.messages(1)
    assert result.action == fresh.action.action
    for _ in range(20):  # and the stale one gets no answer at all, now or later
        harness.pump()
        assert not harness.peer.poll(10)


def test_a_fetch_without_answer_is_retried_then_fails(harness: Harness) -> None:
    job = Job(LoadModel(next(_ids), "cd" * 32))
    harness.worker.submit(job)
    msgs = harness.messages(3)
    assert [c for c, _ in msgs] == [WCmd.FETCH_MODEL, WCmd.FETCH_MODEL, WCmd.LOAD_MODEL]
    result = msgs[2][1]
    assert result.status is ActionStatus.LOAD_FETCH_FAILED and "2 attempts" in result.error
    assert harness.worker.waiting == {} and harness.worker.fetching == {}


class Boom(BaseException):
    """Escapes the executor's handler guard: the thread dies."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_executor_is_replaced_and_its_action_answered(harness: Harness) -> None:
    loaded(harness)
    w = harness.worker
    real = w.run_exec_job

    def dies_once(job: Job) -> Any:
        w.run_exec_job = real
        raise Boom

    for thread in w.executors:
        if thread.lane == EXEC:
            thread.handle = dies_once
    w.put(infer_job())
    ((_, result),) = harness.messages(1)
    assert result.status is ActionStatus.INTERNAL and "died" in result.error
    assert w.restarts == 1 and all(t.is_alive() for t in w.executors)
    w.put(infer_job())  # the replacement serves the next one
    ((_, again),) = harness.messages(1)
    assert again.ok


def test_an_executor_takes_the_earliest_deadline_first() -> None:
    """Eligible actions leave the table by smallest `latest`; unlimited ones last, FIFO."""
    table = ActionTable(16)
    order: list[str] = []
    names: dict[int, str] = {}
    for name, latest, earliest in (("none-1", math.inf, 0.0), ("late", 50.0, 0.0),
                                   ("none-2", math.inf, 0.0), ("soon", 5.0, 0.0),
                                   ("future", 1.0, 3600.0)):  # fmt: skip
        job = Job(Infer(next(_ids), SHA, earliest=earliest, latest=latest))
        names[job.action.action] = name
        table.put(job, EXEC, job.earliest, job.latest)
    ctx = zmq.Context()
    sink = ctx.socket(zmq.PULL)
    sink.bind("inproc://sink")
    done = threading.Event()

    def handle(job: Job) -> None:
        order.append(names[job.action.action])
        if len(order) == 4:
            done.set()

    thread = ExecutorThread("t", EXEC, table, threading.Semaphore(0), handle,
                            lambda *a: None, ctx, "inproc://sink", lambda: 0)  # fmt: skip
    thread.start()
    assert done.wait(30)
    thread.stopping = True
    thread.wake.release()
    thread.join(10)
    assert order == ["soon", "late", "none-1", "none-2"]
    assert table.counts()[1] == 1  # "future" is still queued: not eligible for an hour
    table.close()
    sink.close(linger=0)
    ctx.term()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_whose_executors_keep_dying_leaves(harness: Harness) -> None:
    loaded(harness)
    w = harness.worker

    def dies(job: Job) -> Any:
        raise Boom

    for _ in range(MAX_RESTARTS + 1):
        for thread in w.executors:
            if thread.lane == EXEC:
                thread.handle = dies
        w.put(infer_job())
        ((_, result),) = harness.messages(1)
        assert result.status is ActionStatus.INTERNAL
    assert w._stopping and w.restarts == MAX_RESTARTS + 1


def test_an_unload_waits_for_the_infers_parked_behind_its_load(harness: Harness) -> None:
    """LOAD x, INFER x, UNLOAD x: the lanes run in parallel, the broker's order holds."""
    w = harness.worker
    w.host.prepare(SHA, zoo.model_bytes("tiny_add"))
    w.submit(Job(LoadModel(next(_ids), SHA)))
    w.submit(infer_job())
    w.submit(Job(UnloadModel(next(_ids), SHA)))
    (_, load), (_, infer) = harness.messages(2)
    assert load.ok and infer.ok, infer.error
    end = time.monotonic() + 10
    while SHA in w.device.models and time.monotonic() < end:
        harness.pump()  # the UNLOAD goes once the INFER is done
        time.sleep(0.01)
    assert SHA not in w.device.models
