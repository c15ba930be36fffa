"""The pure parts of benchmarks/throughput.py: figures and ratios from per-repetition results, the
interleaved order, each arm's overrides, the cgroup quota, and the CPU seconds of a process tree."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import throughput  # noqa: E402


def fake_result(seconds, phases=None, lengths=None, cpu=None, threads=1):
    """A worker's result: iteration times, and per-iteration (wall, cpu) of its process tree."""
    cpu = cpu if cpu is not None else [s * 0.9 for s in seconds]
    return {
        "iteration_seconds": seconds,
        "phase_seconds": phases or {},
        "response_length": lengths or [40.0] * len(seconds),
        "cpu_iterations": [
            {"step": i + 1, "wall": s, "cpu": c} for i, (s, c) in enumerate(zip(seconds, cpu, strict=True))
        ],
        "compute_processes": [{"pid": 1, "torch_threads": threads}],
    }


def record(rep, arm, seconds, params=1000, threads=1, **kw):
    return {
        "rep": rep, "arm": arm, "params": params, "threads": threads, "size": "tiny",
        "summary": throughput.rep_summary(fake_result(seconds, **kw), warmup=2, batch=64),
    }  # fmt: skip


def test_rep_summary_leaves_out_the_warm_up_and_takes_medians():
    result = fake_result(
        [9.0, 9.0, 1.0, 2.0, 4.0],
        phases={"time_generate": [5, 5, 0.4, 0.5, 0.6], "time_train": [3, 3, 0.1, 0.3, 0.2]},
        lengths=[10, 10, 30, 40, 50],
        cpu=[20, 20, 1.0, 1.0, 4.0],
    )
    s = throughput.rep_summary(result, warmup=2, batch=64)
    assert s["samples_per_s"] == pytest.approx(64 / 2.0)
    assert s["iteration_seconds"] == 2.0
    assert s["phase_seconds"] == {"time_generate": 0.5, "time_train": 0.2}
    assert s["response_length_mean"] == pytest.approx(40.0)
    assert s["cpu_seconds_per_iteration"] == pytest.approx(2.0)
    assert s["cpu_utilisation"] == pytest.approx(6.0 / 7.0)
    assert s["torch_threads_used"] == 1
    trl = throughput.rep_summary(fake_result([1.0, 1.0, 3.0]), warmup=2, batch=64)
    assert trl["phase_seconds"] == {"total": 3.0}  # no phases: the total only
    with pytest.raises(ValueError):
        throughput.rep_summary(fake_result([1.0, 1.0]), warmup=2, batch=64)


def test_rows_and_ratios_pair_repetitions_by_index():
    reps = [
        record(0, "trl_grpo", [1, 1, 1.0, 1.0]),  # 64 samples/s
        record(0, "rto_distributed_ppo", [1, 1, 0.5, 0.5]),  # 128: ratio 2
        record(1, "rto_distributed_ppo", [1, 1, 2.0, 2.0]),  # 32
        record(1, "trl_grpo", [1, 1, 0.5, 0.5]),  # 128: ratio 0.25
        record(2, "trl_grpo", [1, 1, 2.0, 2.0]),  # 32
        record(2, "rto_distributed_ppo", [1, 1, 1.0, 1.0]),  # 64: ratio 2
        record(0, "trl_grpo", [1, 1, 1.0, 1.0], threads=2),
        record(0, "rto_distributed_ppo", [1, 1, 1.0, 1.0], params=5000),  # no TRL row at this size
    ]
    rows = throughput.build_rows(reps, repeats=3)
    by = {(r["arm"], r["params"], r["threads"]): r for r in rows}
    rto = by[("rto_distributed_ppo", 1000, 1)]
    assert rto["samples_per_s_reps"] == [128.0, 32.0, 64.0]
    assert rto["samples_per_s"] == 64.0  # the median over repetitions, not a pooled figure
    assert by[("trl_grpo", 1000, 1)]["samples_per_s_reps"] == [64.0, 128.0, 32.0]
    assert by[("trl_grpo", 1000, 2)]["samples_per_s_reps"] == [64.0, None, None]
    assert by[("trl_grpo", 1000, 2)]["failed_reps"] == [1, 2]
    ratios = {(r["arm"], r["params"], r["threads"]): r for r in throughput.build_ratios(rows)}
    assert set(ratios) == {("rto_distributed_ppo", 1000, 1)}  # none without a baseline, none for TRL
    r = ratios[("rto_distributed_ppo", 1000, 1)]
    assert r["reps"] == [2.0, 0.25, 2.0]  # by index: the ratio of medians (1.0) would hide the spread
    assert (r["median"], r["min"], r["max"]) == (2.0, 0.25, 2.0)
    table = throughput.markdown_table(rows, throughput.build_ratios(rows))
    assert "| rto_distributed_ppo | 0.00 M | 1 | 64.0 | 128.0, 32.0, 64.0 |" in table
    assert "2.00× (0.25–2.00)" in table


