"""The worker protocol's messages as typed structs, decoded once where they arrive.

The broker builds an action (`LoadModel`, `Infer`, `UnloadModel`, `ProfileModel`) and
`encode`s it into a header map; the worker `decode`s it into the same struct; results
(`LoadModelResult`, `InferResult`, `ProfileModelResult`) go the other way. No layer
reads header keys itself. Both ends are ours, so decoding checks types and shapes
rather than tenant-grade limits, and raises ProtocolError on anything else.

Time windows. Broker and worker clocks differ, so a window travels relative to the
moment its action was sent: `earliest` and `latest` are seconds after sending (latest
`None`: no limit). The receiver adds them to its own receipt time. On loopback or a LAN
the one-way delay (tens of microseconds) is the whole error, and it errs late: the worker
sees the window a little later than the broker meant it, so it rejects a little less.
Results report durations, never absolute times, for the same reason.

Action status codes are the worker's own, numbered by stage like Clockwork's; the broker
maps each to the tenant status its requests get (`TENANT_STATUS`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any, ClassVar

from mtcore.errors import ProtocolError, Status
from mtcore.protocol import WCmd


class ActionStatus(IntEnum):
    """Outcome of one worker action."""

    OK = 0
    # 2x: load (cold -> host -> device)
    LOAD_TOO_LATE = 20  # the load could not start before its `latest`
    LOAD_FETCH_FAILED = 21  # the broker's store did not deliver the model's bytes
    LOAD_INVALID = 22  # the artifact is corrupt or ONNX Runtime refuses it
    LOAD_POOL_EXHAUSTED = 23  # the host pool cannot fit the weights, even after evicting
    LOAD_NO_ROOM = 24  # the device budget cannot fit the session beside running ones
    # 3x: input
    INPUT_INVALID = 30  # input frames do not match their descriptions
    # 4x: exec
    EXEC_TOO_LATE = 40  # the batch could not start before its `latest`
    EXEC_MODEL_MISSING = 41  # the model is not in the device tier
    EXEC_FAILED = 42  # the run raised (per-request errors travel in `results`)
    EXEC_STOPPED = 43  # the run passed the worker's run limit and was stopped
    # 9x: the worker itself
    INTERNAL = 90  # a worker bug: the message says where


TENANT_STATUS: dict[ActionStatus, Status] = {
    ActionStatus.OK: Status.OK,
    ActionStatus.LOAD_TOO_LATE: Status.DEADLINE_EXPIRED,
    ActionStatus.LOAD_FETCH_FAILED: Status.LOAD_FAILED,
    ActionStatus.LOAD_INVALID: Status.LOAD_FAILED,
    ActionStatus.LOAD_POOL_EXHAUSTED: Status.LOAD_FAILED,
    ActionStatus.LOAD_NO_ROOM: Status.LOAD_FAILED,
    ActionStatus.INPUT_INVALID: Status.INPUT_INVALID,
    ActionStatus.EXEC_TOO_LATE: Status.DEADLINE_EXPIRED,
    ActionStatus.EXEC_MODEL_MISSING: Status.WORKER_LOST,
    ActionStatus.EXEC_FAILED: Status.EXEC_FAILED,
    ActionStatus.EXEC_STOPPED: Status.EXEC_FAILED,
    ActionStatus.INTERNAL: Status.INTERNAL,
}


def action_status(value: int) -> ActionStatus:
    try:
        return ActionStatus(value)
    except ValueError:
        return ActionStatus.INTERNAL


# ---------------------------------------------------------------- shared parts


@dataclass(slots=True)
class Timing:
    """Measured microseconds per stage of one action."""

    queue: int = 0  # received -> an executor claimed it
    load: int = 0  # cold -> host and host -> device (LOAD), 0 otherwise
    input: int = 0  # decoding input frames (INFER)
    exec: int = 0  # running the model (INFER)
    output: int = 0  # encoding outputs (INFER)
    total: int = 0  # received -> result sent

    def to_wire(self) -> list[int]:
        return [self.queue, self.load, self.input, self.exec, self.output, self.total]

    @classmethod
    def from_wire(cls, value: Any) -> Timing:
        if not isinstance(value, (list, tuple)) or len(value) != 6:
            raise ProtocolError(f"timing must be 6 integers, got {value!r:.80}")
        return cls(*(int(v) for v in value))


@dataclass(slots=True)
class TierReport:
    """What a worker holds in each tier, and the bytes free there."""

    host_models: list[str] = field(default_factory=list)  # sha256s, least recent first
    host_used: int = 0  # pool bytes held by weights (whole pages)
    host_free: int = 0  # pool bytes free
    device_models: list[str] = field(default_factory=list)  # runnable sessions
    device_used: int = 0  # measured bytes charged by those sessions
    device_free: int = 0  # budget left

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, value: Any) -> TierReport:
        if not isinstance(value, dict):
            raise ProtocolError("tiers must be a map")
        try:
            return cls(
                [str(s) for s in value.get("host_models", ())],
                int(value.get("host_used", 0)),
                int(value.get("host_free", 0)),
                [str(s) for s in value.get("device_models", ())],
                int(value.get("device_used", 0)),
                int(value.get("device_free", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"tiers: {exc}") from None


def _window(value: Any, name: str) -> float:
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{name} must be seconds or null")
    return float(value)


def _wire_window(value: float) -> float | None:
    return None if math.isinf(value) else value


# ---------------------------------------------------------------- actions


@dataclass(slots=True)
class Action:
    """Fields every action carries. Windows are seconds after the action was sent."""

    cmd: ClassVar[WCmd]
    action: int  # id; its result carries it back
    sha256: str
    earliest: float = 0.0  # may not start before
    latest: float = math.inf  # must start by (inf: no limit)
    expected_duration: float = 0.0  # the controller's prediction, seconds

    def to_header(self) -> dict[str, Any]:
        header = {
            "action": self.action,
            "sha256": self.sha256,
            "earliest": self.earliest,
            "latest": _wire_window(self.latest),
            "expected_duration": self.expected_duration,
        }
        header.update(self._extra())
        return header

    def _extra(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _common(cls, h: dict[str, Any]) -> dict[str, Any]:
        action, sha = h.get("action"), h.get("sha256")
        if isinstance(action, bool) or not isinstance(action, int) or not isinstance(sha, str):
            raise ProtocolError("an action needs an integer 'action' and a string 'sha256'")
        return {
            "action": action,
            "sha256": sha,
            "earliest": _window(h.get("earliest", 0.0), "earliest"),
            "latest": _window(h.get("latest"), "latest"),
            "expected_duration": _window(h.get("expected_duration", 0.0), "expected_duration"),
        }

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Action:
        return cls(**cls._common(h))


@dataclass(slots=True)
class LoadModel(Action):
    """Make a model runnable: fetch (cold), prepare (host) and build a session (device)."""

    cmd: ClassVar[WCmd] = WCmd.LOAD_MODEL


@dataclass(slots=True)
class UnloadModel(Action):
    """Drop a model's session (device tier); `all` drops every one. Its host pages stay,
    unless `forget` (the model was deleted): then they go back to the pool too."""

    cmd: ClassVar[WCmd] = WCmd.UNLOAD_MODEL
    all: bool = False
    forget: bool = False

    def _extra(self) -> dict[str, Any]:
        return {"all": self.all, "forget": self.forget}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> UnloadModel:
        return cls(
            **cls._common(h), all=bool(h.get("all", False)), forget=bool(h.get("forget", False))
        )


@dataclass(slots=True)
class Infer(Action):
    """Run one batch: `requests` is `[rid, [tensor descriptions]]` per request, in the
    order of the payload frames."""

    cmd: ClassVar[WCmd] = WCmd.INFER
    requests: list[list[Any]] = field(default_factory=list)

    def _extra(self) -> dict[str, Any]:
        return {"requests": self.requests}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Infer:
        requests = h.get("requests")
        if not isinstance(requests, list) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and isinstance(r[0], int) for r in requests
        ):
            raise ProtocolError("INFER needs 'requests': [[rid, descriptions], ...]")
        return cls(**cls._common(h), requests=requests)


@dataclass(slots=True)
class ProfileModel(Action):
    """Measure a model: `samples` runs per batch size, load times, memory per tier."""

    cmd: ClassVar[WCmd] = WCmd.PROFILE_MODEL
    batches: list[int] = field(default_factory=lambda: [1])
    samples: int = 10

    def _extra(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> ProfileModel:
        batches = h.get("batches", [1])
        samples = h.get("samples", 10)
        if not isinstance(batches, list) or not all(
            isinstance(b, int) and 1 <= b <= 1 << 16 for b in batches
        ):
            raise ProtocolError("PROFILE_MODEL 'batches' must be a list of sizes")
        if not isinstance(samples, int) or not 1 <= samples <= 1000:
            raise ProtocolError("PROFILE_MODEL 'samples' must be 1..1000")
        return cls(**cls._common(h), batches=batches, samples=samples)


ACTIONS: dict[WCmd, type[Action]] = {
    cls.cmd: cls for cls in (LoadModel, UnloadModel, Infer, ProfileModel)
}


def decode_action(cmd: WCmd, header: dict[str, Any]) -> Action:
    cls = ACTIONS.get(cmd)
    if cls is None:
        raise ProtocolError(f"{cmd.name} is not an action")
    return cls.from_header(header)


# ---------------------------------------------------------------- results


@dataclass(slots=True)
class Result:
    """Fields every result carries."""

    cmd: ClassVar[WCmd]
    action: int
    sha256: str
    status: ActionStatus = ActionStatus.OK
    error: str = ""  # why, for a person, when status is not OK
    timing: Timing = field(default_factory=Timing)
    tiers: TierReport | None = None  # the worker's tiers after the action
    evicted: list[str] = field(default_factory=list)  # sessions dropped to make room

    @property
    def ok(self) -> bool:
        return self.status is ActionStatus.OK

    def to_header(self) -> dict[str, Any]:
        header = {
            "action": self.action,
            "sha256": self.sha256,
            "status": int(self.status),
            "error": self.error,
            "timing": self.timing.to_wire(),
            "evicted": self.evicted,
        }
        if self.tiers is not None:
            header["tiers"] = self.tiers.to_wire()
        header.update(self._extra())
        return header

    def _extra(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _common(cls, h: dict[str, Any]) -> dict[str, Any]:
        action, status = h.get("action"), h.get("status")
        if not isinstance(action, int) or not isinstance(status, int):
            raise ProtocolError("a result needs integer 'action' and 'status'")
        evicted = h.get("evicted", [])
        if not isinstance(evicted, list):
            raise ProtocolError("'evicted' must be a list")
        tiers = h.get("tiers")
        return {
            "action": action,
            "sha256": str(h.get("sha256", "")),
            "status": action_status(status),
            "error": str(h.get("error", "")),
            "timing": Timing.from_wire(h.get("timing", [0] * 6)),
            "tiers": None if tiers is None else TierReport.from_wire(tiers),
            "evicted": [str(s) for s in evicted],
        }

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> Result:
        return cls(**cls._common(h))


@dataclass(slots=True)
class LoadModelResult(Result):
    cmd: ClassVar[WCmd] = WCmd.LOAD_MODEL
    tier: str = ""  # where the model was found: "device", "host" or "cold"

    def _extra(self) -> dict[str, Any]:
        return {"tier": self.tier}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> LoadModelResult:
        return cls(**cls._common(h), tier=str(h.get("tier", "")))


@dataclass(slots=True)
class RequestResult:
    """One request of a batch: its status (a tenant Status) and output descriptions."""

    rid: int
    status: int
    error: str | None
    outputs: list[Any]  # [name, dtype, shape] per output frame

    def to_wire(self) -> list[Any]:
        return [self.rid, self.status, self.error, self.outputs]


@dataclass(slots=True)
class InferResult(Result):
    cmd: ClassVar[WCmd] = WCmd.INFER
    results: list[RequestResult] = field(default_factory=list)

    def _extra(self) -> dict[str, Any]:
        return {"results": [r.to_wire() for r in self.results]}

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> InferResult:
        raw = h.get("results", [])
        if not isinstance(raw, list):
            raise ProtocolError("'results' must be a list")
        results = []
        for item in raw:
            if not isinstance(item, (list, tuple)) or len(item) != 4:
                raise ProtocolError("each result is [rid, status, error, outputs]")
            rid, status, error, outputs = item
            if not isinstance(rid, int) or not isinstance(status, int):
                raise ProtocolError("a result's rid and status are integers")
            if not isinstance(outputs, list):
                raise ProtocolError("a result's outputs are a list")
            results.append(RequestResult(rid, status, None if error is None else str(error),
                                         outputs))  # fmt: skip
        return cls(**cls._common(h), results=results)


@dataclass(slots=True)
class ProfileModelResult(Result):
    """`profile` maps batch size to every measured run, microseconds, in run order."""

    cmd: ClassVar[WCmd] = WCmd.PROFILE_MODEL
    profile: dict[int, list[float]] = field(default_factory=dict)
    prepare_us: float = 0.0  # cold -> host (optimize once, weights into pages)
    build_us: list[float] = field(default_factory=list)  # host -> device, each build measured
    fresh_us: float = 0.0  # a session built from bytes the usual way, for comparison
    weight_bytes: int = 0  # host tier: exact weight bytes
    session_bytes: int = 0  # device tier: measured bytes one session adds

    def _extra(self) -> dict[str, Any]:
        return {
            "profile": {str(b): times for b, times in self.profile.items()},
            "prepare_us": self.prepare_us,
            "build_us": self.build_us,
            "fresh_us": self.fresh_us,
            "weight_bytes": self.weight_bytes,
            "session_bytes": self.session_bytes,
        }

    @classmethod
    def from_header(cls, h: dict[str, Any]) -> ProfileModelResult:
        raw = h.get("profile", {})
        if not isinstance(raw, dict):
            raise ProtocolError("'profile' must be a map of batch size to runs")
        try:
            profile = {
                int(b): [float(t) for t in (times if isinstance(times, list) else [times])]
                for b, times in raw.items()
            }
            return cls(
                **cls._common(h),
                profile=profile,
                prepare_us=float(h.get("prepare_us", 0.0)),
                build_us=[float(t) for t in h.get("build_us", [])],
                fresh_us=float(h.get("fresh_us", 0.0)),
                weight_bytes=int(h.get("weight_bytes", 0)),
                session_bytes=int(h.get("session_bytes", 0)),
            )
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"PROFILE_MODEL result: {exc}") from None


RESULTS: dict[WCmd, type[Result]] = {
    cls.cmd: cls for cls in (LoadModelResult, InferResult, ProfileModelResult)
}


def decode_result(cmd: WCmd, header: dict[str, Any]) -> Result:
    cls = RESULTS.get(cmd)
    if cls is None:
        raise ProtocolError(f"{cmd.name} carries no result")
    return cls.from_header(header)
