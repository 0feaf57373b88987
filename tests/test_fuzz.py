"""Fuzzing a live broker's tenant frontend: random, structured and mutated frames.

One module-scoped cluster (a broker, one worker, `--insecure`: the header names the
tenant) and, for the CURVE variant, a second one that is secure. A "victim" tenant owns
a tiny model `m`; the fuzzing tenant owns its own `m` too, so a request that loses track
of whose model it names would show. Three generators send messages on a fresh DEALER
per example:

- (a) fully random multipart messages, optionally behind a valid prefix (delimiter, tag,
  command byte), so that every framing check is reached;
- (b) valid envelopes with random msgpack headers: the command's own keys with random
  (and near-valid) values, random extra keys, random payload frames or frames that match
  the described tensors;
- (c) mutations of a valid message of each command (byte flips, inserts and deletes in
  the header, truncated, dropped and duplicated frames, wrong tags, unknown command
  bytes, oversized declared sizes, other tenants' names), built over live upload handles.

Each reply is checked against what docs/PROTOCOL.md promises (sections 2-10), computed
from the message itself by `expect`: every message here gets exactly one reply (the
doc's section 9: even one without a delimiter is answered, routed by its first frame),
laid out `[""][MTS1][cmd][map]`, with the framing status in the documented order, the
documented command byte and `id` echo, an error's `error` string and nothing else, and a
status the command may return. Then the same connection still answers a PING (no second
answer came), a "witness" tenant on its own connection gets PING answered, and the
broker process is alive. At the end the victim's model is still listed and computes
tiny_add's `x + bias`, and the broker counted no internal error.

Also: raw TCP garbage (not ZMTP, or a greeting and then garbage) at the frontend; and a
secure (CURVE) cluster, fuzzed over a registered tenant key (the same promises; the
`tenant` field is ignored) and over an unregistered key or none (no reply at all). The
broker bug the fuzz found (a boolean `id` echoed by framing errors) has a regression
test of its own below.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import onnx
import pytest
import zmq
from conftest import start_cluster
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from bench import zoo
from broker.principals import broker_key
from mtcore import keys
from mtcore.client import Client
from mtcore.cluster import LocalCluster
from mtcore.errors import MTError
from mtcore.protocol import DTYPES, TAG, Cmd, Limits, build, decode_header

pytestmark = pytest.mark.timeout(300)

VICTIM, FUZZ, WITNESS = "victim", "fuzz", "witness"
MODEL = "m"  # the victim's model; the fuzzing tenant has its own of the same name
UPLOAD_NAME = "fz"  # what the fuzzing tenant's uploads are called
TINY = zoo.model_bytes("tiny_add")
TINY_SHA = hashlib.sha256(TINY).hexdigest()
BIAS = numpy_helper.to_array(onnx.load_from_string(TINY).graph.initializer[0])
REPLY_S = 30.0  # bound on any one reply (a commit profiles the model first)
WITNESS_S = 10.0  # bound on the witness's PING
PING = Cmd.PING.value
COMMANDS = {c.value: c for c in Cmd}
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REPLY_LIMITS = Limits(max_header_bytes=64 << 20)  # replies are not bounded like requests
MAX_HEADER = Limits().max_header_bytes

# Statuses each command may answer once framing, `id` and `tenant` passed (sections 7, 10;
# 22/23 are the per-tenant quotas of broker/quotas.py on what holds broker resources).
ALLOWED: dict[Cmd, frozenset[int]] = {
    Cmd.PING: frozenset({0}),
    Cmd.UPLOAD_BEGIN: frozenset({0, 13, 14, 22, 32, 52}),
    Cmd.UPLOAD_CHUNK: frozenset({0, 14, 33}),
    Cmd.UPLOAD_COMMIT: frozenset({0, 14, 22, 31, 32, 33, 62}),
    Cmd.INFER: frozenset({0, 13, 14, 22, 23, 30, 40, 50, 51, 52, 60, 61, 62}),
    Cmd.LIST: frozenset({0}),
    Cmd.INFO: frozenset({0, 14, 30}),
    Cmd.DELETE: frozenset({0, 14, 30}),
    Cmd.STATUS: frozenset({0}),
    Cmd.SHARE: frozenset({0, 14, 21, 22, 30}),
}
# The fields of a successful reply (section 7), by type.
SUCCESS_FIELDS: dict[Cmd, dict[str, type]] = {
    Cmd.PING: {"server": str},
    Cmd.UPLOAD_BEGIN: {"upload": str},
    Cmd.UPLOAD_CHUNK: {"received": int},
    Cmd.UPLOAD_COMMIT: {"model": dict},
    Cmd.INFER: {"outputs": list, "timing": dict, "batch": int},
    Cmd.LIST: {"models": list},
    Cmd.INFO: {"model": dict},
    Cmd.DELETE: {},
    Cmd.STATUS: {"status_info": dict},
    Cmd.SHARE: {"shared_with": list},
}
KEYS: dict[Cmd, tuple[str, ...]] = {
    Cmd.PING: (),
    Cmd.UPLOAD_BEGIN: ("name", "size", "sha256", "format", "max_batch", "replace"),
    Cmd.UPLOAD_CHUNK: ("upload", "offset"),
    Cmd.UPLOAD_COMMIT: ("upload",),
    Cmd.INFER: ("model", "inputs", "deadline_ms"),
    Cmd.LIST: (),
    Cmd.INFO: ("model",),
    Cmd.DELETE: ("model",),
    Cmd.STATUS: (),
    Cmd.SHARE: ("model", "grant", "revoke"),
}
ALL_KEYS = ("id", "tenant", *sorted({k for ks in KEYS.values() for k in ks}))

FUZZ_SETTINGS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "suppress_health_check": [
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
}


# ---------------------------------------------------------------- the doc's promises


@dataclass(frozen=True)
class Expect:
    """What the doc promises for one message: its reply's statuses, command byte, `id`."""

    statuses: frozenset[int]
    cmd: bytes  # the reply's command byte
    rid: int | None  # the `id` the reply must echo; None: the reply carries no `id`
    command: Cmd | None = None  # set when the message reached its command's handler
    header: dict[str, Any] = field(default_factory=dict)  # its decoded header, then
    tenant: str = ""  # whose request it was, then


