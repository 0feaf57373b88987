"""Actions a live worker never answers are given up on, and their requests answered."""

from __future__ import annotations

import os
import threading
import time

import pytest
import zmq

from bench import zoo
from mtcore.client import Client
from mtcore.errors import DeadlineExpired, WorkerLost
from mtcore.protocol import VERSION, WORKER_TAG, WCmd, build, decode_header
from tests.conftest import start_cluster


class SilentWorker(threading.Thread):
    """Registers, heartbeats, and answers no action: a worker whose results are lost."""

    def __init__(self, ctx: zmq.Context, backend: str) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(backend)
        self.stop = threading.Event()
        self.actions: list[WCmd] = []  # actions received, in order

    def send(self, cmd: WCmd, header: dict) -> None:
        self.sock.send_multipart(build(WORKER_TAG, cmd, header))

    def run(self) -> None:
        ready = {"name": "silent", "kind": "cpu", "pid": os.getpid(), "incarnation": "silent-1",
                 "memory_budget": 1 << 30, "version": VERSION}  # fmt: skip
        self.send(WCmd.READY, ready)
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            if self.sock.poll(200):
                frames = self.sock.recv_multipart()
                cmd = WCmd(frames[2])
                if cmd not in (WCmd.READY, WCmd.HEARTBEAT):
                    self.actions.append(cmd)
                decode_header(frames[3])
            self.send(WCmd.HEARTBEAT, {})
        self.sock.close()


@pytest.mark.timeout(120)
def test_an_unanswered_infer_is_retried_then_answered(tmp_path) -> None:
    cluster = start_cluster(tmp_path, workers=0, broker_args=["--action-timeout", "1"])
    ctx = zmq.Context()
    worker = SilentWorker(ctx, cluster.backend)
    try:
        with Client(cluster.address, tenant="t", timeout=60) as client:
            client.upload_model("tiny", zoo.model_bytes("tiny_add"))  # no worker: unprofiled
            worker.start()
            with pytest.raises(WorkerLost):
                client.infer("tiny", zoo.sample_inputs("tiny_add", 1))
            status = client.status()
        assert worker.actions.count(WCmd.INFER) == 2  # sent, given up on, retried once
        assert status["actions_expired"] >= 2
    finally:
        worker.stop.set()
        worker.join(10)
        cluster.stop()
        ctx.term()


@pytest.mark.timeout(120)
def test_a_worker_that_never_answers_cannot_hold_a_request_past_its_deadline(tmp_path) -> None:
    """The tenants issue: a fake worker held a 200 ms request for 30 s. The answer now
    comes DEADLINE_EXPIRED once the deadline and its 2 s grace have passed (the action
    itself is given up only after --action-timeout, 300 s by default)."""
    cluster = start_cluster(tmp_path, workers=0)
    ctx = zmq.Context()
    worker = SilentWorker(ctx, cluster.backend)
    try:
        with Client(cluster.address, tenant="t", timeout=60) as client:
            client.upload_model("tiny", zoo.model_bytes("tiny_add"))
            worker.start()
            with pytest.raises(DeadlineExpired, match="no worker answered by the deadline"):
                client.infer("tiny", zoo.sample_inputs("tiny_add", 1), deadline_ms=200)
        assert WCmd.INFER in worker.actions  # it was sent, and never answered
    finally:
        worker.stop.set()
        worker.join(10)
        cluster.stop()
        ctx.term()
