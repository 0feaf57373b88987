"""ext._frames (C, straight on libzmq) and its twin, held to one spec over real sockets."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import zmq

from ext import _frames_py
from mtcore.transport import NOBLOCK, make_socket

C_BUILT = importlib.util.find_spec("ext._frames") is not None
SMALL = _frames_py.RECV_COPY_BELOW


@pytest.fixture(params=["c", "py"])
def impl(request: pytest.FixtureRequest):
    if request.param == "py":
        return _frames_py
    if not C_BUILT:
        pytest.skip("ext._frames is not built: python setup.py build_ext --inplace")
    from ext import _frames

    return _frames


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER)
    router.bind("inproc://frames")
    dealer = make_socket(ctx, zmq.DEALER)
    dealer.connect("inproc://frames")
    yield router, dealer
    router.close()
    dealer.close()
    ctx.term()


def _content(frame) -> bytes:
    return frame if type(frame) is bytes else frame.bytes


def test_the_twins_share_their_thresholds(impl) -> None:
    assert impl.RECV_COPY_BELOW == _frames_py.RECV_COPY_BELOW
    assert impl.SEND_COPY_BELOW == _frames_py.SEND_COPY_BELOW


def test_small_frames_arrive_as_bytes_and_large_as_zmq_frames(impl, pair) -> None:
    router, dealer = pair
    sent = [b"", b"x", b"s" * (SMALL - 1), b"L" * SMALL, b"M" * (1 << 20)]
    impl.send_frames(dealer, sent)
    got = impl.recv_frames(router)
    assert len(got) == 1 + len(sent)  # the routing id comes first
    assert type(got[0]) is bytes and len(got[0]) > 0
    body = got[1:]
    assert [type(f) is bytes for f in body] == [True, True, True, False, False]
    assert all(isinstance(f, zmq.Frame) for f in body[3:])
    assert [_content(f) for f in body] == sent


def test_received_frames_forward_intact_and_route_back(impl, pair) -> None:
    router, dealer = pair
    big = np.arange(100_000, dtype=np.float32)
    impl.send_frames(dealer, [b"", b"head", memoryview(big).cast("B")])
    got = impl.recv_frames(router)
    impl.send_frames(router, got)  # routing id (bytes) + a zmq.Frame forwarded as is
    back = impl.recv_frames(dealer)
    assert _content(back[1]) == b"head"
    assert np.array_equal(np.frombuffer(_content(back[2]), np.float32), big)


def test_buffers_of_every_kind_are_sent(impl, pair) -> None:
    router, dealer = pair
    arr = np.arange(10, dtype=np.int64)
    frames = [
        b"",
        bytearray(b"ba"),
        memoryview(b"mv"),
        arr,
        b"B" * (_frames_py.SEND_COPY_BELOW + 1),
    ]
    impl.send_frames(dealer, frames)
    got = [_content(f) for f in impl.recv_frames(router)[1:]]
    assert got == [b"", b"ba", b"mv", arr.tobytes(), frames[-1]]


def test_noblock_on_an_empty_socket_raises_again(impl, pair) -> None:
    router, _ = pair
    with pytest.raises(zmq.Again):
        impl.recv_frames(router, NOBLOCK)


def test_messages_keep_their_boundaries(impl, pair) -> None:
    router, dealer = pair
    for i in range(50):
        impl.send_frames(dealer, [b"", str(i).encode(), b"y" * i])
    for i in range(50):
        got = impl.recv_frames(router, NOBLOCK if i else 0)
        assert [_content(f) for f in got[1:]] == [b"", str(i).encode(), b"y" * i]
    with pytest.raises(zmq.Again):
        impl.recv_frames(router, NOBLOCK)


def test_a_closed_socket_raises_zmq_error(impl) -> None:
    ctx = zmq.Context()
    sock = make_socket(ctx, zmq.DEALER)
    sock.close()
    with pytest.raises(zmq.ZMQError):
        impl.recv_frames(sock, NOBLOCK)
    with pytest.raises(zmq.ZMQError):
        impl.send_frames(sock, [b"x"])
    ctx.term()


def test_a_non_socket_is_refused(impl) -> None:
    with pytest.raises((TypeError, AttributeError)):
        impl.recv_frames(object())


class _Interrupted(Exception):
    pass


def test_a_signal_handler_interrupts_a_blocking_receive(impl, pair) -> None:
    import signal

    router, _ = pair

    def handler(signum, frame):
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(_Interrupted):
            impl.recv_frames(router)  # blocks: nothing was sent
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_bad_frame_sends_nothing_and_the_next_message_is_whole(impl, pair) -> None:
    router, dealer = pair
    with pytest.raises(TypeError):
        impl.send_frames(dealer, [b"", b"first-part", object()])
    impl.send_frames(dealer, [b"", b"next"])
    got = impl.recv_frames(router)
    assert [_content(f) for f in got[1:]] == [b"", b"next"]
    with pytest.raises(zmq.Again):
        impl.recv_frames(router, NOBLOCK)


def test_the_c_frames_use_pyzmqs_libzmq_even_with_another_loaded() -> None:
    """A second libzmq in the process (the system's) must not be the one called."""
    import ctypes.util
    import os
    import subprocess
    import sys

    if not C_BUILT:
        pytest.skip("ext._frames is not built")
    system = ctypes.util.find_library("zmq")
    if system is None:
        pytest.skip("no system libzmq to load beside pyzmq's")
    probe = f"""
import ctypes, zmq
ctypes.CDLL({system!r})  # loaded before ext: its symbols come first in the process
from ext import _frames
ctx = zmq.Context()
a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
a.bind("inproc://two-libzmq"); b.connect("inproc://two-libzmq")
_frames.send_frames(a, [b"hello", b"x" * 5000])
got = _frames.recv_frames(b)
assert got[0] == b"hello" and got[1].bytes == b"x" * 5000, got
print("ok")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def _zap_answer(zap: zmq.Socket, user_id: bytes) -> None:
    """Be the ZAP handler for one handshake: accept it, naming the peer `user_id`."""
    assert zap.poll(10_000), "no ZAP request: the CURVE handshake never started"
    request = zap.recv_multipart()
    zap.send_multipart([b"1.0", request[1], b"200", b"OK", user_id, b""])


def test_recv_from_names_the_authenticated_sender(impl) -> None:
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    router = make_socket(ctx, zmq.ROUTER)
    router.curve_server = True
    router.curve_secretkey = server_secret
    router.zap_domain = b"test"
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = make_socket(ctx, zmq.DEALER)
    dealer.curve_serverkey = server_public
    dealer.curve_publickey = client_public
    dealer.curve_secretkey = client_secret
    dealer.connect(f"tcp://127.0.0.1:{port}")
    plain = make_socket(ctx, zmq.ROUTER)
    plain.bind("inproc://plain")
    plain_dealer = make_socket(ctx, zmq.DEALER)
    plain_dealer.connect("inproc://plain")
    try:
        impl.send_frames(dealer, [b"", b"hello", b"L" * SMALL])
        _zap_answer(zap, b"alice-key")
        assert router.poll(10_000)
        user_id, frames = impl.recv_from(router)
        assert user_id == "alice-key"
        assert [_content(f) for f in frames[1:]] == [b"", b"hello", b"L" * SMALL]
        impl.send_frames(plain_dealer, [b"", b"x"])
        user_id, frames = impl.recv_from(plain)
        assert user_id is None and _content(frames[-1]) == b"x"
        with pytest.raises(zmq.Again):
            impl.recv_from(plain, NOBLOCK)
    finally:
        for sock in (zap, router, dealer, plain, plain_dealer):
            sock.close(linger=0)
        ctx.term()
