"""Microbenchmark of RequestTable: the C core against its pure-Python twin.

Run from the repository root: `python -m bench.bench_reqtable`. It times CYCLES
insert+pop cycles in the broker's pattern (request ids keep increasing and each request
is popped WINDOW cycles after its insert, so WINDOW requests are in flight), best of
REPEATS, for both implementations and for a bare dict as a yardstick. It prints a table
and writes bench/results/reqtable.json. Takes about a second.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

from ext import _reqtable_py

CYCLES = 200_000
WINDOW = 1_000
REPEATS = 3
RESULTS = Path(__file__).resolve().parent / "results" / "reqtable.json"


def _time_table(table_cls: type) -> float:
    """Seconds for CYCLES insert+pop cycles on a table that holds WINDOW entries."""
    table = table_cls()
    for key in range(WINDOW):
        table.insert(key, float(key), key)
    insert, pop = table.insert, table.pop
    start = time.perf_counter()
    for key in range(WINDOW, WINDOW + CYCLES):
        insert(key, 1.0, key)
        pop(key - WINDOW)
    elapsed = time.perf_counter() - start
    table.close()
    return elapsed


def _time_dict() -> float:
    """The same cycles on a dict of (deadline, value): what Python alone costs."""
    table: dict[int, tuple[float, object]] = {key: (float(key), key) for key in range(WINDOW)}
    pop = table.pop
    start = time.perf_counter()
    for key in range(WINDOW, WINDOW + CYCLES):
        table[key] = (1.0, key)
        pop(key - WINDOW)
    return time.perf_counter() - start


def _best(run: Callable[[], float]) -> float:
    return min(run() for _ in range(REPEATS))


def main() -> None:
    runs: dict[str, tuple[str, Callable[[], float]]] = {}
    if importlib.util.find_spec("ext._reqtable") is not None:
        from ext import _reqtable

        runs["c"] = ("C core (ext._reqtable)", lambda: _time_table(_reqtable.RequestTable))
    runs["py"] = ("Python twin (ext._reqtable_py)", lambda: _time_table(_reqtable_py.RequestTable))
    runs["dict"] = ("bare dict (yardstick)", _time_dict)

    results = {}
    for name, (_, run) in runs.items():
        seconds = _best(run)
        results[name] = {"seconds": seconds, "ns_per_cycle": seconds / CYCLES * 1e9}
    c_seconds = results["c"]["seconds"] if "c" in results else None

    print(f"RequestTable: {CYCLES:,} insert+pop cycles, {WINDOW:,} in flight, best of {REPEATS}")
    print(f"{'implementation':<32}{'total s':>9}{'ns/cycle':>10}{'vs C':>8}")
    for name, (label, _) in runs.items():
        r = results[name]
        ratio = f"{r['seconds'] / c_seconds:.2f}x" if c_seconds else "n/a"
        print(f"{label:<32}{r['seconds']:>9.3f}{r['ns_per_cycle']:>10.0f}{ratio:>8}")
    if c_seconds is None:
        print("(C core not built: python setup.py build_ext --inplace)")

    report = {
        "benchmark": "reqtable_insert_pop",
        "cycles": CYCLES,
        "window": WINDOW,
        "repeats": REPEATS,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
        "ratio_py_over_c": results["py"]["seconds"] / c_seconds if c_seconds else None,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