def _uint64(value: Any) -> bool:
    """An `id` as section 4 defines it: an integer (not a boolean) in [0, 2^64)."""
    return type(value) is int and 0 <= value < 1 << 64


def _peek_id(frame: bytes) -> int | None:
    """Section 9: a framing error echoes `id` if the header still decodes (within 64 KiB)
    to a map whose `id` is a non-negative integer."""
    try:
        header = decode_header(frame)
    except MTError:
        return None
    value = header.get("id")
    return value if _uint64(value) else None


def expect(frames: list[bytes], secure: bool, principal: str = FUZZ) -> Expect:
    """The reply docs/PROTOCOL.md promises for `frames` as a DEALER sends them.

    Framing order (section 5): delimiter (10), 3 frames after it (10), tag (11), command
    (12), payload (13: unreachable with these small frames), header size (13), header
    decoding (10), `id` (14), `tenant` (14, insecure only: a secure broker ignores it).
    """
    if not frames or frames[0] != b"":
        return Expect(frozenset({10}), PING, None)
    body = frames[1:]
    cmd = body[1] if len(body) >= 2 and len(body[1]) == 1 else PING
    if len(body) < 3:
        return Expect(frozenset({10}), cmd, None)
    rid = _peek_id(body[2])
    if body[0] != TAG:
        return Expect(frozenset({11}), cmd, rid)
    if body[1] not in COMMANDS:
        return Expect(frozenset({12}), cmd, rid)
    if len(body[2]) > MAX_HEADER:
        return Expect(frozenset({13}), cmd, None)
    try:
        header = decode_header(body[2])
    except MTError:
        return Expect(frozenset({10}), cmd, None)
    if not _uint64(header.get("id")):
        return Expect(frozenset({14}), cmd, None)
    tenant = principal
    if not secure:
        tenant = header.get("tenant", "default")
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            return Expect(frozenset({14}), cmd, header["id"])
    command = COMMANDS[body[1]]
    return Expect(ALLOWED[command], cmd, header["id"], command, header, tenant)


