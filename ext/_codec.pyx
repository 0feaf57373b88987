# cython: language_level=3, boundscheck=False, wraparound=False
"""msgpack for message headers, in C: the common shapes fast, everything else by the twin.

Every request's header is decoded once and every answer's encoded once; through
`msgpack.unpackb`/`packb` with the protocol's bounds that was about 3 us each on the
development VMs, a tenth of the broker's CPU per request. Headers are small maps of
strings, integers, floats, booleans, nil, byte strings and lists; this decodes and
encodes exactly those. Anything else (ext types, non-string keys, deep nesting, bad
UTF-8, trailing bytes, an unusual Python type) is handed to the twin, `_codec_py`,
which is the reference: it raises the protocol's errors, and the C path must return
what it would return, byte for byte (the tests compare the two on random input).
"""

from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_AsUnsignedLongLong
from cpython.unicode cimport PyUnicode_AsUTF8AndSize, PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from ext import _codec_py

DEF MAX_DEPTH = 32  # deeper headers go to the twin


class _Fallback(Exception):
    """Not a shape this path decodes or encodes: ask the twin.

    Raised fresh each time (never one shared instance, whose traceback would grow
    with every raise and never be freed).
    """

# ------------------------------------------------------------------ decoding


cdef inline uint64_t _be(const uint8_t *p, int width) noexcept:
    cdef uint64_t v = 0
    cdef int i
    for i in range(width):
        v = (v << 8) | p[i]
    return v


cdef class _Reader:
    cdef const uint8_t *p
    cdef Py_ssize_t n
    cdef Py_ssize_t pos

    cdef inline const uint8_t *take(self, Py_ssize_t k) except NULL:
        if k > self.n - self.pos:
            raise _Fallback()  # truncated
        cdef const uint8_t *at = self.p + self.pos
        self.pos += k
        return at

    cdef object value(self, int depth):
        cdef uint8_t b = self.take(1)[0]
        cdef const uint8_t *q
        cdef uint64_t u
        cdef double d
        cdef float f
        cdef uint32_t bits
        if b <= 0x7F:
            return <long>b
        if b >= 0xE0:
            return <long>(<int>b - 256)
        if 0xA0 <= b <= 0xBF:
            return self.text(b & 0x1F)
        if 0x90 <= b <= 0x9F:
            return self.array(b & 0x0F, depth)
        if 0x80 <= b <= 0x8F:
            return self.map(b & 0x0F, depth)
        if b == 0xC0:
            return None
        if b == 0xC2:
            return False
        if b == 0xC3:
            return True
        if b == 0xCC or b == 0xCD or b == 0xCE or b == 0xCF:
            width = 1 << (b - 0xCC)
            return _be(self.take(width), width)
        if b == 0xD0:
            return <long>(<signed char>self.take(1)[0])
        if b == 0xD1:
            return <long>(<short>(<uint16_t>_be(self.take(2), 2)))
        if b == 0xD2:
            return <long>(<int>(<uint32_t>_be(self.take(4), 4)))
        if b == 0xD3:
            return <long long>(<int64_t>_be(self.take(8), 8))
        if b == 0xCA:
            bits = <uint32_t>_be(self.take(4), 4)
            memcpy(&f, &bits, 4)
            return <double>f
        if b == 0xCB:
            u = _be(self.take(8), 8)
            memcpy(&d, &u, 8)
            return d
        if b == 0xD9 or b == 0xDA or b == 0xDB:
            width = 1 << (b - 0xD9)
            return self.text(<Py_ssize_t>_be(self.take(width), width))
        if b == 0xC4 or b == 0xC5 or b == 0xC6:
            width = 1 << (b - 0xC4)
            u = _be(self.take(width), width)
            q = self.take(<Py_ssize_t>u)
            return PyBytes_FromStringAndSize(<const char *>q, <Py_ssize_t>u)
        if b == 0xDC or b == 0xDD:
            width = 2 if b == 0xDC else 4
            return self.array(<Py_ssize_t>_be(self.take(width), width), depth)
        if b == 0xDE or b == 0xDF:
            width = 2 if b == 0xDE else 4
            return self.map(<Py_ssize_t>_be(self.take(width), width), depth)
        raise _Fallback()  # ext types and the unused byte

    cdef object text(self, Py_ssize_t size):
        cdef const uint8_t *q = self.take(size)
        try:
            return PyUnicode_DecodeUTF8(<const char *>q, size, NULL)
        except UnicodeDecodeError:
            raise _Fallback()

    cdef list array(self, Py_ssize_t count, int depth):
        if depth >= MAX_DEPTH or count > self.n - self.pos:
            raise _Fallback()  # too deep, or more items than bytes left
        cdef list items = []
        cdef Py_ssize_t i
        for i in range(count):
            items.append(self.value(depth + 1))
        return items

    cdef dict map(self, Py_ssize_t count, int depth):
        if depth >= MAX_DEPTH or count > self.n - self.pos:
            raise _Fallback()
        cdef dict items = {}
        cdef Py_ssize_t i
        cdef uint8_t b
        for i in range(count):
            b = self.p[self.pos] if self.pos < self.n else 0
            if not (0xA0 <= b <= 0xBF or 0xD9 <= b <= 0xDB):
                raise _Fallback()  # keys other than strings: the twin decides
            key = self.value(depth + 1)
            items[key] = self.value(depth + 1)
        return items


