"""Colocated mode: each rank is one process that holds every model of the PPO loop.

A :class:`ColocatedWorker` holds the members a distributed run spreads over its groups (the policy
engine, the critic engine, the frozen reference / DPO / reward models) and a rollout sampler that
generates with the policy engine's own module: no second copy of the policy, no weight push after
an update. The phases run one after the other in the process, with the threads it was given.

The PPO loop does not change: :class:`MemberGroup` is one member's view of the colocated group and
answers like an :class:`~rto.distributed.groups.ActorGroup` (``run_all``, ``async_run_sharded``,
...), calling the member inside each rank's process. On CUDA this is the hybrid-engine pattern
(OpenRLHF, verl): one set of weights serves training and generation on each device.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from rto.distributed.groups import ActorGroup
from rto.distributed.rollout import RolloutWorker
from rto.distributed.trainable import TrainableWorker
from rto.distributed.workers import Worker

MemberSpec = tuple[type, dict[str, Any]]


class ColocatedWorker(Worker):
    """One rank of a colocated group.

    Args:
        members: name → (worker class, constructor arguments) of every member but the sampler;
            built in this order, each with this rank and world size. ``"policy"`` must be a
            :class:`TrainableWorker`.
        rollout: the :class:`RolloutWorker` arguments of the sampler (without ``model_path``: it
            samples with the policy engine's module, built in :meth:`setup`).
        num_threads: torch threads of the process (every member runs in it).
    """

    def __init__(
        self,
        members: dict[str, MemberSpec],
        rollout: dict[str, Any],
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(rank, world_size, num_threads)
        if members.get("policy", (None,))[0] is not TrainableWorker:
            raise ValueError("a colocated rank needs a trainable 'policy' member")
        self.members: dict[str, Worker] = {
            name: cls(**kwargs, rank=rank, world_size=world_size, num_threads=None)
            for name, (cls, kwargs) in members.items()
        }
        self.rollout_kwargs = rollout

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        """Set up every member on the group's one rendezvous (the trainable engines share the process
        group, and make their collective calls in the same order on every rank), then give the
        sampler the policy engine's module."""
        super().setup(master_addr, master_port)
        for member in self.members.values():
            member.setup(self.master_addr, self.master_port)
        policy = self.members["policy"]
        self.members["rollout"] = RolloutWorker(
            model=policy.model, rank=self.rank, world_size=self.world_size, num_threads=None,
            **self.rollout_kwargs,
        )  # fmt: skip

    def member_call(self, member: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``members[member].method(*args, **kwargs)``; :class:`MemberGroup` routes every call here."""
        return getattr(self.members[member], method)(*args, **kwargs)

    def shares_weights(self) -> bool:
        """The sampler generates with the very parameters the policy engine trains."""
        return self.members["rollout"].model is self.members["policy"].model


class MemberGroup(ActorGroup):
    """The ``member`` of a colocated :class:`ActorGroup` of :class:`ColocatedWorker` s, seen as a
    group of its own: same actors, same placement, calls routed to the member in each process.
    Shutting a member group down shuts the whole colocated group down."""

    def __init__(self, group: ActorGroup, member: str) -> None:  # no super().__init__: no new actors
        self.base = group
        self.member = member
        self.name = member
        self.worker_cls = group.worker_cls
        self.num_actors = group.num_actors

    @property
    def actors(self) -> list:
        return self.base.actors

    @property
    def placement(self) -> list[dict[str, Any]]:
        return self.base.placement

    @property
    def placement_group(self):
        return self.base.placement_group

    def _remote(self, actor, method: str) -> Callable:
        return functools.partial(actor.member_call.remote, self.member, method)

    def shutdown(self) -> None:
        self.base.shutdown()