def check_reply(frames: list[bytes], exp: Expect) -> tuple[dict[str, Any], list[bytes]]:
    """Assert the reply is well-formed and what `exp` allows; (header, payload)."""
    assert len(frames) >= 4, f"a reply has delimiter, tag, command and header: {frames!r:.200}"
    assert frames[0] == b"" and frames[1] == TAG and len(frames[2]) == 1, frames[:3]
    header = decode_header(frames[3], _REPLY_LIMITS)  # a str-keyed map, or it raises
    payload = frames[4:]
    status = header.get("status")
    assert type(status) is int, header
    assert frames[2] == exp.cmd, ("command byte", frames[2], exp, header)
    assert status in exp.statuses, (status, exp, header)
    assert status != 90, header  # INTERNAL: a broker bug
    if exp.rid is None:
        assert "id" not in header, ("no id could be read, yet the reply has one", header)
    else:
        assert type(header.get("id")) is int and header["id"] == exp.rid, (exp, header)
    if status:
        assert isinstance(header.get("error"), str) and header["error"], header
        assert set(header) <= {"status", "error", "id"}, header
        assert payload == [], header
    else:
        assert exp.command is not None, header
        for key, kind in SUCCESS_FIELDS[exp.command].items():
            assert isinstance(header.get(key), kind), (key, header)
        if exp.command is Cmd.INFER:
            assert len(payload) == len(header["outputs"]), header
        else:
            assert payload == [], header
    return header, payload


# ---------------------------------------------------------------- a live fuzzing session


def dealer(address: str, key_file: Path | None = None) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if key_file is not None:
        keys.read(key_file).apply_client(sock)
    sock.connect(address)
    return sock


def recv(sock: zmq.Socket, timeout: float, what: str) -> list[bytes]:
    if not sock.poll(int(timeout * 1000)):
        pytest.fail(f"no reply to {what} within {timeout} s (the doc promises one)")
    return sock.recv_multipart()


