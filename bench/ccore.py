"""The C core against its pure-Python twins, each on the path where mtserve uses it.

    python -m bench.ccore [--repeats N]      (or `mtbench ccore`)

One loop per module, timed for the C module and for its twin in the same run (best of
N, so a noisy neighbour costs the slower of neither):

- `_reqtable`: the broker's pattern, insert + pop with 1,000 requests in flight;
- `_codec`: encode + decode of an INFER header as the broker forwards it;
- `_frames`: send + receive of a six-frame worker message over an inproc PAIR;
- `_pages`: alloc + free of a ResNet-18-sized model (45 pages) in a fragmented pool;
- `_actiontable`: put + claim + finish + reap of one action, as worker and executor do.

A module whose twin is as fast fails its goal (`twin / C >= 1`): it should be rewritten
or removed. For `_reqtable` a bare dict (which keeps no deadline index) is printed too.
Prints a table and one goal line per module; writes bench/results/ccore.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.scenarios import RESULTS, goal, print_goals

Loop = Callable[[Any, int], float]  # (module, iterations) -> seconds


def reqtable_loop(mod: Any, n: int) -> float:
    window = 1000
    table = mod.RequestTable()
    for key in range(window):
        table.insert(key, float(key), key)
    insert, pop = table.insert, table.pop
    start = time.perf_counter()
    for key in range(window, window + n):
        insert(key, 1.0, key)
        pop(key - window)
    elapsed = time.perf_counter() - start
    table.close()
    return elapsed


def dict_loop(n: int) -> float:
    """The reqtable pattern on a bare dict (no deadline index): the floor of Python."""
    window = 1000
    table: dict[int, tuple[float, int]] = {key: (float(key), key) for key in range(window)}
    pop = table.pop
    start = time.perf_counter()
    for key in range(window, window + n):
        table[key] = (1.0, key)
        pop(key - window)
    return time.perf_counter() - start


def codec_loop(mod: Any, n: int) -> float:
    header = {
        "id": 123456789,
        "model": "resnet18",
        "inputs": [["input", "float32", [1, 3, 224, 224]]],
        "deadline_ms": 100.0,
    }
    encode, decode = mod.encode_header, mod.decode_header
    start = time.perf_counter()
    for _ in range(n):
        decode(encode(header), 65536)
    return time.perf_counter() - start


def frames_loop(mod: Any, n: int) -> float:
    import zmq

    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a.bind("inproc://ccore")
    b.connect("inproc://ccore")
    message = [b"", b"MTW1", b"\x06", b"h" * 120, b"x" * 1024, b"y" * 4096]
    send, recv = mod.send_frames, mod.recv_frames
    try:
        start = time.perf_counter()
        for _ in range(n):
            send(a, message)
            recv(b, 0)
        return time.perf_counter() - start
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def pages_loop(mod: Any, n: int) -> float:
    pool = mod.PagePool(512 << 20, 1 << 20)
    keep = [pool.alloc(1 << 20) for _ in range(0, 400)]
    for allocation in keep[::3]:  # a fragmented pool, as after many loads and evictions
        allocation.free()
    start = time.perf_counter()
    for _ in range(n):
        shared = pool.alloc(41 << 20)
        runs = [pool.alloc(3 << 20, contiguous=True) for _ in range(2)]
        shared.free()
        for run in runs:
            run.free()
    elapsed = time.perf_counter() - start
    del keep
    return elapsed


def actiontable_loop(mod: Any, n: int) -> float:
    table = mod.ActionTable(256)  # the worker's default (WorkerConfig.table_slots)
    put, claim, finish, reap = table.put, table.claim, table.finish, table.reap
    start = time.perf_counter()
    for i in range(n):
        put(i, 1, 0.0, 1.0)
        slot, _ = claim(1, 0.5)
        finish(slot)
        reap()
    elapsed = time.perf_counter() - start
    table.close()
    return elapsed


LOOPS: dict[str, tuple[str, Loop, int]] = {
    "_reqtable": ("insert+pop", reqtable_loop, 200_000),
    "_codec": ("encode+decode", codec_loop, 100_000),
    "_frames": ("send+recv", frames_loop, 50_000),
    "_pages": ("alloc+free model", pages_loop, 5_000),
    "_actiontable": ("put+claim+finish+reap", actiontable_loop, 100_000),
}


def measure(name: str, repeats: int) -> dict[str, Any] | None:
    if importlib.util.find_spec(f"ext.{name}") is None:
        return None
    label, loop, n = LOOPS[name]
    out: dict[str, Any] = {"operation": label, "iterations": n}
    for impl in ("c", "twin"):
        mod = importlib.import_module(f"ext.{name}" if impl == "c" else f"ext.{name}_py")
        seconds = min(loop(mod, n) for _ in range(repeats))
        out[f"{impl}_ns"] = seconds / n * 1e9
    out["ratio"] = out["twin_ns"] / out["c_ns"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench ccore", description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    results, lines = {}, []
    print(f"{'module':<14}{'operation':<24}{'C ns':>10}{'twin ns':>10}{'twin / C':>10}")
    for name in LOOPS:
        r = measure(name, args.repeats)
        if r is None:
            print(f"{name:<14}not built (python setup.py build_ext --inplace)")
            continue
        results[name] = r
        print(f"{name:<14}{r['operation']:<24}{r['c_ns']:>10.0f}{r['twin_ns']:>10.0f}"
              f"{r['ratio']:>9.2f}x")  # fmt: skip
        lines.append(goal(f"{name} twin / C, {r['operation']}", r["ratio"], ">=", 1.0))
        if name == "_reqtable":  # the yardstick the issue quoted: a dict tracks no deadlines
            n = LOOPS[name][2]
            r["dict_ns"] = min(dict_loop(n) for _ in range(args.repeats)) / n * 1e9
            print(f"{'':<14}{'bare dict (yardstick)':<24}{r['dict_ns']:>10.0f}")
            lines.append(goal("_reqtable bare dict / C, insert+pop", r["dict_ns"] / r["c_ns"]))
    print_goals(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "ccore.json"
    doc = {"benchmark": "ccore", "repeats": args.repeats, "modules": results, "goals": lines}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
