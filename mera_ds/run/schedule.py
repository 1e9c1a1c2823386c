"""When each step of a plan may start: once the steps that write the artifacts it reads are done.

The plan (run.plan) lists steps stage by stage; most of stage i is not on the path to stage
i+1: finetune_{i+1} starts from theta_i (the merge of stage i, or its finetune), which neither
realign_i nor evaluate_i changes. The dependency schedule runs each step as soon as its inputs
exist, so replay, realign and evaluate of a stage run beside the next stage's finetune where the
cluster has the resources for both (Ray queues a step that does not fit until one ends).

Among the steps that are ready at once, the one that more of the plan waits on starts first: the
next finetune before a realign, so the path through the stages is never held up by steps beside
it. `simulate` runs the same policy on a model of a cluster (step costs and resources given), for
what a schedule would take on a cluster one does not have.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Iterable

from mera_ds.run.plan import Step


def dependencies(steps: list[Step]) -> dict[str, set[str]]:
    """{step: the steps (of `steps`) that write an artifact it reads}."""
    writer = {url: s.name for s in steps for url in s.outputs}
    return {s.name: {writer[url] for url in s.inputs if url in writer} for s in steps}


def waiting_on(steps: list[Step], deps: dict[str, set[str]]) -> dict[str, int]:
    """{step: how many steps wait on it, directly or through others}, given their
    dependencies."""
    after: dict[str, set[str]] = {s.name: set() for s in steps}
    for s in reversed(steps):  # a step's dependents come after it in the plan
        for d in deps[s.name]:
            after[d] |= {s.name} | after[s.name]
    return {name: len(names) for name, names in after.items()}


class Schedule:
    """The steps of a plan still to run, and which of them may start now. `done`: the steps
    finished before (a resumed run's)."""

    def __init__(self, steps: list[Step], done: Iterable[str] = ()):
        self.deps = dependencies(steps)
        self.done = set(done)
        waiting, order = waiting_on(steps, self.deps), {s.name: i for i, s in enumerate(steps)}
        self.rank = {s.name: (-waiting[s.name], order[s.name]) for s in steps}
        self.pending = [s for s in steps if s.name not in self.done]

    def ready(self) -> list[Step]:
        """The pending steps whose inputs are all written, first those more of the plan waits
        on; they are taken out of the pending ones."""
        ready = [s for s in self.pending if self.deps[s.name] <= self.done]
        self.pending = [s for s in self.pending if s not in ready]
        return sorted(ready, key=lambda s: self.rank[s.name])

    def finish(self, name: str) -> None:
        self.done.add(name)


@dataclass(frozen=True)
class Span:
    name: str
    start: float
    end: float


def simulate(steps: list[Step], cost: Callable[[Step], float],
             demand: Callable[[Step], float], capacity: float,
             sequential: bool = False) -> list[Span]:
    """The steps' start and end times on a model cluster: `capacity` units of one resource
    (GPUs, say), step s holding demand(s) of them for cost(s) seconds. Dependency schedule:
    at each moment the ready steps start in Schedule's order, each that fits; `sequential`: one
    after the other in the plan's order."""
    if sequential:
        spans, t = [], 0.0
        for s in steps:
            spans.append(Span(s.name, t, t + cost(s)))
            t += cost(s)
        return spans
    for s in steps:
        if demand(s) > capacity:
            raise ValueError(f"{s.name} needs {demand(s)} of a cluster of {capacity}")
    schedule, spans, now, free = Schedule(steps), [], 0.0, capacity
    queued: list[Step] = []
    running: list[tuple[float, int, Step]] = []  # (end, tie-break, step): a heap
    while True:
        queued = sorted(queued + schedule.ready(), key=lambda s: schedule.rank[s.name])
        for s in list(queued):
            if demand(s) <= free:
                queued.remove(s)
                free -= demand(s)
                heapq.heappush(running, (now + cost(s), len(spans), s))
                spans.append(Span(s.name, now, now + cost(s)))
        if not running:
            return spans
        now, _, s = heapq.heappop(running)
        free += demand(s)
        schedule.finish(s.name)