class Session:
    """A cluster under fuzz: the witness's connection, and one fuzzing DEALER per example."""

    def __init__(
        self,
        cluster: LocalCluster,
        *,
        fuzz_key: Path | None = None,
        witness_key: Path | None = None,
        victim_key: Path | None = None,
    ) -> None:
        self.cluster = cluster
        self.secure = cluster.secure
        self.fuzz_key, self.victim_key = fuzz_key, victim_key
        self.witness = dealer(cluster.address, witness_key)
        self.ids = itertools.count(1 << 40)  # ids of the harness's own requests
        self.sock: zmq.Socket | None = None
        self.handles: list[str] = []  # the fuzzing tenant's uploads begun for this example
        self.own_model = False  # whether the fuzzing tenant's `m` is known to exist
        with self.client(VICTIM) as victim:
            victim.upload_model(MODEL, TINY, replace=True)
        self.ensure_own_model()

    def client(self, tenant: str) -> Client:
        if self.secure:
            key = self.victim_key if tenant == VICTIM else self.fuzz_key
            return Client(self.cluster.address, key_file=key, timeout=60)
        return Client(self.cluster.address, tenant=tenant, timeout=60)

    def ensure_own_model(self) -> None:
        if not self.own_model:
            with self.client(FUZZ) as own:
                own.upload_model(MODEL, TINY, replace=True)
            self.own_model = True

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        self.witness.close(linger=0)

    # -- one example ---------------------------------------------------------------

    def start(self, key_file: Path | None = ...) -> zmq.Socket:
        """A fresh fuzzing connection (replies a failed example left behind die with the
        old one), by default with the fuzzing tenant's key."""
        if self.sock is not None:
            self.sock.close(linger=0)
        self.handles = []
        self.sock = dealer(self.cluster.address, self.fuzz_key if key_file is ... else key_file)
        return self.sock

    def request(self, cmd: Cmd, fields: dict[str, Any], payload: list[bytes] = ()) -> dict:
        """A well-formed request of the fuzzing tenant on this example's connection."""
        header = {"id": next(self.ids), "tenant": FUZZ, **fields}
        self.sock.send_multipart(build(TAG, cmd, header, payload))
        reply = recv(self.sock, REPLY_S, f"the harness's {cmd.name}")
        got = decode_header(reply[3], _REPLY_LIMITS)
        assert reply[2] == cmd.value and got.get("id") == header["id"], (cmd, got)
        return got

    def begin(self, complete: bool) -> str:
        """A live upload of tiny_add by the fuzzing tenant; all bytes sent if `complete`."""
        begun = self.request(
            Cmd.UPLOAD_BEGIN,
            {"name": UPLOAD_NAME, "size": len(TINY), "sha256": TINY_SHA, "replace": True},
        )
        assert begun["status"] == 0, begun
        self.handles.append(begun["upload"])
        if complete:
            chunk = self.request(Cmd.UPLOAD_CHUNK, {"upload": begun["upload"], "offset": 0}, [TINY])
            assert chunk == {"id": chunk["id"], "status": 0, "received": len(TINY)}, chunk
        return begun["upload"]

    def discard(self, handle: str, tenant: str = FUZZ) -> None:
        """End an upload whatever became of it: a chunk at offset -1 discards a live one
        (section 7.3), and a consumed or discarded handle is unknown: 33 either way."""
        header = {"id": next(self.ids), "tenant": tenant, "upload": handle, "offset": -1}
        self.sock.send_multipart(build(TAG, Cmd.UPLOAD_CHUNK, header, [b"\0"]))
        got = decode_header(recv(self.sock, REPLY_S, "the discarding chunk")[3])
        assert got.get("status") == 33, got

    def send(self, frames: list[bytes]) -> dict[str, Any]:
        """Send one fuzzed message; check its one reply, the connection, the witness."""
        exp = expect(frames, self.secure)
        if not self.secure and _destroys_victim(exp):
            self.cleanup()
            assume(False)  # not a fuzz finding: in insecure mode this *is* the victim
        self.sock.send_multipart(frames)
        reply = recv(self.sock, REPLY_S, f"{frames!r:.300}")
        header, _ = check_reply(reply, exp)
        if header["status"] == 0 and exp.command is Cmd.UPLOAD_BEGIN:
            self.discard(header["upload"], exp.tenant)
        if header["status"] == 0 and exp.command is Cmd.DELETE:
            self.own_model = False
        self.probe(self.sock)
        self.cleanup()
        return header

    def cleanup(self) -> None:
        for handle in self.handles:
            self.discard(handle)
        self.handles = []

    def probe(self, sock: zmq.Socket | None) -> None:
        """The fuzzing connection (if given) answers its next PING, not a second answer to
        an earlier message; the witness's PING is answered; the broker process lives."""
        if sock is not None:
            rid = next(self.ids)
            sock.send_multipart(build(TAG, Cmd.PING, {"id": rid, "tenant": FUZZ}))
            got = check_reply(recv(sock, REPLY_S, "the follow-up PING"), _ping_expect(rid))[0]
            assert got["id"] == rid, ("an earlier message was answered twice?", got)
        self.ping_witness()

    def ping_witness(self) -> None:
        rid = next(self.ids)
        self.witness.send_multipart(build(TAG, Cmd.PING, {"id": rid, "tenant": WITNESS}))
        check_reply(recv(self.witness, WITNESS_S, "the witness's PING"), _ping_expect(rid))
        assert self.cluster.broker is not None and self.cluster.broker.poll() is None, (
            f"the broker exited with {self.cluster.broker.returncode}; see {self.cluster.log_dir}"
        )

    def assert_victim_intact(self) -> None:
        """The victim's model is still there and still computes tiny_add (x + bias)."""
        with self.client(VICTIM) as victim:
            assert MODEL in [m["name"] for m in victim.list_models()]
            assert victim.model_info(MODEL)["sha256"] == TINY_SHA
            x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
            out = victim.infer(MODEL, {"input": x})["output"]
        np.testing.assert_allclose(out, x + BIAS, rtol=1e-6, atol=1e-6)

    def assert_no_broker_bug(self) -> None:
        """No bug was caught by the broker's loop (one that answered no one included) and
        no request was answered 90 INTERNAL (section 11: the whole broker's figures)."""
        admin_key = self.cluster.admin_key if self.secure else None
        with Client(self.cluster.address, key_file=admin_key, tenant=WITNESS) as admin:
            info = admin.status()
        assert info["internal_errors"] == 0, info
        assert "90" not in info["answers_by_status"], info["answers_by_status"]
        assert info["messages"] > 0, info


def _ping_expect(rid: int) -> Expect:
    return Expect(frozenset({0}), PING, rid, Cmd.PING)


def _destroys_victim(exp: Expect) -> bool:
    """A well-formed DELETE of the victim's model, by its own (insecure) name."""
    return exp.command is Cmd.DELETE and exp.tenant == VICTIM and exp.header.get("model") == MODEL


