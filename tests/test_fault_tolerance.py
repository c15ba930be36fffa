"""The pieces of the PPO stage's fault handling that need no cluster: the settings, when it gives
up, the shared-storage check of checkpoints, and a placement that cannot be met (in-process Ray).
The faults themselves, on a real multi-node cluster, are in tests/test_cluster_faults.py."""

from __future__ import annotations

import pytest
import ray

from rto.config import config_from_dict
from rto.errors import ClusterError
from rto.ppo.checkpoint import check_visible
from rto.ppo.config import FaultToleranceConfig
from rto.ppo.faults import Supervisor


def test_no_recovery_without_time_to_place_again():
    assert FaultToleranceConfig(retries=0, wait_for_resources_s=0).retries == 0
    with pytest.raises(ValueError, match="never be placed"):
        FaultToleranceConfig(retries=1, wait_for_resources_s=0)


def test_gives_up_after_retries_in_a_row_and_a_completed_step_resets_the_count():
    lines = []
    supervisor = Supervisor(FaultToleranceConfig(retries=2, backoff_s=0), None, lambda g: None, lines.append)
    error = ray.exceptions.ActorDiedError()
    supervisor.count([], error, "the rollouts of step 3")
    supervisor.step_completed()
    supervisor.count([], error, "the rollouts of step 4")
    supervisor.count([], error, "the rollouts of step 4")
    with pytest.raises(
        ClusterError, match=r"gave up after 2 recoveries in a row \(ppo.fault_tolerance.retries = 2\)"
    ):
        supervisor.count([], error, "the rollouts of step 4")
    assert supervisor.restarts == 4 and len(lines) == 4
    assert "during the rollouts of step 4" in lines[-1] and "ActorDiedError" in lines[-1]


def test_a_checkpoint_on_storage_the_driver_does_not_see_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "mp_rank_00_model_states.pt").write_bytes(b"x")
    here = {"files": ["ckpt/mp_rank_00_model_states.pt"], "node_id": "aaaa1111", "ip": "10.0.0.1"}
    check_visible(tmp_path, "policy", [here])
    elsewhere = {
        "files": ["ckpt/zero_pp_rank_1_mp_rank_00_optim_states.pt"],
        "node_id": "bbbb2222",
        "ip": "10.0.0.2",
    }
    with pytest.raises(
        ClusterError, match=r"policy rank 1 on node bbbb2222 \(10.0.0.2\) wrote .*storage every node shares"
    ):
        check_visible(tmp_path, "policy", [here, elsewhere])


def test_a_group_the_cluster_has_no_room_for_fails_naming_it():
    from rto.distributed import ActorGroup, Resources, init_ray
    from rto.distributed.workers import Worker

    init_ray(None, num_cpus=1)
    try:
        with pytest.raises(
            ClusterError,
            match=r"could not place the 'rm' group \(1 × \{'CPU': 0.25, 'gpu_node': 1.0\}.*within 2 s; the cluster has \{'CPU': 1.0\} free",
        ):
            ActorGroup(
                Worker,
                1,
                resources=Resources(0.25, custom=(("gpu_node", 1.0),)),
                name="rm",
                ready_timeout_s=2,
            )
        assert ray.available_resources().get("CPU") == 1.0  # the request was withdrawn
    finally:
        ray.shutdown()


def test_placement_settings_reach_the_job():
    cfg = config_from_dict(
        {
            "stages": ["ppo"],
            "resources": {"rollout": {"strategy": "SPREAD", "ranks": 2, "node_resources": {"spot": 0.5}}},
        }
    )
    assert cfg.resources.rollout.strategy == "SPREAD" and cfg.resources.rollout.node_resources == {
        "spot": 0.5
    }


@pytest.mark.parametrize("refreshing", [False, True])
def test_a_lost_dpo_actor_rewinds_only_when_the_refresh_trains_it(refreshing):
    """A frozen DPO model is rebuilt from its folder and the phase runs again; a refreshed one
    has optimizer state that only the last checkpoint holds, so its loss rewinds like a trainer's."""
    from types import SimpleNamespace

    from rto.ppo.faults import LostActor, Rewind
    from rto.ppo.groups import Groups

    named = {name: SimpleNamespace(name=name) for name in ("policy", "critic", "ref", "rollout", "dpo")}
    groups = Groups(**named, dpo_trainable=refreshing)
    assert groups.trainable_names() == {"policy", "critic"} | ({"dpo"} if refreshing else set())
    supervisor = Supervisor(
        FaultToleranceConfig(retries=2, backoff_s=0), None, lambda g: None, lambda line: None
    )
    supervisor.find_lost = lambda groups, exc: [
        LostActor("dpo", 0, "aaaa1111 (10.0.0.1)", "died")
    ]  # the fault
    rebuilt = []
    supervisor.rebuild = lambda groups, names, lost: rebuilt.append(names)
    calls = []

    def phase():
        calls.append(1)
        if len(calls) == 1:
            raise ray.exceptions.ActorDiedError()
        return "scored"

    if refreshing:
        with pytest.raises(Rewind):
            supervisor.run(groups, phase, "the rollouts of step 3")
        assert rebuilt == []
    else:
        assert supervisor.run(groups, phase, "the rollouts of step 3") == "scored"
        assert rebuilt == [{"dpo"}]


def test_a_rewound_run_shows_each_step_once_in_tensorboard(tmp_path):
    """Steps 1-4 logged, then the run continues after step 2 (a rewind or --resume) and logs 3-4
    again: TensorBoard keeps the second attempt's 3 and 4 only, like metrics.jsonl."""
    import time

    from pipeline_helpers import write_job
    from tensorboard.backend.event_processing import event_accumulator

    from rto.config import load_config
    from rto.ppo.logging import StepLogger
    from rto.rundir import RunDir

    cfg = load_config(write_job(tmp_path))
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    logger = StepLogger(run, tensorboard=True, wandb=False, cfg=cfg)
    for step in range(1, 5):
        logger.log(step, {"kl": float(step)})
    logger.close()
    time.sleep(1.1)  # a new events file (named by the second) as a restarted process writes
    logger = StepLogger(run, tensorboard=True, wandb=False, cfg=cfg)
    logger.records = [{"step": s} for s in range(1, 5)]
    logger.continue_after(2)
    assert [r["step"] for r in logger.records] == [1, 2]
    for step in (3, 4):
        logger.log(step, {"kl": 10.0 * step})
    logger.close()
    events = event_accumulator.EventAccumulator(str(run.root / "tensorboard" / "ppo"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("ppo/kl")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
