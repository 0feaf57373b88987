"""`mtbench`: benchmarks of mtserve, each beside its baseline in the same run."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mtbench", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("latency", help="one request at a time: mtserve vs in-process ONNX Runtime")
    sub.add_parser("reqtable", help="the C request table vs its pure-Python twin")
    args = p.parse_args(argv)
    if args.command == "latency":
        from bench import latency

        return latency.main()
    from bench import bench_reqtable

    return bench_reqtable.main() or 0


if __name__ == "__main__":
    sys.exit(main())