@pytest.fixture(scope="module")
def fuzz(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    cluster = start_cluster(tmp_path_factory.mktemp("fuzz"), workers=1)
    session = None
    try:
        session = Session(cluster)
        yield session
    finally:
        if session is not None:
            session.close()
        cluster.stop()


# ---------------------------------------------------------------- strategies

EDGE_INTS = [0, 1, -1, 127, 128, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**31 + 1, 2**32,
             2**40, 2**63 - 1, 2**63, 2**64 - 1, -(2**31), -(2**63)]  # fmt: skip
# msgpack holds integers in [-2^63, 2^64): larger ones cannot be encoded at all
INTS = st.integers(-(2**63), 2**64 - 1) | st.sampled_from(EDGE_INTS)
SCALARS = (
    st.none()
    | st.booleans()
    | INTS
    | st.floats()  # nan and +-inf included
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=8,
)
NEAR_TENANTS = [FUZZ, VICTIM, WITNESS, "default", "Victim", "victim ", " victim", "victim\x00",
                "vict1m", "", "-x", ".x", "_x", "a" * 64, "a" * 65, "ünï", "a/b"]  # fmt: skip
TENANTS = st.sampled_from([FUZZ, FUZZ, FUZZ, VICTIM, VICTIM, "default", *NEAR_TENANTS])
NAMES = st.sampled_from(
    [MODEL, UPLOAD_NAME, "nope", "", "a" * 128, "a" * 129, "../m", "m/x", ":m", "m\x00", "M"]
)
DIMS = st.lists(st.sampled_from([0, 1, 2, 3, 4, -1, 2**39, 2**40, 2**63 - 1]) | INTS, max_size=9)
SHAPES = st.sampled_from([[1, 4], [2, 4], [3, 4], [0, 4], [4], [], [1, 4, 1], [2, 5]])
DESCS = st.lists(  # mostly near tiny_add's one input, ["input", "float32", [-1, 4]]
    st.tuples(
        st.sampled_from(["input", "input", "x", ""]) | VALUES,
        st.sampled_from(["float32", "float32", *DTYPES, "float128", "", "FLOAT32"]) | VALUES,
        SHAPES | DIMS | VALUES,
    ).map(list),
    min_size=1,
    max_size=3,
)
ODD_IDS = [True, False, -1, -(2**63), 1.0, "1", None, b"\x01", [1]]  # none is an `id`
# Per field: values that are valid or nearly so (to get past the first checks)...
GOOD: dict[str, st.SearchStrategy[Any]] = {
    "id": st.integers(0, 2**64 - 1),
    "tenant": TENANTS,
    "name": NAMES,
    "model": NAMES,
    "size": st.sampled_from([1, len(TINY), 2**31, 2**31 + 1, 2**33, 0, -1]),
    "sha256": st.sampled_from([TINY_SHA, TINY_SHA.upper(), "0" * 64, "g" * 64, "0" * 63]),
    "format": st.sampled_from(["onnx", "onnx", "ONNX", "tf", ""]),
    "max_batch": st.sampled_from([1, 8, 4096, 4097, 0, -1]),
    "replace": st.booleans(),
    "upload": st.sampled_from(["0" * 24, "f" * 24, ""]),
    "offset": st.sampled_from([0, -1, 1, len(TINY), 2**63 - 1]),
    "inputs": DESCS,
    "grant": st.lists(TENANTS, max_size=3),
    "revoke": st.lists(TENANTS, max_size=3),
    "deadline_ms": st.sampled_from(
        [5000, 5000.0, 0, -1, 1e9, 1e9 - 1, 1e-3, float("nan"), float("inf"), True]
    )
    | st.floats(0, 1e10),
}
# ...or anything msgpack holds
FIELDS: dict[str, st.SearchStrategy[Any]] = {k: v | VALUES for k, v in GOOD.items()}
FIELDS["id"] |= st.sampled_from(ODD_IDS)
EXTRA_KEYS = st.dictionaries(st.text(max_size=8), VALUES, max_size=3)
# ...or keys that are not str: status 10 (section 3)
ODD_KEYS = st.dictionaries(INTS | st.binary(max_size=4) | st.booleans(), VALUES, max_size=2)
FRAME = st.binary(max_size=4096)

# (a) random frames, alone or behind a valid prefix so that deeper checks are reached
RANDOM_FRAMES = st.one_of(
    st.lists(FRAME, min_size=1, max_size=8),
    st.lists(FRAME, max_size=7).map(lambda fs: [b"", *fs]),
    st.lists(FRAME, max_size=6).map(lambda fs: [b"", TAG, *fs]),
    st.tuples(st.sampled_from([c.value for c in Cmd]), st.lists(FRAME, max_size=5)).map(
        lambda t: [b"", TAG, t[0], *t[1]]
    ),
)


def _nbytes(desc: Any) -> int | None:
    """Bytes a well-formed, small tensor description needs; None for any other."""
    if not (isinstance(desc, list) and len(desc) == 3 and isinstance(desc[1], str)):
        return None
    dtype, shape = DTYPES.get(desc[1]), desc[2]
    if dtype is None or not isinstance(shape, list) or len(shape) > 8:
        return None
    if not all(type(d) is int and 0 <= d < 4096 for d in shape):
        return None
    size = math.prod(shape) * dtype.itemsize
    return size if size <= 4096 else None


def _field(draw: st.DrawFn, key: str, header: dict[str, Any]) -> None:
    """Set `key` in `header`: absent 1 in 10, any value 2 in 10, else a near-valid one."""
    roll = draw(st.integers(0, 9))
    if roll >= 1:
        header[key] = draw(FIELDS[key] if roll <= 2 else GOOD[key])


@st.composite
def structured(draw: st.DrawFn) -> list[bytes]:
    """(b) a valid envelope, a real command byte and a random header map."""
    cmd = draw(st.sampled_from(list(Cmd)))
    if draw(st.integers(0, 15)) == 0:  # the header is not a map, or has odd keys
        header: Any = draw(VALUES | ODD_KEYS)
    else:
        header = draw(EXTRA_KEYS)
        for key in ("id", "tenant", *KEYS[cmd]):
            _field(draw, key, header)
    payload = draw(st.lists(FRAME, max_size=3))
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if isinstance(inputs, list) and inputs and draw(st.integers(0, 3)):  # frames that match
        sizes = [_nbytes(d) for d in inputs]
        if None not in sizes:
            payload = [draw(st.binary(min_size=n, max_size=n)) for n in sizes]
    return [b"", TAG, cmd.value, msgpack.packb(header, use_bin_type=True), *payload]


# (c) mutations: header-level operations first, then frame and byte operations
FIELD_OPS = st.one_of(
    st.sampled_from(ALL_KEYS).flatmap(lambda k: st.tuples(st.just("set"), st.just(k), FIELDS[k])),
    st.tuples(st.just("set"), st.sampled_from(ALL_KEYS), VALUES),
    st.tuples(
        st.just("set"),
        st.sampled_from(["size", "offset", "max_batch", "id", "deadline_ms"]),
        st.sampled_from([2**31, 2**31 + 1, 2**40, 2**63, 2**64 - 1, -(2**63), 1e300]),
    ),
    st.tuples(st.just("set"), st.just("tenant"), TENANTS),
    st.tuples(st.just("set"), st.just("id"), st.sampled_from(ODD_IDS)),
    st.tuples(st.just("unset"), st.sampled_from(ALL_KEYS)),
    st.tuples(st.just("shape"), DIMS),
    st.tuples(st.just("bloat"), st.integers(1, 64)),
)
FRAME_OPS = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4095), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.integers(0, 4095), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 4095), st.integers(1, 16)),
    st.tuples(st.just("truncate"), st.integers(0, 15), st.integers(0, 4095)),
    st.tuples(st.just("drop"), st.integers(0, 15)),
    st.tuples(st.just("dup"), st.integers(0, 15)),
    st.tuples(st.just("append"), FRAME),
    st.tuples(st.just("tag"), st.sampled_from([b"MTS2", b"MTW1", b"mts1", b"MTS", b"MTS11", b""])),
    st.tuples(st.just("tag"), st.binary(max_size=8)),
    st.tuples(
        st.just("cmd"), st.sampled_from([b"\x00", b"\x0b", b"\xff", b"\x01\x01", b"", b"\x06\x00"])
    ),
    st.tuples(st.just("cmd"), st.binary(max_size=3)),
)
MUTATIONS = st.tuples(st.sampled_from(list(Cmd)), st.lists(FIELD_OPS | FRAME_OPS, max_size=3))