def test_a_failed_repetition_leaves_its_pair_out():
    reps = [
        record(0, "trl_grpo", [1, 1, 1.0]),
        record(0, "rto_colocated_ppo", [1, 1, 0.5]),
        record(1, "trl_grpo", [1, 1, 1.0]),
        {"rep": 1, "arm": "rto_colocated_ppo", "params": 1000, "threads": 1, "error": "worker exited with 1"},
    ]
    rows = throughput.build_rows(reps, repeats=2)
    (ratio,) = throughput.build_ratios(rows)
    assert ratio["reps"] == [2.0]
    assert next(r for r in rows if r["arm"] == "rto_colocated_ppo")["failed_reps"] == [1]


def test_schedule_interleaves_and_rotates():
    plan = throughput.schedule(["a", "b", "c"], repeats=4)
    assert [rep for rep, _ in plan] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    orders = ["".join(u for r, u in plan if r == rep) for rep in range(4)]
    assert orders == ["abc", "bca", "cab", "abc"]
    assert throughput.schedule([], 3) == []


def test_arm_overrides():
    assert throughput.arm_overrides("trl_grpo", 2, True) == []
    assert throughput.arm_overrides("rto_distributed_ppo", 2, True) == ["resources.actor_threads=2"]
    assert throughput.arm_overrides("rto_distributed_ppo", 2, False) == []  # the field does not exist yet
    assert throughput.arm_overrides("rto_colocated_ppo", 1, False) == [
        "resources.colocate=all",
        "resources.actor_threads=1",
    ]
    assert throughput.arm_overrides("rto_colocated_reinforce_pp", 2, True) == [
        "resources.colocate=all",
        "ppo.advantage_estimator=reinforce_pp",
        "resources.actor_threads=2",
    ]
    assert throughput.arm_overrides("rto_colocated_ppo", "default", True) == ["resources.colocate=all"]


def test_the_sizes_are_configs_of_the_quickstart():
    import torch
    from transformers import AutoModelForCausalLM

    from pipelines.tasks import text
    from rto.config import load_config

    tokenizer = text.task_tokenizer()
    counts = {}
    for size, overrides in throughput.SIZES.items():
        cfg = load_config(throughput.QUICKSTART, list(overrides))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(text.llama_config(tokenizer, cfg.policy.arch))
        counts[size] = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < counts["tiny"] < 1.5e6
    assert 20e6 <= counts["25m"] <= 30e6


