"""The broker's busy-poll window (--spin-us): polls without sleeping only just after a message."""

from __future__ import annotations

import threading
import time

import zmq

from broker.broker import Broker
from mtcore.config import BrokerConfig
from mtcore.protocol import TAG, Cmd, build
from mtcore.transport import make_socket, recv_frames, send_frames


def _run_broker(tmp_path, spin_us: int) -> list[tuple[float, float]]:
    """(time, poll timeout) of every poll of a broker answering one PING."""
    ctx = zmq.Context()
    config = BrokerConfig(frontend="inproc://spin-f", backend="inproc://spin-b",
                          state_dir=tmp_path, spin_us=spin_us)  # fmt: skip
    polls: list[tuple[float, float]] = []
    made: list[Broker] = []
    ready = threading.Event()

    def serve() -> None:  # the broker's SQLite connection belongs to its own thread
        broker = Broker(config, ctx)
        poll = broker.poller.poll

        def recording_poll(timeout: float = -1) -> list:
            polls.append((time.monotonic(), timeout))
            return poll(timeout)

        broker.poller.poll = recording_poll  # type: ignore[method-assign]
        made.append(broker)
        ready.set()
        broker.mediate()

    loop = threading.Thread(target=serve)
    loop.start()
    assert ready.wait(30)
    broker = made[0]
    tenant = make_socket(ctx, zmq.DEALER)
    tenant.connect("inproc://spin-f")
    try:
        time.sleep(0.15)
        sent = time.monotonic()
        send_frames(tenant, build(TAG, Cmd.PING, {"id": 1}))
        assert tenant.poll(5000)
        assert recv_frames(tenant)[1] == TAG
        time.sleep(0.3)
    finally:
        broker.stop()
        loop.join(10)
        tenant.close()
        ctx.term()
    return [(t - sent, timeout) for t, timeout in polls]


def test_the_broker_busy_polls_inside_its_window_only(tmp_path) -> None:
    polls = _run_broker(tmp_path, spin_us=50_000)
    before = [timeout for t, timeout in polls if t < 0]
    spinning = [t for t, timeout in polls if timeout == 0]
    assert before and all(timeout > 0 for timeout in before)  # idle: it sleeps
    assert len(spinning) > 10  # after the PING it polls without sleeping...
    # ...for the 50 ms window (twice that allows for a stalled VM; spinning on would
    # span the whole 0.3 s the test waits)
    assert max(spinning) - min(spinning) < 0.1
    assert polls[-1][1] > 0  # and then sleeps again


def test_without_spin_the_broker_never_busy_polls(tmp_path) -> None:
    polls = _run_broker(tmp_path, spin_us=0)
    assert polls and all(timeout > 0 for _, timeout in polls)