def base_message(session: Session, cmd: Cmd) -> tuple[dict[str, Any], list[bytes]]:
    """A valid request of the fuzzing tenant (header, payload), over live upload handles."""
    if cmd is Cmd.UPLOAD_BEGIN:
        return {"name": UPLOAD_NAME, "size": len(TINY), "sha256": TINY_SHA, "max_batch": 4,
                "replace": True}, []  # fmt: skip
    if cmd is Cmd.UPLOAD_CHUNK:
        return {"upload": session.begin(complete=False), "offset": 0}, [TINY]
    if cmd is Cmd.UPLOAD_COMMIT:
        return {"upload": session.begin(complete=True)}, []
    if cmd is Cmd.INFER:
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        return {"model": MODEL, "inputs": [["input", "float32", [2, 4]]],
                "deadline_ms": 10_000.0}, [x.tobytes()]  # fmt: skip
    if cmd in (Cmd.INFO, Cmd.DELETE):
        return {"model": MODEL}, []
    if cmd is Cmd.SHARE:
        return {"model": MODEL, "grant": [WITNESS]}, []
    return {}, []


def mutate(cmd: Cmd, header: dict[str, Any], payload: list[bytes], ops: list[tuple]) -> list[bytes]:
    header = {"id": 7, "tenant": FUZZ, **header}
    for op in ops:
        if op[0] == "set":
            header[op[1]] = op[2]
        elif op[0] == "unset":
            header.pop(op[1], None)
        elif op[0] == "shape":
            header["inputs"] = [["input", "float32", op[1]]]
        elif op[0] == "bloat":  # a header over the 64 KiB limit: 13
            header["pad"] = "x" * (MAX_HEADER + op[1])
    frames = [b"", TAG, cmd.value, msgpack.packb(header, use_bin_type=True), *payload]
    for op in ops:
        kind, at = op[0], 3 if len(frames) > 3 else len(frames) - 1
        if kind in ("flip", "insert", "delete") and at >= 0:
            data = bytearray(frames[at])
            i = op[1] % (len(data) + 1)
            if kind == "flip" and data:
                data[i % len(data)] ^= op[2]
            elif kind == "insert":
                data[i:i] = op[2]
            elif kind == "delete":
                del data[i : i + op[2]]
            frames[at] = bytes(data)
        elif kind in ("truncate", "drop", "dup") and frames:
            i = op[1] % len(frames)
            if kind == "truncate":
                frames[i] = frames[i][: op[2] % (len(frames[i]) + 1)]
            elif kind == "drop":
                del frames[i]
            else:
                frames.insert(i, frames[i])
        elif kind == "append":
            frames.append(op[1])
        elif kind in ("tag", "cmd") and len(frames) > (1 if kind == "tag" else 2):
            frames[1 if kind == "tag" else 2] = op[1]
    return frames or [b""]  # ZeroMQ has no message of 0 frames