def test_cgroup_quota_v1_and_v2(tmp_path):
    v2 = tmp_path / "v2"
    (v2 / "job" / "inner").mkdir(parents=True)
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    (v2 / "job" / "cpu.max").write_text("200000 100000\n")
    (v2 / "job" / "inner" / "cpu.max").write_text("max 100000\n")
    out = throughput.cgroup_cpu_quota(v2, "0::/job/inner\n")
    assert out["cpus"] == 2.0
    assert [Path(x["file"]).parent.name for x in out["limits"]] == ["job"]

    v1 = tmp_path / "v1"
    (v1 / "cpu,cpuacct" / "a").mkdir(parents=True)
    (v1 / "cpu,cpuacct" / "a" / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu,cpuacct" / "a" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert throughput.cgroup_cpu_quota(v1, "4:memory:/a\n3:cpu,cpuacct:/a\n")["cpus"] == 1.5
    assert throughput.cgroup_cpu_quota(v1, "3:cpu,cpuacct:/\n")["cpus"] is None


def test_tree_cpu_delta_counts_new_processes_from_zero_and_tells_reused_pids():
    before = {1: {"start": 10.0, "cpu": 5.0}, 2: {"start": 11.0, "cpu": 3.0}}
    after = {
        1: {"start": 10.0, "cpu": 6.5},  # +1.5
        2: {"start": 99.0, "cpu": 0.5},  # pid 2 reused by a new process: its whole 0.5
        3: {"start": 50.0, "cpu": 2.0},  # started in between: +2
    }
    assert throughput.tree_cpu_delta(before, after) == pytest.approx(4.0)


BURNER = textwrap.dedent(
    """
    import subprocess, sys, time
    GRANDCHILD = (
        "import time\\n"
        "while time.process_time() < 0.3: pass\\n"
        "print('burnt', flush=True)\\n"
        "time.sleep(60)\\n"
    )
    child = subprocess.Popen([sys.executable, "-c", GRANDCHILD], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
    time.sleep(60)
    """
)


@pytest.mark.parametrize("snapshot", ["tree_snapshot_psutil", "tree_snapshot_proc"])
def test_tree_cpu_counts_a_grandchild_that_burns_cpu(snapshot):
    if snapshot == "tree_snapshot_psutil":
        pytest.importorskip("psutil")
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc")
    take = getattr(throughput, snapshot)
    child = subprocess.Popen([sys.executable, "-c", BURNER], stdout=subprocess.PIPE, text=True)
    try:
        before = take(child.pid)
        assert child.pid in before
        assert child.stdout.readline().strip() == "burnt"  # the grandchild burnt 0.3 s and still lives
        after = take(child.pid)
        assert len(after) == 2  # the child and its child
        used = throughput.tree_cpu_delta(before, after)
        assert 0.27 <= used < 1.5  # clock ticks of 10 ms
        busiest = throughput.per_process_cpu(before, after)[0]
        assert busiest["pid"] != child.pid and busiest["cpu_seconds"] >= 0.27
    finally:
        for pid in list(take(child.pid))[::-1]:  # the grandchild, then the child: both started here
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        child.wait(timeout=10)


def test_iteration_meter_measures_the_process_itself():
    meter = throughput.IterationMeter()
    meter.begin(1)
    start = time.process_time()
    while time.process_time() - start < 0.2:
        pass
    meter.end(1)
    (it,) = meter.iterations()
    assert it["step"] == 1
    assert it["cpu"] >= 0.15
    assert it["wall"] >= it["cpu"] * 0.9 - 0.02  # one thread: CPU seconds cannot outrun the wall by much


def test_trl_runs_in_the_precision_rto_runs_in(tmp_path):
    """TRL's GRPOConfig defaults to bf16 (autocast) even on a CPU, where rto computes in float32: on
    a CPU without bf16 instructions that made TRL's iterations about 3× slower than in float32
    (and faster on one with AMX), so the ratio measured the CPU's bf16 support. The TRL arm runs in
    float32 unless `--trl-precision bf16` asks for TRL's default, and each row says its precision."""
    spec = {"batch": 64, "generations": 8, "iterations": 6, "trl_precision": "fp32"}
    cfg = SimpleNamespace(ppo=SimpleNamespace(max_new_tokens=48, actor_lr=1e-9, temperature=1.0), seed=0)
    args = throughput.trl_config(cfg, tmp_path, spec)
    assert args.bf16 is False and args.fp16 is False and args.beta == 0.04
    assert args.per_device_train_batch_size == 64 and args.num_generations == 8 and args.max_steps == 6
    assert throughput.trl_config(cfg, tmp_path, {**spec, "trl_precision": "bf16"}).bf16 is True
    assert (
        throughput.trl_config(cfg, tmp_path, {k: v for k, v in spec.items() if k != "trl_precision"}).bf16
        is False
    )
    recs = [
        {"arm": "trl_grpo", "params": 10, "threads": 1, "rep": 0, "precision": "bf16",
         "summary": throughput.rep_summary(fake_result([1.0] * 4), 1, 64)},
        {"arm": "rto_colocated_ppo", "params": 10, "threads": 1, "rep": 0, "precision": "float32",
         "summary": throughput.rep_summary(fake_result([2.0] * 4), 1, 64)},
    ]  # fmt: skip
    rows = {r["arm"]: r for r in throughput.build_rows(recs, 1)}
    assert rows["trl_grpo"]["precision"] == "bf16" and rows["rto_colocated_ppo"]["precision"] == "float32"
    assert set(throughput.cpu_bf16()) <= {"avx512_bf16", "amx_bf16", "amx_tile"}
