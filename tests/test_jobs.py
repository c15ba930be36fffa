"""Cluster jobs against a real local Ray head on loopback: `rto submit` a tiny job, follow it to
success with `rto jobs status`, read its logs, stop a running job, and bad input.

The head is this test's own `ray start --head --block` process (`rto.cluster.LocalCluster`: its own
session, temp dir and free ports), stopped by signalling the processes of its session. Never
`ray stop`: that would stop every Ray on the machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _trace_run_fixtures import run_cli
from pipeline_helpers import rto, write_job

from rto import jobs
from rto.cluster import LocalCluster, free_ports


@pytest.fixture(scope="module")
def cluster():
    """A head on loopback with 2 CPUs (`rto.cluster.LocalCluster`); its dashboard address."""
    for attempt in range(3):  # a port taken between choosing and binding it ends the head at once
        try:
            local = LocalCluster(head_cpus=2, env={**os.environ, "OMP_NUM_THREADS": "1"})
            break
        except RuntimeError:
            if attempt == 2:
                raise
    try:
        assert rto("jobs", "list", "--address", local.dashboard).returncode == 0
        yield local.dashboard
    finally:
        local.head.kill()  # every process of the head's session at once: nothing of it is needed
        local.shutdown()


def job_status(address: str, job_id: str) -> str:
    """Through the CLI, so that this process never switches Ray's auth mode for later tests."""
    result = rto("jobs", "status", job_id, "--address", address)
    assert result.returncode == 0, result.stderr
    return re.search(r"^status:\s+(\S+)$", result.stdout, re.MULTILINE).group(1)


def tiny_job(directory: Path, **changes) -> Path:
    """The tiny job, smaller still: seconds of SFT and a short eval."""
    sizes = dict(
        task__n_sft=128, task__n_pairs=32, task__n_eval_pairs=16, task__n_prompts=16, task__n_eval=8,
        sft__max_steps=20, eval__max_new_tokens=8, eval__models=["base", "sft"],
    )  # fmt: skip
    return write_job(directory, **{**sizes, **changes})


JOB_ENV = ["--env", "OMP_NUM_THREADS=1", "--env", "HF_HUB_OFFLINE=1"]


def submitted_id(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return re.search(r"^submitted (\S+) to ", result.stdout, re.MULTILINE).group(1)


@pytest.mark.slow
def test_submit_follow_to_success_and_read_logs(cluster, tmp_path):
    """The whole path on a real cluster: submit the tiny quickstart (sft → dpo → rm → 2 PPO steps →
    eval), follow it to success, read its logs; its PPO actors join this cluster; then inspect the
    run it left with `rto traces`, `rto report` and TensorBoard's event reader."""
    job = tiny_job(tmp_path, stages=["sft", "dpo", "rm", "ppo", "eval"], resources__policy__ranks=1)
    run_dir = tmp_path / "results" / "run"
    result = rto("submit", str(job), "--address", cluster, "--run-dir", str(run_dir), *JOB_ENV)
    job_id = submitted_id(result)
    assert f"run directory on the cluster: {run_dir}" in result.stdout

    status = rto("jobs", "status", job_id, "--wait", "--timeout", "400", "--address", cluster, timeout=450)
    logs = rto("jobs", "logs", job_id, "--address", cluster)
    assert status.returncode == 0, status.stdout + status.stderr + logs.stdout[-3000:]
    assert re.search(r"^status:\s+SUCCEEDED$", status.stdout, re.MULTILINE)
    assert re.search(rf"^run dir:\s+{re.escape(str(run_dir))}$", status.stdout, re.MULTILINE)

    # the logs are the job's `rto run` output: every stage, the PPO actors on this cluster
    assert logs.returncode == 0
    for stage in ("sft", "dpo", "rm", "ppo", "eval"):
        assert f"stage {stage}: done" in logs.stdout, stage
    assert "Started a local Ray instance" not in logs.stdout  # resources.ray_address=auto joined us
    follow = rto("jobs", "logs", job_id, "--follow", "--address", cluster, timeout=60)
    assert follow.returncode == 0 and follow.stdout.strip().endswith(logs.stdout.strip()[-200:])

    listing = rto("jobs", "list", "--address", cluster)
    assert listing.returncode == 0
    assert any(job_id in line and "SUCCEEDED" in line for line in listing.stdout.splitlines())

    # results landed where --run-dir said, with the job file it ran
    summary = (run_dir / "summary.json").read_text()
    assert all(f'"{stage}"' in summary for stage in ("sft", "dpo", "rm", "ppo", "eval"))
    assert "ray_address: auto" in (run_dir / "config.yaml").read_text()
    inspect_finished_run(run_dir, tmp_path)


def inspect_finished_run(run_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing import event_accumulator

    # in this process, through the CLI's own main() (neither command touches Ray)
    code, traces, err = run_cli("traces", str(run_dir), "--top", "1")
    assert code == 0, err
    assert traces.startswith("step 2 · 8 samples") and "best 1 by reward" in traces
    page = tmp_path / "report.html"
    code, _, err = run_cli("report", str(run_dir), "-o", str(page))
    assert code == 0, err
    text = page.read_text()
    assert re.findall(r"<h3>step (\d+)", text) == ["1", "2"] and text.count("<svg") >= 3
    events = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard" / "ppo"), size_guidance={event_accumulator.TENSORS: 0}
    ).Reload()
    assert [e.step for e in events.Scalars("ppo/gt_reward")] == [1, 2]
    assert [e.step for e in events.Tensors("traces/best/text_summary")] == [1, 2]


@pytest.mark.slow
def test_stop_a_running_job(cluster, tmp_path):
    """`rto submit --follow` streams a job until it ends; stopping it ends the follow with exit 1."""
    job = tiny_job(tmp_path, stages=["sft"], sft__max_steps=100_000)
    job_id = "rto-test-stop-" + str(os.getpid())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    errors = open(tmp_path / "follow.err", "w")  # noqa: SIM115 - the follower's, closed below
    follower = subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "submit", str(job), "--address", cluster, "--job-id", job_id,
         "--run-dir", str(tmp_path / "run"), "--follow", *JOB_ENV],
        stdout=subprocess.PIPE, stderr=errors, text=True, env=env,
    )  # fmt: skip
    streamed: list[str] = []  # what the follower has printed so far, read as it streams

    def read() -> None:
        for line in follower.stdout:
            streamed.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    # stop it inside the sft stage, not while it is still preparing: the follower shows the stage
    deadline = time.monotonic() + 120
    while "stage sft" not in "".join(streamed):
        assert follower.poll() is None and time.monotonic() < deadline, "".join(streamed)[-2000:]
        time.sleep(0.5)
    assert job_status(cluster, job_id) == "RUNNING"
    result = rto("jobs", "stop", job_id, "--address", cluster)
    assert result.returncode == 0 and f"stopping {job_id}" in result.stdout
    status = rto("jobs", "status", job_id, "--wait", "--timeout", "120", "--address", cluster)
    assert status.returncode == 1, (
        status.stdout + rto("jobs", "logs", job_id, "--address", cluster).stdout[-2000:]
    )  # --wait: not SUCCEEDED
    assert re.search(r"^status:\s+STOPPED$", status.stdout, re.MULTILINE)
    again = rto("jobs", "stop", job_id, "--address", cluster)
    assert again.returncode == 0 and "is not running (STOPPED)" in again.stdout
    follower.wait(timeout=120)
    reader.join(timeout=30)
    errors.close()
    out, err = "".join(streamed), (tmp_path / "follow.err").read_text()
    assert follower.returncode == 1, out[-2000:] + err[-2000:]
    assert f"submitted {job_id}" in out and "stage sft" in out and out.rstrip().endswith("STOPPED")


