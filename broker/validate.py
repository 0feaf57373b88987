"""Checks a request's tensors against its model's signature before anything is queued.

The request's descriptions arrive decoded (`mtcore.messages.Infer.inputs`); what is
checked here needs the model: names, dtypes, ranks, fixed dimensions, batch rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.registry import ModelRecord
from mtcore.errors import InputInvalid
from mtcore.protocol import TensorDesc, check_frames

PLAN_CACHE_SIZE = 64  # distinct input layouts remembered per model


@dataclass(frozen=True)
class InputPlan:
    """How one layout of a request's `inputs` maps onto its model: checked once, reused."""

    sent: tuple[TensorDesc, ...]  # descriptions in the order the request sent them
    descs: list[TensorDesc]  # in the model's signature order
    order: tuple[int, ...]  # for each signature input, the index of its frame
    batch: int  # rows along the batch axis
    wire: list[Any]  # `descs` as wire lists, for the worker's INFER action

    def frames(self, payload: list[Any]) -> list[Any]:
        """The payload frames in signature order, after checking count and byte sizes."""
        check_frames(self.sent, payload)
        return [payload[i] for i in self.order]


def plan_inputs(model: ModelRecord, inputs: tuple[TensorDesc, ...]) -> InputPlan:
    """The plan for a request's decoded `inputs` (`Infer.inputs`), cached per model.

    Tenants send the same layout over and over, so checking it against the model and
    ordering it once per model takes that work off the hot path. The key is the decoded
    descriptions themselves: the decode admits only str names and dtypes and int
    dimensions, so equal keys are identical layouts.
    """
    plan = model.input_plans.get(inputs)
    if plan is None:
        descs, order, batch = order_inputs(model, list(inputs), list(range(len(inputs))))
        plan = InputPlan(inputs, descs, tuple(order), batch, [d.to_wire() for d in descs])
        if len(model.input_plans) >= PLAN_CACHE_SIZE:
            model.input_plans.clear()
        model.input_plans[inputs] = plan
    return plan


def order_inputs(
    model: ModelRecord, descs: list[TensorDesc], frames: list[Any]
) -> tuple[list[TensorDesc], list[Any], int]:
    """Inputs in signature order with their frames, and the request's batch rows.

    Raises InputInvalid naming the first mismatch: missing or extra names, dtype, rank,
    a fixed dimension, or batch sizes that differ between inputs.
    """
    by_name = {d.name: (d, f) for d, f in zip(descs, frames, strict=True)}
    if len(by_name) != len(descs):
        raise InputInvalid("an input name appears more than once")
    expected = [d.name for d in model.inputs]
    if set(by_name) != set(expected):
        raise InputInvalid(
            f"model '{model.name}' takes inputs {expected}; the request sent {list(by_name)}"
        )
    ordered = [by_name[d.name] for d in model.inputs]
    batch = None
    for want, (got, _) in zip(model.inputs, ordered, strict=True):
        _check_one(model, want, got)
        if model.batchable:
            if batch is not None and got.shape[0] != batch:
                raise InputInvalid(
                    f"inputs disagree on the batch size: '{got.name}' has {got.shape[0]} rows, "
                    f"others {batch}"
                )
            batch = got.shape[0]
    return [d for d, _ in ordered], [f for _, f in ordered], batch or 1


def _check_one(model: ModelRecord, want: TensorDesc, got: TensorDesc) -> None:
    if got.dtype != want.dtype:
        raise InputInvalid(
            f"input '{got.name}' of model '{model.name}' must be {want.dtype}, got {got.dtype}"
        )
    if len(got.shape) != len(want.shape):
        raise InputInvalid(
            f"input '{got.name}' of model '{model.name}' must have shape {_show(want.shape)}, "
            f"got {list(got.shape)}"
        )
    for axis, (w, g) in enumerate(zip(want.shape, got.shape, strict=True)):
        if w not in (-1, g):
            raise InputInvalid(
                f"input '{got.name}' of model '{model.name}' must have shape {_show(want.shape)}, "
                f"got {list(got.shape)} (axis {axis})"
            )
    if model.batchable and got.shape[0] == 0:
        raise InputInvalid(f"input '{got.name}' has an empty batch (0 rows)")


def _show(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"
