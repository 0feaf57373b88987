"""`mtserve tenant add|list|remove|rotate|set|usage`: keys, limits and usage per tenant.

These commands open the broker's registry (`<state_dir>/registry.sqlite`) directly, so
they work whether the broker runs or not; a running broker picks every change up within
a housekeeping tick (`broker/principals.py`). Secret key files are written mode 0600
under `<state_dir>/keys/` (or `--out`) for the operator to hand to the tenant or worker.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mtcore.keys import ROLES


def add_tenant_parser(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("tenant", help="manage tenants', workers' and admins' keys")
    verbs = t.add_subparsers(required=True, metavar="verb")

    add = verbs.add_parser("add", help="register a principal and write its secret key file")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="tenant")
    add.add_argument("--weight", type=float, default=1.0, help="share of executor time")
    add.add_argument("--endpoint", default="", help="broker address written into the key file")
    add.add_argument("--out", type=Path, default=None, help="where the secret key file goes")
    add.set_defaults(run=cmd_add)

    ls = verbs.add_parser("list", help="the principals, their roles and weights")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(run=cmd_list)

    rm = verbs.add_parser("remove", help="revoke a principal's key (its models stay)")
    rm.add_argument("name")
    rm.set_defaults(run=cmd_remove)

    rot = verbs.add_parser("rotate", help="a new key pair; the old key stops working")
    rot.add_argument("name")
    rot.add_argument("--endpoint", default="")
    rot.add_argument("--out", type=Path, default=None)
    rot.set_defaults(run=cmd_rotate)

    st = verbs.add_parser("set", help="change a principal's weight or limits")
    st.add_argument("name")
    st.add_argument("--weight", type=float, default=None)
    st.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a tenant limit (see `mtserve tenant list --json`); VALUE 'default' drops it",
    )
    st.set_defaults(run=cmd_set)

    use = verbs.add_parser("usage", help="per-tenant usage: exec and load ms, bytes, memory")
    use.add_argument("--json", action="store_true")
    use.set_defaults(run=cmd_usage)

    for p in (add, ls, rm, rot, st, use):
        p.add_argument("--state-dir", type=Path, default=Path("state"))


def _open(args: argparse.Namespace):
    from broker.principals import Principals

    return Principals.open(args.state_dir)


def cmd_add(args: argparse.Namespace) -> int:
    from broker.principals import provision

    principals = _open(args)
    path = provision(
        principals,
        args.state_dir,
        args.name,
        args.role,
        weight=args.weight,
        endpoint=args.endpoint,
        out=args.out,
    )
    print(f"{args.role} '{args.name}' added; secret key file (mode 0600): {path}")
    if args.role == "worker":
        print(f"  mtserve worker --key-file {path}")
    else:
        print(f"  mtserve list --key-file {path}")
        print(f'  Client(key_file="{path}")   # from mtcore.client import Client')
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    principals = _open(args).list()
    if args.json:
        rows = [
            {"name": p.name, "role": p.role, "weight": p.weight, "limits": p.limits,
             "public_key": p.public_key, "created": p.created}
            for p in principals
        ]  # fmt: skip
        print(json.dumps(rows, indent=2))
        return 0
    for p in principals:
        limits = " ".join(f"{k}={v}" for k, v in sorted(p.limits.items()))
        print(f"{p.name:24} {p.role:7} weight={p.weight:<6g} {p.public_key[:8]}... {limits}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    principal = _open(args).remove(args.name)
    print(f"{principal.role} '{principal.name}' removed; its key no longer connects")
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    from broker.principals import reissue

    path = reissue(_open(args), args.state_dir, args.name, endpoint=args.endpoint, out=args.out)
    print(f"'{args.name}' has a new key: {path}; the old one stops working within a second")
    return 0


def cmd_set(args: argparse.Namespace) -> int:
    limits: dict[str, object] = {}
    for item in args.limit:
        name, _, value = item.partition("=")
        limits[name] = None if value == "default" else float(value)
    from broker.quotas import TenantLimits

    TenantLimits().with_overrides({k: v for k, v in limits.items() if v is not None})
    principal = _open(args).configure(args.name, weight=args.weight, limits=limits)
    print(f"'{principal.name}': weight {principal.weight:g}, limits {principal.limits}")
    return 0


def cmd_usage(args: argparse.Namespace) -> int:
    """What the broker metered (broker/metering.py), as of its last flush (every 5 s)."""
    from dataclasses import asdict

    from broker.metering import read_usage

    rows = read_usage(_open(args).db)
    if args.json:
        print(json.dumps([asdict(u) for u in rows], indent=2))
        return 0
    print(f"{'tenant':<20} {'requests':>9} {'exec ms':>10} {'load ms':>9} {'MB in':>8} "
          f"{'MB out':>8} {'MB fetched':>10} {'device GB*s':>11} {'host GB*s':>9}")  # fmt: skip
    for u in rows:
        mb = [f"{n / 1e6:>{w}.2f}" for n, w in ((u.bytes_in, 8), (u.bytes_out, 8),
                                                (u.bytes_fetched, 10))]  # fmt: skip
        print(f"{u.tenant:<20} {u.requests:>9} {u.exec_ms:>10.1f} {u.load_ms:>9.1f} "
              f"{' '.join(mb)} {u.device_byte_seconds / 1e9:>11.3f}"
              f" {u.host_byte_seconds / 1e9:>9.3f}")  # fmt: skip
    return 0
