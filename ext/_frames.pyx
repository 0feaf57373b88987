# cython: language_level=3, boundscheck=False, wraparound=False
"""Multipart send and receive straight on libzmq, under pyzmq's sockets.

Every message the broker handles costs two of these calls, and pyzmq's per-frame
`zmq.Frame` objects made them about a fifth of the broker's CPU per request (10 us to
receive a six-frame message on the development VMs). Here each frame is one
`zmq_msg_recv` into a stack message: small frames become `bytes` (one short copy),
large ones are moved into a `zmq.Frame` without a copy, so tensors are still forwarded
zero-copy. Sending copies small `bytes` into a fresh message, shares a received
`zmq.Frame`'s buffer with `zmq_msg_copy` (a reference count, no copy), and hands
anything else to pyzmq's own zero-copy send.

libzmq's functions are looked up at import through pyzmq's own extension module (so in
the very libzmq pyzmq uses), never linked: two copies of libzmq in one process would each see the
other's sockets as garbage. This module reads pyzmq's Frame and Socket structs, so it
refuses to load under another pyzmq version than the one it was built against. If the
lookup fails or the version differs the import fails, and `ext` falls back to the twin,
`_frames_py`, with a warning.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport EAGAIN, EINTR
from libc.string cimport memcpy

from zmq.backend.cython._zmq cimport Frame, Socket
from zmq.backend.cython.libzmq cimport zmq_msg_t

import zmq
import zmq.backend.cython._zmq as _pyzmq_backend

cdef extern from *:
    const char *BUILT_PYZMQ "MTSERVE_PYZMQ_VERSION"  # set by setup.py

BUILT_AGAINST = BUILT_PYZMQ.decode()
if zmq.__version__ != BUILT_AGAINST:
    raise ImportError(f"built against pyzmq {BUILT_AGAINST}, running {zmq.__version__}: rebuild")

_SugarFrame = zmq.Frame  # what pyzmq's own recv returns (a subclass of Frame)

DEF ZMQ_DONTWAIT = 1
DEF ZMQ_SNDMORE = 2

RECV_COPY_BELOW = 2048  # bytes: smaller received frames become bytes
SEND_COPY_BELOW = 64 * 1024  # bytes: smaller bytes frames are copied into the message
cdef Py_ssize_t _recv_copy_below = RECV_COPY_BELOW
cdef Py_ssize_t _send_copy_below = SEND_COPY_BELOW

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    int RTLD_NOW
    int RTLD_NOLOAD

ctypedef int (*msg_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef int (*msg_size_fn)(zmq_msg_t *msg, size_t size) noexcept nogil
ctypedef int (*msg_io_fn)(zmq_msg_t *msg, void *sock, int flags) noexcept nogil
ctypedef int (*msg_pair_fn)(zmq_msg_t *dest, zmq_msg_t *src) noexcept nogil
ctypedef void *(*msg_data_fn)(zmq_msg_t *msg) noexcept nogil
ctypedef size_t (*msg_len_fn)(const zmq_msg_t *msg) noexcept nogil
ctypedef int (*errno_fn)() noexcept nogil
ctypedef const char *(*msg_gets_fn)(const zmq_msg_t *msg, const char *prop) noexcept nogil

cdef msg_fn _msg_init
cdef msg_size_fn _msg_init_size
cdef msg_io_fn _msg_recv
cdef msg_io_fn _msg_send
cdef msg_fn _msg_close
cdef msg_pair_fn _msg_copy
cdef msg_pair_fn _msg_move
cdef msg_data_fn _msg_data
cdef msg_len_fn _msg_size
cdef msg_fn _msg_more
cdef errno_fn _errno
cdef msg_gets_fn _msg_gets


cdef void *_symbol(void *lib, bytes name) except NULL:
    cdef void *fn = dlsym(lib, name)
    if fn == NULL:
        raise ImportError(f"libzmq symbol {name.decode()} not found")
    return fn


cdef _bind_libzmq():
    global _msg_init, _msg_init_size, _msg_recv, _msg_send, _msg_close, _msg_copy
    global _msg_move, _msg_data, _msg_size, _msg_more, _errno, _msg_gets
    # pyzmq's own extension: dlsym through its handle searches it, then the libraries it
    # links, so this finds the libzmq pyzmq uses even when another one is loaded too.
    path = _pyzmq_backend.__file__.encode()
    cdef void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD)
    if lib == NULL:
        raise ImportError(f"pyzmq's backend is not loaded from {path!r}")
    _msg_init = <msg_fn>_symbol(lib, b"zmq_msg_init")
    _msg_init_size = <msg_size_fn>_symbol(lib, b"zmq_msg_init_size")
    _msg_recv = <msg_io_fn>_symbol(lib, b"zmq_msg_recv")
    _msg_send = <msg_io_fn>_symbol(lib, b"zmq_msg_send")
    _msg_close = <msg_fn>_symbol(lib, b"zmq_msg_close")
    _msg_copy = <msg_pair_fn>_symbol(lib, b"zmq_msg_copy")
    _msg_move = <msg_pair_fn>_symbol(lib, b"zmq_msg_move")
    _msg_data = <msg_data_fn>_symbol(lib, b"zmq_msg_data")
    _msg_size = <msg_len_fn>_symbol(lib, b"zmq_msg_size")
    _msg_more = <msg_fn>_symbol(lib, b"zmq_msg_more")
    _errno = <errno_fn>_symbol(lib, b"zmq_errno")
    _msg_gets = <msg_gets_fn>_symbol(lib, b"zmq_msg_gets")


_bind_libzmq()


_ETERM = int(zmq.ETERM)


cdef int _raise_zmq(int err) except -1:
    """pyzmq's exception for an errno: Again, ContextTerminated, else ZMQError."""
    if err == EAGAIN:
        raise zmq.Again(err)
    if err == _ETERM:
        raise zmq.ContextTerminated(err)
    raise zmq.ZMQError(err)


