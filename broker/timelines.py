"""A worker's timelines: when each executor and its loader will be free.

The predictive scheduler keeps, per worker, the predicted free time of each executor
(`WorkerPlan.lanes`) and of its loader, and when each model being loaded will be ready.
These functions are the arithmetic on them, kept apart from the decisions that use them:
which executor a batch takes, when executors that free at different times will have done
a given amount of work, and how to re-plan from what is still in flight when a result
comes back. Times are monotonic seconds; nothing here reads a clock.
"""

from __future__ import annotations

import bisect

from broker.scheduler import WorkerPlan
from broker.state import Action, ActionKind


def first_lane(lanes: list[float], long: bool) -> int:
    """The executor a batch goes to: the first free one, but never lane 0 for a long run
    on a worker with more (lane 0 is kept for short runs with tight deadlines)."""
    if long and len(lanes) > 1:
        return 1 + min(range(len(lanes) - 1), key=lambda i: lanes[i + 1])
    return min(range(len(lanes)), key=lanes.__getitem__)


def water_level(levels: list[float], work: float, now: float) -> float:
    """When executors that free at the sorted `levels` (none before `now`) have together
    done `work` seconds: each takes work from its own free time on."""
    n = len(levels)
    k = bisect.bisect_right(levels, now)  # free already: they start at `now`
    level = now
    if k == 0:
        level, k = levels[0], 1
    while k < n:
        room = k * (levels[k] - level)
        if work <= room:
            return level + work / k
        work -= room
        level = levels[k]
        k += 1
    return level + work / n


def replan_lanes(plan: WorkerPlan, now: float, done: Action | None) -> list[float]:
    """Each executor's free time from the INFERs in flight, in the order sent. One
    already running ends as planned (or now, if overdue): its progress is kept, not
    restarted. If `done` was an INFER, the executor it ran on just freed and starts its
    next batch now."""
    running = len(plan.lanes) - (done is not None and done.kind is ActionKind.INFER)
    lanes = [now] * len(plan.lanes)
    ready = plan.ready
    for action in plan.running.values():
        d = action.expected_duration
        i = first_lane(lanes, action.long)
        model_ready = ready.get(action.sha256, now)
        if running > 0 and action.start and action.start <= now and model_ready <= now:
            lanes[i] = max(now, action.start + d)  # it was running: it continues
        else:
            lanes[i] = max(lanes[i], model_ready) + d
        running -= 1
    return lanes


def replan_loader(plan: WorkerPlan, now: float, freed: bool) -> tuple[float, dict[str, float]]:
    """(when the loader is free, when each model being loaded is ready) from the LOADs in
    flight, in the order sent; the first continues as planned unless the loader just
    `freed` (a load ended: the next starts now)."""
    loader = now
    ready: dict[str, float] = {}
    running = not freed
    for action in plan.loading.values():
        d = action.expected_duration
        if running and action.start:
            loader = max(now, action.start + d)
        else:
            loader = max(loader, action.start) + d
        running = False
        ready[action.sha256] = loader
    return loader, ready
