"""Lost nodes and lost actors on a real multi-node Ray cluster on loopback (`rto.cluster.LocalCluster`:
a head and worker nodes, each its own `ray start --block` session with its own temp dir and ports).

The PPO groups are pinned by custom resources: policy and critic on the "trainer" node, the
scorers (ref, dpo, rm) and the rollout workers on the "scorer" node; the head runs no actors.
Faults are real: SIGKILL of every process of a node, or of one worker process, found by its
process title in the node's session. The sft/dpo/rm stages are the session's shared reward run
(`reward_run`, the tiny job's); each test runs the ppo stage in a copy of that run directory.

The cluster's GCS checks its nodes every second and marks one dead after 3 missed checks (Ray's
defaults: every 3 s, 5 missed), so that a killed node is noticed in seconds; a live node would have
to miss 3 checks of 10 s each."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import rto, write_job

from rto.cluster import LocalCluster, ray_env
from rto.rundir import RunDir

pytestmark = pytest.mark.slow

TRAINER = {"trainer": 4}
SCORER = {"scorer": 8}
STEPS = 12  # room after the step a fault waits for: a step takes well under a second here


def job_changes(address: str | None, **extra) -> dict:
    """The tiny job (`pipeline_helpers.TINY_JOB`: its sft, dpo and rm stages are the shared reward
    run's, found up to date) with its ppo stage on the cluster at `address`."""
    return {
        "stages": ["sft", "dpo", "rm", "ppo"],
        "ppo__steps": STEPS, "ppo__checkpoint_every": 2, "ppo__tensorboard": False,
        "ppo__fault_tolerance": {"retries": 3, "backoff_s": 0, "wait_for_resources_s": 120, "probe_timeout_s": 30},
        "resources": {
            "ray_address": address,
            "policy": {"ranks": 2, "cpus": 0.25, "node_resources": {"trainer": 1}},
            "critic": {"cpus": 0.25, "node_resources": {"trainer": 1}},
            **{g: {"cpus": 0.25, "node_resources": {"scorer": 1}} for g in ("ref", "dpo", "rm", "rollout")},
        },
        **extra,
    }  # fmt: skip


@pytest.fixture(scope="module")
def trained(reward_run) -> Path:
    """A run directory with sft, dpo and rm finished (the session's shared reward run)."""
    return reward_run


# The GCS of the test cluster: a health check every second, a node dead after 3 missed in a row.
HEALTH_CHECKS = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3"}


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(head_cpus=0, env={**os.environ, **HEALTH_CHECKS}) as cluster:
        cluster.add_node(num_cpus=2, resources=TRAINER)
        cluster.add_node(num_cpus=2, resources=SCORER)
        yield cluster
        for node in cluster.workers:  # nothing of theirs is needed: end them at once, as lost
            if node.alive():
                cluster.kill(node)


def ppo_run(trained: Path, tmp: Path, address: str) -> tuple[Path, Path]:
    """A copy of the trained run directory and the job file that runs its ppo stage on `address`."""
    run_dir = tmp / "run"
    shutil.copytree(trained, run_dir)
    return run_dir, write_job(tmp, **job_changes(address))


def start_rto_run(job: Path, run_dir: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = ray_env({**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "COLUMNS": "400"})
    return subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", str(run_dir), *extra],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip


def ppo_steps(run_dir: Path) -> list[int]:
    """The ppo steps in metrics.jsonl (read while the run appends to it: a half-written last line
    is not a record, as for every reader of the file)."""
    return [r["step"] for r in RunDir(run_dir).read_metrics("ppo")]


def wait_for_step(
    process: subprocess.Popen, run_dir: Path, step: int, log: Path, timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while not ppo_steps(run_dir) or max(ppo_steps(run_dir)) < step:
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no ppo step {step} within {timeout} s"
        time.sleep(0.5)


def finish(process: subprocess.Popen, log: Path, timeout: float = 600) -> str:
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return log.read_text()


def placement(out: str) -> dict[str, str]:
    """Group → node id, from the first `placement GROUP: N on node ID (IP)` line of each group."""
    nodes: dict[str, str] = {}
    for line in out.splitlines():
        if line.startswith("placement "):
            group, where = line.removeprefix("placement ").split(": ", 1)
            nodes.setdefault(group, where.split(" on node ")[1].split(" ")[0])
    return nodes


def ppo_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["ppo"]


def recovery_lines(out: str) -> str:
    """The log's lines about lost and rebuilt actors (what a failed assertion shows)."""
    words = ("lost", "rebuilt", "placement ", "resumed", "continuing", "recovery", "Error")
    return "\n".join(line for line in out.splitlines() if any(w in line for w in words))


def assert_every_step_once(run_dir: Path, steps: int = STEPS) -> None:
    assert ppo_steps(run_dir) == list(range(1, steps + 1))
    traces = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "traces").glob("step-*.parquet"))
    assert traces == list(range(1, steps + 1))
    assert not list((run_dir / "checkpoints").glob("ppo-*/step-*")), "a finished stage keeps no checkpoint"


def test_groups_span_nodes_and_a_lost_trainer_node_is_replaced(cluster, trained, tmp_path):
    """SIGKILL of the whole trainer node (raylet and every worker) after a checkpoint, and a
    replacement node started: the job succeeds from the last checkpoint; every step once."""
    run_dir, job = ppo_run(trained, tmp_path, cluster.address)
    log = tmp_path / "run.log"
    process = start_rto_run(job, run_dir, log)
    wait_for_step(process, run_dir, 3, log)
    killed = cluster.node_with("trainer")
    assert cluster.kill(killed) >= 3  # raylet, agents, the policy and critic workers
    reached = max(ppo_steps(run_dir))
    cluster.add_node(num_cpus=2, resources=TRAINER)
    out = finish(process, log)
    assert process.returncode == 0, out[-3000:]
    # the groups ran on two nodes: trainer and scorer nodes are distinct
    nodes = placement(out)
    assert nodes["policy"] == nodes["critic"] != nodes["rollout"] == nodes["ref"] == nodes["rm"], nodes
    events = recovery_lines(out)
    assert "lost trainable actor" in out and "continuing from checkpoint step" in out, events
    assert_every_step_once(run_dir)
    summary = ppo_summary(run_dir)
    assert summary["restarts"] >= 1
    # at most the steps since the last checkpoint are run again
    assert summary["steps_run_again"] <= 2  # checkpoint_every
    print(events)
    print(f"lost trainer node at step {reached}: {summary['steps_run_again']} steps run again")


KILLED_WORKERS = {"ray::RolloutWorker": "rollout", "ray::FrozenModelWorker": "ref|dpo|rm"}
LOST_WORKER_STEPS = 24  # two kills, each after the recovery from the one before, and steps to spare


@pytest.fixture(scope="module")
def lost_workers(cluster, trained, tmp_path_factory) -> dict:
    """One ppo run that loses one rollout worker process and, once it has recovered from that and
    gone on, one frozen scorer process (both SIGKILLed on the scorer node): its log, run directory,
    exit code and the step each kill landed at."""
    tmp = tmp_path_factory.mktemp("lost-workers")
    run_dir = tmp / "run"
    shutil.copytree(trained, run_dir)
    job = write_job(tmp, **job_changes(cluster.address, ppo__steps=LOST_WORKER_STEPS))
    log = tmp / "run.log"
    process = start_rto_run(job, run_dir, log)
    killed_at = {}
    try:
        step = 2
        for title in KILLED_WORKERS:
            wait_for_step(process, run_dir, step, log)  # the second time: recovered, and a step after
            pids = cluster.node_with("scorer").worker_pids(title)
            assert pids, f"no {title} process on the scorer node"
            os.kill(pids[0], signal.SIGKILL)
            killed_at[title] = max(ppo_steps(run_dir))
            assert killed_at[title] < LOST_WORKER_STEPS, "the run ended before the kill"
            step = killed_at[title] + 2
        out = finish(process, log)
    finally:
        if process.poll() is None:
            process.kill()
    return {"out": out, "run_dir": run_dir, "returncode": process.returncode, "killed_at": killed_at}


@pytest.mark.parametrize("title", list(KILLED_WORKERS))
def test_a_lost_worker_process_is_recreated_without_a_rewind(lost_workers, title):
    """SIGKILL of one rollout worker, or of one frozen scorer (one run loses both, one after the
    other): its group is rebuilt, the step runs again from its rollouts, and no step is repeated
    (one restart per loss, nothing run again)."""
    out, run_dir = lost_workers["out"], lost_workers["run_dir"]
    assert lost_workers["returncode"] == 0, out[-3000:]
    group = KILLED_WORKERS[title]
    assert re.search(rf"lost ({group})-0 on node ", out), recovery_lines(out)
    assert re.search(rf"rebuilt ({group}) in ", out), recovery_lines(out)
    assert "lost trainable actor" not in out
    assert_every_step_once(run_dir, LOST_WORKER_STEPS)
    summary = ppo_summary(run_dir)
    assert summary["restarts"] == len(KILLED_WORKERS) and summary["steps_run_again"] == 0
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["restarts"] == len(KILLED_WORKERS)
    print(f"lost {title} at step {lost_workers['killed_at'][title]}")


class SubmittedRun:
    """A copy of the trained run directory and a job that runs its ppo stage, submitted to the
    cluster's job API with `rto submit` (and watched with `rto jobs`)."""

    def __init__(self, cluster: LocalCluster, trained: Path, tmp_path: Path, **changes):
        self.address = cluster.dashboard
        self.run_dir = tmp_path / "run"
        shutil.copytree(trained, self.run_dir)
        job = write_job(tmp_path, **changes)
        env = ["--env", "OMP_NUM_THREADS=1", "--env", "HF_HUB_OFFLINE=1", "--env", "COLUMNS=400"]
        self.command = ["submit", str(job), "--address", self.address, "--run-dir", str(self.run_dir), *env]

    def submit(self, job_id: str, *extra: str) -> str:
        result = rto(*self.command, "--job-id", job_id, *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return job_id

    def wait_for_step(self, job_id: str, step: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while not ppo_steps(self.run_dir) or max(ppo_steps(self.run_dir)) < step:
            assert time.monotonic() < deadline, self.logs(job_id)[-3000:]
            time.sleep(0.2)

    def wait(self, job_id: str, timeout: float = 400) -> subprocess.CompletedProcess:
        """`rto jobs status --wait`: exit 0 only if the job succeeded."""
        return rto("jobs", "status", job_id, "--wait", "--timeout", str(timeout), "--address", self.address,
                   timeout=timeout + 30)  # fmt: skip

    def logs(self, job_id: str) -> str:
        return rto("jobs", "logs", job_id, "--address", self.address).stdout

    def listing(self) -> str:
        return rto("jobs", "list", "--address", self.address).stdout


def test_a_stopped_driver_is_continued_by_submit_resume(cluster, trained, tmp_path):
    """The driver itself ends (`rto jobs stop`: SIGTERM, then SIGKILL) after a checkpoint;
    `rto submit --resume` on the same run directory continues from the last checkpoint, every
    step once, and `rto jobs list` shows the stopped attempt beside the one that finished."""
    job = SubmittedRun(cluster, trained, tmp_path, **job_changes(cluster.address, ppo__steps=60))
    first = job.submit("stopped-first")
    job.wait_for_step(first, 3)
    assert rto("jobs", "stop", first, "--address", job.address).returncode == 0
    stopped = job.wait(first, 120)
    assert stopped.returncode == 1 and "STOPPED" in stopped.stdout, stopped.stdout
    assert max(ppo_steps(job.run_dir)) < 60
    second = job.submit("stopped-second", "--resume")
    finished = job.wait(second)
    assert finished.returncode == 0, job.logs(second)[-3000:]
    assert "resumed from" in job.logs(second)
    assert_every_step_once(job.run_dir, 60)
    listing = job.listing()
    assert "stopped-first" in listing and "STOPPED" in listing and "stopped-second" in listing


def test_a_node_lost_for_good_fails_within_the_wait_and_submit_resume_completes(cluster, trained, tmp_path):
    """Submitted jobs: the scorer node SIGKILLed and not replaced; the job fails once the configured
    wait is over, saying which group could not be placed, and leaves a checkpoint of its last
    completed step; after a node is added, `rto submit --resume` on the same run directory
    completes it, and `rto jobs list` shows both attempts. (Runs last: it takes a node away.)"""
    changes = job_changes(cluster.address, ppo__steps=40)  # the kill lands long before the end
    changes["ppo__fault_tolerance"] = {**changes["ppo__fault_tolerance"], "wait_for_resources_s": 15}
    job = SubmittedRun(cluster, trained, tmp_path, **changes)
    first = job.submit("chaos-first")
    job.wait_for_step(first, 2)
    status = rto("jobs", "status", first, "--address", job.address).stdout
    assert (
        "groups:" in status and "  policy    2 on node " in status and "  rollout   1 on node " in status
    ), status
    cluster.kill(cluster.node_with("scorer"))
    killed_at = time.monotonic()
    waited = job.wait(first, 300)
    failed_after = time.monotonic() - killed_at
    logs = job.logs(first)
    assert waited.returncode == 1 and "FAILED" in waited.stdout, logs[-3000:]
    assert "could not place the '" in logs and "within 15 s" in logs, logs[-3000:]
    assert "--resume" in logs
    # the wait (15 s), the health checks and marking the node dead (<= 60 s), not the default 300 s
    assert failed_after < 150, failed_after
    done_before = max(ppo_steps(job.run_dir))
    assert list((job.run_dir / "checkpoints").glob(f"ppo-*/step-{done_before:06d}"))  # nothing is lost

    cluster.add_node(num_cpus=2, resources=SCORER)
    second = job.submit("chaos-second", "--resume")
    assert job.wait(second).returncode == 0, job.logs(second)[-3000:]
    assert "resumed from" in job.logs(second)
    assert_every_step_once(job.run_dir, 40)
    listing = job.listing()
    assert "chaos-first" in listing and "FAILED" in listing and "chaos-second" in listing