# ---------------------------------------------------------------- insecure broker


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(frames=RANDOM_FRAMES)
def test_random_frames_are_answered_and_harm_no_one(fuzz: Session, frames: list[bytes]) -> None:
    fuzz.start()
    fuzz.send(frames)


@settings(max_examples=600, **FUZZ_SETTINGS)
@given(frames=structured())
def test_random_headers_are_answered_and_harm_no_one(fuzz: Session, frames: list[bytes]) -> None:
    fuzz.ensure_own_model()
    fuzz.start()
    fuzz.send(frames)


@settings(max_examples=600, **FUZZ_SETTINGS)
@given(recipe=MUTATIONS)
@example(recipe=(Cmd.PING, []))  # the unmutated messages: each is answered with status 0
@example(recipe=(Cmd.UPLOAD_BEGIN, []))
@example(recipe=(Cmd.UPLOAD_CHUNK, []))
@example(recipe=(Cmd.UPLOAD_COMMIT, []))
@example(recipe=(Cmd.INFER, []))
@example(recipe=(Cmd.LIST, []))
@example(recipe=(Cmd.INFO, []))
@example(recipe=(Cmd.DELETE, []))
@example(recipe=(Cmd.STATUS, []))
@example(recipe=(Cmd.DELETE, [("set", "tenant", "victim ")]))  # near the victim's name: 14
@example(recipe=(Cmd.UPLOAD_BEGIN, [("set", "size", 2**31 + 1)]))  # over 2 GiB: 13
@example(recipe=(Cmd.INFER, [("shape", [2**39, 4])]))  # declared far beyond its frame: 40
@example(recipe=(Cmd.UPLOAD_CHUNK, [("set", "offset", 2**63 - 1)]))  # outside the upload: 33
def test_mutated_messages_are_answered_and_harm_no_one(
    fuzz: Session, recipe: tuple[Cmd, list[tuple]]
) -> None:
    cmd, ops = recipe
    fuzz.ensure_own_model()
    fuzz.start()
    header, payload = base_message(fuzz, cmd)
    reply = fuzz.send(mutate(cmd, header, payload, ops))
    if not ops:
        assert reply["status"] == 0, reply


# ZMTP 3.0 greeting of a NULL-mechanism peer (RFC 23): signature, version, mechanism, filler
ZMTP_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + bytes(32)