def decode_header(data, Py_ssize_t max_header_bytes):
    """A header map from msgpack bytes; raises what the twin raises on anything else."""
    cdef Py_buffer view
    if type(data) is bytes:  # small frames arrive as bytes: no buffer request needed
        return _decode(<const uint8_t *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data),
                       data, max_header_bytes)
    try:
        PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    except (TypeError, BufferError):  # not a buffer, or not a contiguous one
        return _codec_py.decode_header(data, max_header_bytes)
    try:
        return _decode(<const uint8_t *>view.buf, view.len, data, max_header_bytes)
    finally:
        PyBuffer_Release(&view)


cdef object _decode(const uint8_t *p, Py_ssize_t n, data, Py_ssize_t max_header_bytes):
    cdef _Reader reader = _Reader.__new__(_Reader)
    if n == 0 or n > max_header_bytes or not (0x80 <= p[0] <= 0x8F or p[0] == 0xDE or p[0] == 0xDF):
        return _codec_py.decode_header(data, max_header_bytes)  # empty, too big, not a map
    reader.p = p
    reader.n = n
    reader.pos = 0
    try:
        header = reader.value(0)
    except _Fallback:
        return _codec_py.decode_header(data, max_header_bytes)
    if reader.pos != n:
        return _codec_py.decode_header(data, max_header_bytes)  # trailing bytes
    return header


# ------------------------------------------------------------------ encoding