cdef int _interrupted(zmq_msg_t *msg) except -1:
    """After EINTR: run signal handlers; if one raises, close `msg` and raise."""
    try:
        PyErr_CheckSignals()
    except BaseException:
        _msg_close(msg)
        raise
    return 0


cdef object _recv_one(void *handle, int flags, bint *more, list peer=None):
    """One frame: bytes if small, else a zmq.Frame owning the message.

    With `peer`, also appends the message's User-Id property to it (set by the ZAP
    handler that authenticated the connection), or None on a connection without one.
    """
    cdef const char *prop
    cdef zmq_msg_t msg
    cdef int rc, err
    cdef size_t size
    cdef Frame frame
    _msg_init(&msg)
    while True:
        if flags & ZMQ_DONTWAIT:
            rc = _msg_recv(&msg, handle, flags)
        else:
            with nogil:
                rc = _msg_recv(&msg, handle, flags)
        if rc >= 0:
            break
        err = _errno()
        if err != EINTR:
            _msg_close(&msg)
            _raise_zmq(err)
        _interrupted(&msg)  # then try again
    more[0] = _msg_more(&msg) != 0
    if peer is not None:
        prop = _msg_gets(&msg, b"User-Id")
        peer.append(prop.decode("utf-8", "replace") if prop != NULL else None)
    size = _msg_size(&msg)
    if <Py_ssize_t>size < _recv_copy_below:
        try:
            return PyBytes_FromStringAndSize(<char *>_msg_data(&msg), size)
        finally:
            _msg_close(&msg)
    try:
        frame = _SugarFrame()
    except BaseException:
        _msg_close(&msg)
        raise
    _msg_move(&frame.zmq_msg, &msg)
    _msg_close(&msg)
    frame.more = more[0]
    return frame


def recv_frames(Socket sock, int flags=0):
    """Receive one multipart message: small frames as bytes, large as zmq.Frame.

    Raises zmq.Again if `flags` has NOBLOCK and nothing is waiting.
    """
    cdef bint more = False
    cdef void *handle = sock.handle
    if sock._closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    frames = [_recv_one(handle, flags, &more)]
    try:
        while more:  # the rest of a message arrives with its first frame
            frames.append(_recv_one(handle, 0, &more))
    except BaseException:
        if more:  # never leave a message's tail to be read as the next message
            _discard_rest(handle)
        raise
    return frames