@pytest.mark.parametrize("command", [["status"], ["logs"], ["logs", "--follow"], ["stop"]])
def test_unknown_job_id(cluster, command):
    result = rto("jobs", *command[:1], "raysubmit_doesnotexist", *command[1:], "--address", cluster)
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"error: job id: no job 'raysubmit_doesnotexist' on the cluster at {cluster}\n"


@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "list"],
        ["jobs", "status", "some-job"],
        ["submit", "{job}"],
    ],
)
def test_address_without_a_cluster(tmp_path, args):
    job = tiny_job(tmp_path)
    address = f"http://127.0.0.1:{free_ports(1)[0]}"  # nothing listens there
    code, _, stderr = run_cli(*[a.format(job=job) for a in args], "--address", address)
    assert code == 2, stderr
    assert stderr.startswith(f"error: --address: no Ray cluster answers at {address}")
    assert stderr.count("\n") == 1


def test_bad_submissions_fail_before_connecting(tmp_path):
    job = tiny_job(tmp_path)
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    cases = [
        (["--run-dir", "relative/run"], "relative/run: --run-dir: must be an absolute path on the cluster"),
        (["--set", "sft.lr=abc"], "sft.lr"),
        (["--env", "NOEQUALS"], "--env: expected KEY=VALUE"),
    ]
    for extra, message in cases:
        code, _, stderr = run_cli("submit", str(job), "--address", address, *extra)
        assert code == 2 and message in stderr, stderr
        assert stderr.count("\n") == 1


def test_staged_files_leave_out_environments_and_big_files(tmp_path):
    from rto.config import load_config

    root = tmp_path / "checkout"
    for name in [
        "rto/cli.py",
        "configs/q.yaml",
        ".venv/bin/python",
        "env2/pyvenv.cfg",
        ".git/HEAD",
        "runs/a/metrics.jsonl",
        "rto/__pycache__/cli.pyc",
        "rto.egg-info/PKG-INFO",
        "data/small.jsonl",
    ]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")  # fmt: skip
    with open(root / "rto" / "huge.py", "wb") as f:
        f.truncate(jobs.MAX_FILE_BYTES + 1)
    (root / "data" / "small.jsonl").write_text('{"prompt": "describe the cat"}\n')
    job = root / "configs" / "q.yaml"
    job.write_text("stages: [ppo]\ndata: {prompts: {path: %s}}\n" % (root / "data" / "small.jsonl"))
    target = tmp_path / "staged"
    jobs.stage_files(jobs.job_files(root, load_config(job)), target)
    staged = sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file())
    assert staged == ["configs/q.yaml", "data/small.jsonl", "rto/cli.py"]
    # this checkout is what a submission would carry
    assert jobs.project_root() == Path(jobs.__file__).resolve().parent.parent


def test_run_dir_words():
    assert jobs.make_run_dir_arg(None, "rto-x-1") == ('"$HOME"/rto-runs/rto-x-1', "~/rto-runs/rto-x-1")
    assert jobs.make_run_dir_arg("~/runs/a b", "j") == ("\"$HOME\"/'runs/a b'", "~/runs/a b")
    assert jobs.make_run_dir_arg("/shared/runs/x", "j") == ("/shared/runs/x", "/shared/runs/x")
