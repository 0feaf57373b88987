"""mtserve's C core: hot-path code in Cython, each module with a pure-Python twin.

The twin rule: every module here comes as `_NAME.pyx` (with its `.pxd` where other C code
needs it), the C implementation, and `_NAME_py.py`, its twin, with the same API and the
same semantics, down to the exceptions raised. The rest of mtserve imports from this
package (`from ext import RequestTable`), never from an implementation module, and gets:

- the C implementation, normally;
- the twin if the environment sets MTSERVE_PUREPYTHON=1 (the second run of `make test`
  does), silently;
- the twin if the compiled module cannot be imported (not built, or built against
  another pyzmq), with one RuntimeWarning at import. Build it with
  `python setup.py build_ext --inplace` (or `make build`).

`USING_C` says whether every module is the C one; `IMPLEMENTATIONS` names the module
chosen for each. Each module's tests run against both implementations directly, so any
difference between them is a test failure.

Modules:
- `_reqtable`: `RequestTable`, the broker's table of in-flight requests (uint64 request id
  -> deadline and value), touched twice per request.
- `_frames`: `recv_frames` and `send_frames`, multipart messages straight on libzmq,
  twice per message on every socket of the hot path; `recv_from`, the same receive with
  the sender's authenticated User-Id.
- `_codec`: `decode_header` and `encode_header`, the msgpack header of every message;
  the twin (msgpack itself) is the reference the C path falls back to.
- `_pages`: `PagePool` and `Allocation`, the page allocator behind the worker's host
  memory pool: weights live once in fixed pages of one buffer, so a swap-in builds a
  session over them without copying; with `backed=False`, the same accounting without
  memory, for a device pool's pages on the GPU; `address` lets the buffer be registered
  as pinned memory.
- `_actiontable`: `ActionTable`, the worker's lock-free request table: the I/O thread
  puts timed actions into fixed slots, executor threads claim them without a lock.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

__all__ = [
    "IMPLEMENTATIONS",
    "USING_C",
    "ActionTable",
    "Allocation",
    "PagePool",
    "RequestTable",
    "TableFull",
    "decode_header",
    "encode_header",
    "recv_frames",
    "recv_from",
    "send_frames",
]


def _choose(name: str) -> ModuleType:
    """The C module `ext.<name>`, or its twin `ext.<name>_py` (see the module docstring)."""
    twin = importlib.import_module(f"ext.{name}_py")
    if os.environ.get("MTSERVE_PUREPYTHON") == "1":
        return twin
    try:
        return importlib.import_module(f"ext.{name}")
    except (ImportError, ValueError) as exc:  # ValueError: built against another pyzmq
        warnings.warn(
            f"mtserve's C core module {name} is not available ({exc}); using its slower"
            " pure-Python twin. Build it with `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=3,
        )
        return twin


_reqtable = _choose("_reqtable")
_frames = _choose("_frames")
_codec = _choose("_codec")
_pages = _choose("_pages")
_actiontable = _choose("_actiontable")

RequestTable = _reqtable.RequestTable
recv_frames = _frames.recv_frames
recv_from = _frames.recv_from
send_frames = _frames.send_frames
decode_header = _codec.decode_header
encode_header = _codec.encode_header
PagePool = _pages.PagePool
Allocation = _pages.Allocation
ActionTable = _actiontable.ActionTable
TableFull = _actiontable.TableFull

# e.g. {"_frames": "ext._frames"}, or "ext._frames_py" where the twin was chosen
IMPLEMENTATIONS: dict[str, str] = {
    name: module.__name__
    for name, module in (
        ("_reqtable", _reqtable),
        ("_frames", _frames),
        ("_codec", _codec),
        ("_pages", _pages),
        ("_actiontable", _actiontable),
    )
}
USING_C: bool = not any(chosen.endswith("_py") for chosen in IMPLEMENTATIONS.values())
