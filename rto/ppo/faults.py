"""What the PPO stage does when actors or nodes are lost (docs/cluster.md, "When a node is lost").

A lost actor shows up as a Ray error from a call on it (`LOST`). The `Supervisor` then finds every
lost actor (the failing call names one; a health check of all the others finds the rest, e.g. the
other actors of a lost node) and recovers:

* only frozen scorers (ref, dpo, rm) or rollout workers lost: their groups are built again on any
  node with room, the rollout workers get the current policy weights, and the interrupted phase of
  the step is run again. No checkpoint is needed and no step is repeated.
* a trainable actor (policy, critic) lost: its state since the last checkpoint is gone. `Rewind`
  tells the stage to rebuild every group and continue from the last complete checkpoint (the start
  of the stage if there is none), dropping the metrics and traces of the steps after it.

Every recovery waits up to `fault_tolerance.wait_for_resources_s` for room (a replacement node),
counts in the `restarts` metric and writes one line naming the actor, its node and the cause.
More recoveries in a row than `fault_tolerance.retries` end the stage with a `ClusterError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rto.errors import ClusterError
from rto.ppo.config import FaultToleranceConfig
from rto.ppo.groups import GroupBuilder, Groups

# The errors of a call whose actor (or the owner of one of its inputs) is gone: its process died,
# its node died or cannot be reached. Anything else (an exception raised by our code) is not a fault.
LOST = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.ObjectLostError,  # OwnerDiedError: the weights' owner (a policy rank) is gone
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.ActorPlacementGroupRemoved,
)

T = TypeVar("T")


@dataclass
class LostActor:
    group: str
    rank: int
    node: str  # "1a2b3c4d (10.0.0.5)"
    cause: str
    node_id: str | None = None

    def __str__(self) -> str:
        return f"{self.group}-{self.rank} on node {self.node}"


class Rewind(Exception):
    """A trainable actor was lost: rebuild every group and continue from the last checkpoint."""

    def __init__(self, lost: list[LostActor]):
        super().__init__(", ".join(map(str, lost)))
        self.lost = lost


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


class Supervisor:
    """Runs the phases of a PPO step and recovers from lost actors (see the module docstring).

    ``on_rollout_rebuilt(groups)`` gives rebuilt rollout workers the current weights."""

    def __init__(
        self,
        settings: FaultToleranceConfig,
        builder: GroupBuilder,
        on_rollout_rebuilt: Callable[[Groups], None],
        log: Callable[[str], None] = print,
        announce: Callable[[list], None] = lambda groups: None,
    ) -> None:
        self.settings = settings
        self.builder = builder
        self.on_rollout_rebuilt = on_rollout_rebuilt
        self.log = log
        self.announce = announce  # says where rebuilt groups run
        self.restarts = 0  # every recovery of the stage
        self.in_a_row = 0  # recoveries since the last completed step

    def step_completed(self) -> None:
        self.in_a_row = 0

    def run(self, groups: Groups, phase: Callable[[], T], what: str, retry: bool = True) -> T:
        """``phase()``; when it fails because actors were lost, recover and (``retry``) run it again.
        With ``retry=False`` (a phase that changes the trainable state, such as the update) any
        loss rewinds to the last checkpoint."""
        while True:
            try:
                return phase()
            except LOST as exc:
                lost = self.find_lost(groups, exc)
                self.count(lost, exc, what)
                if not retry or any(item.group in groups.trainable_names() for item in lost):
                    raise Rewind(lost) from None
                self.rebuild(groups, {item.group for item in lost}, lost)

    def count(self, lost: list[LostActor], exc: BaseException, what: str) -> None:
        """Count one recovery and log it; give up past `retries` recoveries in a row."""
        self.restarts += 1
        self.in_a_row += 1
        names = ", ".join(map(str, lost)) or "an actor"
        cause = lost[0].cause if lost else first_line(exc)
        self.log(f"[yellow]lost {names} during {what} ({cause}); recovery {self.in_a_row}[/yellow]")
        if self.in_a_row > self.settings.retries:
            raise ClusterError(
                f"ppo: gave up after {self.in_a_row - 1} recoveries in a row "
                f"(ppo.fault_tolerance.retries = {self.settings.retries}); last lost: {names} ({cause})"
            )
        pause = min(60.0, self.settings.backoff_s * 2 ** (self.in_a_row - 1))
        if pause:
            time.sleep(pause)

    def settle(self, lost: list[LostActor]) -> None:
        """Before anything is placed again: a node of a lost actor that no longer answers is lost
        itself; wait until the cluster has marked it dead, so that nothing is placed on it."""
        for node_id in {item.node_id for item in lost if item.node_id}:
            if node_answers(node_id):
                continue
            self.log(f"node {node_id[:8]} does not answer; waiting for the cluster to mark it dead")
            deadline = time.monotonic() + max(60.0, self.settings.probe_timeout_s)
            while time.monotonic() < deadline and any(
                n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()
            ):
                time.sleep(1.0)

    def rebuild(self, groups: Groups, names: set[str], lost: list[LostActor] = ()) -> None:
        """Build the lost frozen/rollout groups again (waiting for room), then sync the weights."""
        started = time.monotonic()
        self.settle(list(lost))
        names = self.builder.rebuild(groups, names)
        if "rollout" in names:
            self.on_rollout_rebuilt(groups)
        self.log(f"rebuilt {', '.join(sorted(names))} in {time.monotonic() - started:.1f} s")
        self.announce([getattr(groups, name) for name in sorted(names)])

    def find_lost(self, groups: Groups, exc: BaseException) -> list[LostActor]:
        """Every actor that is gone: the one the error names, and any other that fails its health
        check (or does not answer it within `probe_timeout_s`; a busy actor answers when its current
        call ends). If the named actor is trainable, the rest are not checked: all are rebuilt."""
        owners: dict[str, tuple] = {}
        for group in groups.all():  # colocated: one actor serves every group; the policy's (first) owns it
            for actor_id, rank in group.actor_ids().items():
                owners.setdefault(actor_id, (group, rank))
        lost: dict[tuple[str, int], LostActor] = {}
        actor_id = getattr(exc, "actor_id", None)
        if actor_id in owners:
            group, rank = owners[actor_id]
            lost[(group.name, rank)] = self._lost(group, rank, first_line(exc))
            if group.name in groups.trainable_names():
                return list(lost.values())
        probes = {
            group.actors[rank].where.remote(): (group, rank)
            for group in groups.all()
            for rank in range(group.num_actors)
            if (group.name, rank) not in lost
        }
        ready, pending = ray.wait(
            list(probes), num_returns=len(probes), timeout=self.settings.probe_timeout_s
        )
        for ref in ready:
            try:
                ray.get(ref)
            except Exception as probe_exc:  # noqa: BLE001 - any failed health check means lost
                group, rank = probes[ref]
                lost[(group.name, rank)] = self._lost(group, rank, first_line(probe_exc))
        for ref in pending:
            group, rank = probes[ref]
            why = f"no answer to the health check within {self.settings.probe_timeout_s:g} s"
            lost[(group.name, rank)] = self._lost(group, rank, why)
        return list(lost.values())

    @staticmethod
    def _lost(group, rank: int, cause: str) -> LostActor:
        where = group.placement[rank]
        node = f"{(where['node_id'] or 'local')[:8]} ({where['ip']})"
        return LostActor(group.name, rank, node, cause, where["node_id"])


@ray.remote(num_cpus=0)
def _here() -> bool:
    return True


def node_answers(node_id: str, timeout_s: float = 5.0) -> bool:
    """A zero-CPU task pinned to the node runs within ``timeout_s``."""
    strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
    try:
        return ray.get(_here.options(scheduling_strategy=strategy).remote(), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - no answer, for whatever reason, is what we ask about
        return False