def recv_from(Socket sock, int flags=0):
    """`recv_frames`, and who sent it: `(user_id, frames)`.

    `user_id` is the User-Id the ZAP handler gave the sender's connection (mtserve's is
    the sender's CURVE public key), None for a connection no handler authenticated.
    """
    cdef bint more = False
    cdef list peer = []
    cdef void *handle = sock.handle
    if sock._closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    frames = [_recv_one(handle, flags, &more, peer)]
    try:
        while more:
            frames.append(_recv_one(handle, 0, &more))
    except BaseException:
        if more:
            _discard_rest(handle)
        raise
    return peer[0], frames


cdef void _discard_rest(void *handle) noexcept:
    cdef zmq_msg_t msg
    cdef bint more = True
    while more:
        _msg_init(&msg)
        if _msg_recv(&msg, handle, ZMQ_DONTWAIT) < 0:
            _msg_close(&msg)
            return
        more = _msg_more(&msg) != 0
        _msg_close(&msg)


cdef int _send_msg(zmq_msg_t *msg, void *handle, int flags) except -1:
    """Send a message (libzmq then owns it), again after EINTR; on failure close it, raise."""
    cdef int rc, err
    while True:
        with nogil:
            rc = _msg_send(msg, handle, flags)
        if rc >= 0:
            return 0
        err = _errno()
        if err != EINTR:
            _msg_close(msg)
            _raise_zmq(err)
        _interrupted(msg)


cdef int _send_bytes(void *handle, bytes data, int flags) except -1:
    cdef zmq_msg_t msg
    cdef Py_ssize_t size = PyBytes_GET_SIZE(data)
    if _msg_init_size(&msg, size) != 0:
        _raise_zmq(_errno())
    memcpy(_msg_data(&msg), PyBytes_AS_STRING(data), size)
    return _send_msg(&msg, handle, flags)


cdef int _send_frame(void *handle, Frame frame, int flags) except -1:
    cdef zmq_msg_t msg
    _msg_init(&msg)
    if _msg_copy(&msg, &frame.zmq_msg) != 0:  # shares the buffer: no copy
        _msg_close(&msg)
        _raise_zmq(_errno())
    return _send_msg(&msg, handle, flags)


def send_frames(Socket sock, frames, int first_flags=0):
    """Send one multipart message: bytes, zmq.Frame or any buffer per frame.

    Every frame is checked before the first is sent, so a bad one raises TypeError
    without leaving part of a message on the socket. `first_flags` go with the first
    frame only: NOBLOCK there makes a ROUTER_MANDATORY socket raise zmq.Again, with
    nothing sent, when the peer's queue is full (a ROUTER decides at the routing frame).
    """
    cdef Py_ssize_t i, last = len(frames) - 1
    cdef int flags
    cdef void *handle = sock.handle
    if sock._closed:
        raise zmq.ZMQError(zmq.ENOTSOCK)
    ready = frames  # copied only if a frame needs a memoryview (rare on the hot path)
    for i in range(last + 1):
        frame = frames[i]
        if not (type(frame) is bytes or isinstance(frame, Frame)):
            if ready is frames:
                ready = list(frames)
            ready[i] = memoryview(frame)  # TypeError here, before anything is sent
    for i in range(last + 1):
        frame = ready[i]
        flags = ZMQ_SNDMORE if i < last else 0
        if i == 0:
            flags |= first_flags
        if type(frame) is bytes and PyBytes_GET_SIZE(frame) < _send_copy_below:
            _send_bytes(handle, <bytes>frame, flags)
        elif isinstance(frame, Frame):
            _send_frame(handle, <Frame>frame, flags)
        else:  # large bytes or another buffer: pyzmq's zero-copy send keeps it alive
            sock.send(frame, flags, memoryview(frame).nbytes < _send_copy_below, False)
