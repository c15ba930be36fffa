"""No run is lost: one run at a time per run directory (a lock naming its holder), prepared data
keyed by the files' content, records written only once a run is accepted, a run directory that is
someone else's folder refused, writers that clean up after an error, and a corrupt summary rebuilt
from the stages' own records."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from _trace_run_fixtures import run_cli
from pipeline_helpers import rto, rto_in_process, write_job

from rto.config import load_config
from rto.rundir import RunDir

QUICK = dict(
    task__n_sft=64, task__n_pairs=16, task__n_eval_pairs=8, task__n_prompts=8, task__n_eval=4,
    sft__max_steps=2, stages=["sft"],
)  # fmt: skip


def test_a_second_run_on_the_same_directory_is_refused_naming_the_holder(tmp_path):
    job = write_job(tmp_path, **{**QUICK, "sft__max_steps": 100_000})
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", str(run_dir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list((run_dir / "stages").glob(".sft.tmp*")):  # the first run is inside its sft stage
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = rto_in_process("run", str(job), "--run-dir", str(run_dir))  # another process: refused
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip().splitlines()[-1]
        assert f"PID {first.pid}" in line and str(run_dir) in line and "--run-dir" in line
        assert first.poll() is None  # the first run was not disturbed
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    # the lock dies with its holder: the directory is usable again, and nothing of the first
    # run's half-written stage looks finished
    assert not RunDir(run_dir).is_done("sft")
    result = rto("run", str(write_job(tmp_path, **QUICK)), "--run-dir", str(run_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_temp_names_are_unique_per_writer(tmp_path):
    run = RunDir(tmp_path / "run").create()
    a, b = run.temp_stage_dir("sft"), run.temp_stage_dir("sft")
    assert a != b and a.is_dir() and b.is_dir() and str(os.getpid()) in a.name


def test_a_data_file_fixed_in_place_is_prepared_again(tmp_path):
    """The prepared data is keyed by the data files' content, not their paths: fixing a file
    in place is seen, and the stages that used the old copy run again."""
    from pipelines.prepare import prepare

    data = tmp_path / "sft.jsonl"
    data.write_text(json.dumps({"prompt": "describe the cat", "completion": "the cat ."}) + "\n")
    job = write_job(tmp_path, stages=["sft"], data={"sft": {"path": str(data)}})
    run = RunDir(tmp_path / "run").create()
    first = prepare(load_config(job), run, log=lambda _: None)
    data.write_text(json.dumps({"prompt": "describe the dog", "completion": "the dog ."}) + "\n")
    second = prepare(load_config(job), run, log=lambda _: None)
    assert first.root != second.root
    assert second.records("sft")[0]["prompt"] == "describe the dog"
    assert prepare(load_config(job), run, log=lambda _: None).root == second.root  # unchanged: reused


def test_a_failed_run_keeps_the_record_of_the_finished_one(tmp_path):
    job = write_job(tmp_path, **QUICK)
    run_dir = tmp_path / "run"
    assert rto("run", str(job), "--run-dir", str(run_dir), timeout=300).returncode == 0
    record = (run_dir / "config.yaml").read_text()
    (tmp_path / "bad").mkdir()
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    bad = write_job(tmp_path / "bad", **QUICK, data={"sft": {"path": str(tmp_path / "broken.jsonl")}})
    result = rto_in_process("run", str(bad), "--run-dir", str(run_dir))
    assert result.returncode == 2 and "broken.jsonl" in result.stderr
    assert (run_dir / "config.yaml").read_text() == record


@pytest.mark.parametrize("run_dir", ["", "."])
def test_a_run_directory_that_is_not_a_runs_is_refused(tmp_path, run_dir):
    """`--run-dir .` in the user's own project folder would overwrite their config.yaml; an empty
    path silently meant the current directory."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my own notes\n")
    (project / "README.md").write_text("mine\n")
    job = write_job(project, **QUICK)
    result = subprocess.run(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", run_dir],
        capture_output=True, text=True, cwd=project, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--run-dir" in result.stderr and result.stderr.count("\n") == 1
    assert (project / "config.yaml").read_text() == "my own notes\n"
    assert sorted(p.name for p in project.iterdir()) == ["README.md", "config.yaml", "job.yaml"]


@pytest.mark.parametrize("kind", ["file", "under_a_file", "read_only"])
def test_a_run_directory_that_cannot_hold_a_run_is_refused(tmp_path, kind):
    job = write_job(tmp_path, **QUICK)
    (tmp_path / "a_file").write_text("x")
    run_dir = {"file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "run"}.get(kind)
    if kind == "read_only":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        run_dir = tmp_path / "ro"
        run_dir.mkdir()
        run_dir.chmod(0o500)
    code, _, err = run_cli("run", str(job), "--run-dir", str(run_dir))
    assert code == 2 and "--run-dir" in err and err.count("\n") == 1, err


def test_report_into_a_directory_leaves_nothing_behind(tmp_path):
    from _trace_run_fixtures import make_run

    run = make_run(tmp_path / "run")
    target = tmp_path / "out"
    target.mkdir()
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, _, err = run_cli("report", str(run), "-o", str(target))
    assert code == 2 and "-o" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_a_corrupt_summary_is_rebuilt_from_the_stages_records(tmp_path):
    run = RunDir(tmp_path / "run").create()
    tmp = run.temp_stage_dir("sft")
    run.finish_stage("sft", tmp, "hash", {"steps": 3, "train_loss": 1.25})
    run.summary_path.write_text('{"sft": {"steps": 3, "train_')  # cut by a crash, or edited by hand
    assert run.read_summary() == {"sft": {"steps": 3, "train_loss": 1.25}}
    assert json.loads(run.summary_path.read_text()) == {"sft": {"steps": 3, "train_loss": 1.25}}


def test_read_only_commands_report_a_corrupt_summary_without_a_traceback(tmp_path):
    from _trace_run_fixtures import make_run

    run = make_run(tmp_path / "run")
    (run / "summary.json").write_bytes(b"\xff\xfe not json")
    code, _, err = run_cli("report", str(run), "-o", str(tmp_path / "r.html"))
    assert code == 0, err  # the page is made; the summary is rebuilt from the stages' records (none)
    assert (tmp_path / "r.html").is_file()