@settings(max_examples=40, **FUZZ_SETTINGS)
@given(
    data=st.one_of(
        st.binary(min_size=1, max_size=4096),
        st.binary(max_size=512).map(lambda b: ZMTP_GREETING + b),
        st.binary(max_size=512).map(lambda b: ZMTP_GREETING[:11] + b),
    )
)
def test_raw_tcp_garbage_harms_no_one(fuzz: Session, data: bytes) -> None:
    """Bytes that are not ZMTP (or a greeting, then garbage): libzmq drops the connection;
    nobody else notices."""
    host, port = fuzz.cluster.address.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(data)
    fuzz.probe(None)


def test_the_victim_is_untouched(fuzz: Session) -> None:
    """After the fuzz above (pytest runs a file in order): the victim's model is intact and
    the broker caught no bug of its own."""
    fuzz.assert_victim_intact()
    fuzz.assert_no_broker_bug()
    fuzz.ping_witness()


# ---------------------------------------------------------------- found by the fuzz


@settings(max_examples=1, phases=[Phase.explicit], **FUZZ_SETTINGS)
@given(frames=RANDOM_FRAMES)
@example(frames=[b"", b"MTS2", b"\x01", b"\x81\xa2id\xc3"])  # {"id": true}, wrong tag: 11
@example(frames=[b"", TAG, b"\x00", b"\x81\xa2id\xc2"])  # {"id": false}, unknown cmd: 12
def test_a_framing_error_echoes_no_boolean_id(fuzz: Session, frames: list[bytes]) -> None:
    """A boolean `id` is no id (sections 3, 9): a Python client would take True for 1."""
    fuzz.start()
    fuzz.sock.send_multipart(frames)
    check_reply(recv(fuzz.sock, REPLY_S, "the framing error"), expect(frames, False))


# ---------------------------------------------------------------- secure broker (CURVE)


@dataclass
class Secure:
    session: Session
    stranger_key: Path  # a well-formed key for this broker that nobody registered


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    if not hasattr(LocalCluster, "add_principal"):
        pytest.skip("LocalCluster has no add_principal: the CURVE API has not landed")
    state = tmp_path_factory.mktemp("fuzz-secure")
    cluster = start_cluster(state, workers=1, secure=True)
    session = None
    try:
        paths = {name: cluster.add_principal(name) for name in (VICTIM, FUZZ, WITNESS)}
        session = Session(
            cluster, fuzz_key=paths[FUZZ], witness_key=paths[WITNESS], victim_key=paths[VICTIM]
        )
        stranger = keys.generate("eve", "tenant", broker_key(cluster.state_dir).public_key)
        stranger_path = keys.write_secret(state / "eve.key_secret", stranger)
        yield Secure(session, stranger_path)
    finally:
        if session is not None:
            session.close()
        cluster.stop()


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(recipe=st.one_of(RANDOM_FRAMES, structured(), MUTATIONS))
def test_secure_fuzz_with_a_valid_key(secure: Secure, recipe: Any) -> None:
    """Over a registered tenant key the same promises hold; the `tenant` header field is
    ignored, so no value of it reaches the victim's model (no filtering here)."""
    fuzz = secure.session
    fuzz.ensure_own_model()
    fuzz.start()
    if isinstance(recipe, tuple):
        cmd, ops = recipe
        header, payload = base_message(fuzz, cmd)
        recipe = mutate(cmd, header, payload, ops)
    fuzz.send(recipe)


@settings(max_examples=20, **FUZZ_SETTINGS)
@given(frames=st.one_of(RANDOM_FRAMES, structured()), plain=st.booleans())
def test_secure_fuzz_without_a_registered_key(
    secure: Secure, frames: list[bytes], plain: bool
) -> None:
    """An unregistered CURVE key, or no CURVE at all: the handshake fails, so no reply
    ever comes (section 1); the witness keeps being answered."""
    fuzz = secure.session
    sock = fuzz.start(None if plain else secure.stranger_key)
    sock.send_multipart(frames)
    sock.send_multipart(build(TAG, Cmd.PING, {"id": 1}))
    fuzz.ping_witness()
    assert not sock.poll(100), f"a refused peer got a reply: {sock.recv_multipart()!r:.200}"


def test_secure_victim_is_untouched(secure: Secure) -> None:
    secure.session.assert_victim_intact()
    secure.session.assert_no_broker_bug()
    secure.session.ping_witness()
    with Client(secure.session.cluster.address, key_file=secure.session.cluster.admin_key) as a:
        assert a.status()["security"]["handshakes_refused"] > 0
