"""mtserve's C core: hot-path data structures in Cython, each with a pure-Python twin.

The twin rule: every module here comes as `_NAME.pyx` (with its `.pxd`), the C
implementation, and `_NAME_py.py`, its twin, with the same API and the same semantics,
down to the exceptions raised. The rest of mtserve imports from this package
(`from ext import RequestTable`), never from an implementation module, and gets:

- the C implementation, normally;
- the twin if the environment sets MTSERVE_PUREPYTHON=1 (the second run of `make test`
  does), silently;
- the twin if the compiled module cannot be imported, with one RuntimeWarning at import.
  Build it with `python setup.py build_ext --inplace` (or `make build`).

`USING_C` says which one was chosen. Each module's tests run against both implementations
directly, so any difference between them is a test failure.

Modules:
- `_reqtable`: `RequestTable`, the broker's table of in-flight requests (uint64 request id
  -> deadline and value), touched twice per request.
"""

from __future__ import annotations

import os
import warnings

from ext._reqtable_py import RequestTable as _PyRequestTable

__all__ = ["USING_C", "RequestTable"]

USING_C: bool

if os.environ.get("MTSERVE_PUREPYTHON") == "1":
    RequestTable = _PyRequestTable
    USING_C = False
else:
    try:
        from ext._reqtable import RequestTable
    except ImportError as exc:
        warnings.warn(
            f"mtserve's C core is not available ({exc}); using the slower pure-Python twins."
            " Build it with `python setup.py build_ext --inplace`.",
            RuntimeWarning,
            stacklevel=2,
        )
        RequestTable = _PyRequestTable
        USING_C = False
    else:
        USING_C = True
