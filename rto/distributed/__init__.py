"""The thin distributed layer: Ray actor groups and the workers they run.

Typical use (see ``tests/test_distributed.py``)::

    init_ray(address=None, num_cpus=2)
    pg = create_placement_group(2, {"CPU": 1})                 # shared => colocated groups
    policy = ActorGroup(TrainableWorker, 2, placement_group=pg, resources=Resources(num_cpus=0.5),
                        worker_kwargs=dict(model_path=path, config=EngineConfig(zero_stage=2)))
    rollout = ActorGroup(RolloutWorker, 1, placement_group=pg, resources=Resources(num_cpus=0.5),
                         worker_kwargs=dict(model_path=path, max_new_tokens=16))
    samples = rollout.run_sharded("generate", {"input_ids": ids, "attention_mask": mask})
    policy.run_sharded("train_step", minibatch, loss_fn=policy_loss)
    push_weights(policy, rollout)
"""

from __future__ import annotations

import ray

from rto.distributed.groups import (
    ActorGroup,
    Resources,
    concat_results,
    create_placement_group,
    init_ray,
    split_batch,
)
from rto.distributed.rollout import RolloutWorker
from rto.distributed.trainable import EngineConfig, TrainableScorer, TrainableWorker
from rto.distributed.workers import FrozenModelWorker, Worker, state_dict_checksum, weights_checksum


def push_weights(policy: ActorGroup, *targets: ActorGroup) -> None:
    """Send the policy's new weights to every worker of ``targets`` (rollout groups): rank 0 gathers
    the full state dict and ``ray.put`` s it once; each target worker loads it with
    ``update_weights``. Blocks until all targets have loaded the weights."""
    refs = [r for r in policy.run_all("broadcast_weights_ref") if r is not None]
    (weights_ref,) = refs[0]
    ray.get([ref for group in targets for ref in group.async_run_all("update_weights", weights_ref)])


__all__ = [
    "ActorGroup",
    "EngineConfig",
    "FrozenModelWorker",
    "Resources",
    "RolloutWorker",
    "TrainableScorer",
    "TrainableWorker",
    "Worker",
    "concat_results",
    "create_placement_group",
    "init_ray",
    "push_weights",
    "split_batch",
    "state_dict_checksum",
    "weights_checksum",
]