cdef class _Writer:
    cdef bytearray buf
    cdef Py_ssize_t used

    cdef uint8_t *room(self, Py_ssize_t k) except NULL:
        cdef Py_ssize_t have = len(self.buf)
        if self.used + k > have:
            PyByteArray_Resize(self.buf, max(2 * have, self.used + k))
        cdef uint8_t *at = <uint8_t *>PyByteArray_AS_STRING(self.buf) + self.used
        self.used += k
        return at

    cdef int put_be(self, uint8_t tag, uint64_t v, int width) except -1:
        cdef uint8_t *at = self.room(1 + width)
        cdef int i
        at[0] = tag
        for i in range(width):
            at[width - i] = <uint8_t>(v >> (8 * i))
        return 0

    cdef int put_head(self, Py_ssize_t n, uint8_t fix, Py_ssize_t fix_max, uint8_t tag8,
                      uint8_t tag16, uint8_t tag32) except -1:
        if n <= fix_max:
            self.room(1)[0] = fix | <uint8_t>n
        elif tag8 and n < 0x100:
            self.put_be(tag8, n, 1)
        elif n < 0x10000:
            self.put_be(tag16, n, 2)
        elif n <= 0xFFFFFFFF:
            self.put_be(tag32, n, 4)
        else:
            raise _Fallback()
        return 0

    cdef int put_bytes(self, const char *data, Py_ssize_t size) except -1:
        memcpy(self.room(size), data, size)
        return 0

    cdef int put_int(self, obj) except -1:
        cdef int overflow = 0
        cdef long long v = PyLong_AsLongLongAndOverflow(obj, &overflow)
        if overflow > 0:
            try:
                self.put_be(0xCF, PyLong_AsUnsignedLongLong(obj), 8)
            except OverflowError:
                raise _Fallback()
        elif overflow < 0:
            raise _Fallback()
        elif 0 <= v < 0x80:
            self.room(1)[0] = <uint8_t>v
        elif -32 <= v < 0:
            self.room(1)[0] = <uint8_t>(v & 0xFF)
        elif v >= 0:
            if v < 0x100:
                self.put_be(0xCC, v, 1)
            elif v < 0x10000:
                self.put_be(0xCD, v, 2)
            elif v < 0x100000000:
                self.put_be(0xCE, v, 4)
            else:
                self.put_be(0xCF, v, 8)
        elif v >= -0x80:
            self.put_be(0xD0, <uint64_t>v, 1)
        elif v >= -0x8000:
            self.put_be(0xD1, <uint64_t>v, 2)
        elif v >= -0x80000000:
            self.put_be(0xD2, <uint64_t>v, 4)
        else:
            self.put_be(0xD3, <uint64_t>v, 8)
        return 0

    cdef int put(self, obj, int depth) except -1:
        cdef Py_ssize_t size
        cdef const char *utf8
        cdef double d
        cdef uint64_t bits
        if depth >= MAX_DEPTH:
            raise _Fallback()
        if obj is None:
            self.room(1)[0] = 0xC0
        elif obj is True:
            self.room(1)[0] = 0xC3
        elif obj is False:
            self.room(1)[0] = 0xC2
        elif isinstance(obj, int):
            self.put_int(obj)
        elif type(obj) is str:
            try:
                utf8 = PyUnicode_AsUTF8AndSize(obj, &size)
            except UnicodeEncodeError:
                raise _Fallback()  # lone surrogates: msgpack's own error
            self.put_head(size, 0xA0, 31, 0xD9, 0xDA, 0xDB)
            self.put_bytes(utf8, size)
        elif isinstance(obj, float):
            d = PyFloat_AS_DOUBLE(obj)
            memcpy(&bits, &d, 8)
            self.put_be(0xCB, bits, 8)
        elif type(obj) is dict:
            self.put_head(len(<dict>obj), 0x80, 15, 0, 0xDE, 0xDF)
            for key, value in (<dict>obj).items():
                self.put(key, depth + 1)
                self.put(value, depth + 1)
        elif type(obj) is list or type(obj) is tuple:
            self.put_head(len(obj), 0x90, 15, 0, 0xDC, 0xDD)
            for item in obj:
                self.put(item, depth + 1)
        elif type(obj) is bytes:
            size = len(<bytes>obj)
            self.put_head(size, 0, -1, 0xC4, 0xC5, 0xC6)
            self.put_bytes(<const char *>(<bytes>obj), size)
        else:
            raise _Fallback()  # other types: msgpack's own rules and errors
        return 0


def encode_header(header):
    """msgpack bytes of a header, identical to the twin's (msgpack.packb)."""
    cdef _Writer writer = _Writer.__new__(_Writer)
    writer.buf = bytearray(256)
    writer.used = 0
    try:
        writer.put(header, 0)
    except _Fallback:
        return _codec_py.encode_header(header)
    return PyBytes_FromStringAndSize(PyByteArray_AS_STRING(writer.buf), writer.used)
