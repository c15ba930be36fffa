"""Chaos run: a PPO job on a multi-node Ray cluster on loopback survives three kills at seeded
random moments, and every step is in its output exactly once.

    python benchmarks/chaos.py [--steps 30] [--seed 0] [--checkpoint-every 5]

The cluster (`rto.cluster.LocalCluster`) is a head with no CPUs, a "trainer" node (policy and
critic) and a "scorer" node (ref, dpo, rm and the rollout workers), 2 CPUs each, pinned by custom
resources exactly as in `tests/test_cluster_faults.py`. sft, dpo and rm are trained once (in
process, no cluster); then the ppo stage runs as `rto run` in a copy of that run directory, once
without faults (the baseline) and once with three SIGKILLs, one of each kind, in a seeded order at
seeded steps in [3, steps - 3]:

* node: every process of the trainer or the scorer node (seeded choice), as when a machine is
  lost; a replacement node with the same resources is started right after;
* trainable: one policy or critic worker process (`ray::TrainableWorker`) on the trainer node;
* rollout: one rollout worker process (`ray::RolloutWorker`) on the scorer node.

Each kill happens as soon as metrics.jsonl first shows its step (polled every 0.2 s, so a fast step
can pass unseen: the step reached is recorded), and never before the stage has recovered from the
previous kill. Per kill: when the stage noticed it (its first "lost ..." line), the recovery time
(from the kill until metrics.jsonl shows a step beyond both the step reached at the kill and the
step shown when the loss was noticed, after the stage's last recovery line; a rewind truncates
the metrics to the checkpoint first, so this includes the steps run again) and the steps lost (the
stage's "steps X..Y are run again" lines after that kill; 0 when the lost group was rebuilt and
the interrupted phase of the step run again). The run must succeed with ppo steps 1..N in metrics.jsonl exactly
once and traces/step-000001..N.

Results: benchmarks/results/chaos.json (config, kills, totals, baseline) and a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from common import RESULTS, write_results  # noqa: E402
from pipeline_helpers import rto, write_job  # noqa: E402

from rto.cluster import LocalCluster, ray_env  # noqa: E402
from rto.rundir import RunDir  # noqa: E402

TRAINER = {"trainer": 4}
SCORER = {"scorer": 8}
NODE_CPUS = 2
FAULT_TOLERANCE = {"retries": 3, "backoff_s": 0, "wait_for_resources_s": 120, "probe_timeout_s": 30}
KINDS = ("node", "trainable", "rollout")
TITLES = {"trainable": "ray::TrainableWorker", "rollout": "ray::RolloutWorker"}
NODE_OF = {"trainable": "trainer", "rollout": "scorer"}


def job_changes(address: str | None, steps: int, checkpoint_every: int, **extra) -> dict:
    """The tests' tiny job (tests/test_cluster_faults.py), `steps` PPO steps."""
    return {
        "task__n_sft": 128, "task__n_pairs": 32, "task__n_eval_pairs": 16, "task__n_prompts": 32,
        "sft__max_steps": 20, "stages": ["sft", "dpo", "rm", "ppo"],
        "ppo__steps": steps, "ppo__checkpoint_every": checkpoint_every, "ppo__tensorboard": False,
        "ppo__fault_tolerance": dict(FAULT_TOLERANCE),
        "resources": {
            "ray_address": address,
            "policy": {"ranks": 2, "cpus": 0.25, "node_resources": {"trainer": 1}},
            "critic": {"cpus": 0.25, "node_resources": {"trainer": 1}},
            **{g: {"cpus": 0.25, "node_resources": {"scorer": 1}} for g in ("ref", "dpo", "rm", "rollout")},
        },
        **extra,
    }  # fmt: skip


def schedule(seed: int, steps: int) -> list[dict]:
    """Three distinct kill steps in [3, steps - 3], sorted; the kinds in a seeded order; the node
    kill's target node; for process kills, a uniform draw that picks one of the matching PIDs."""
    if steps < 8:
        raise SystemExit("--steps must be at least 8 (three distinct kill steps in [3, steps - 3])")
    rng = random.Random(seed)
    at = sorted(rng.sample(range(3, steps - 2), 3))
    kinds = list(KINDS)
    rng.shuffle(kinds)
    node = rng.choice(["trainer", "scorer"])
    return [
        {"kind": kind, "step": step, "node": node if kind == "node" else NODE_OF[kind], "draw": rng.random()}
        for kind, step in zip(kinds, at, strict=True)
    ]


# ---------------------------------------------------------------- watching a run


def ppo_steps(run_dir: Path) -> list[int]:
    return [row["step"] for row in ppo_rows(run_dir)]


class Monitor(threading.Thread):
    """Every 0.2 s: the new lines of the run's log that tell of a recovery (NOTABLE), then the
    highest ppo step in metrics.jsonl; each kept with the monotonic time it was first seen (a line
    and a step seen in the same poll share a time; the line was read first)."""

    def __init__(self, run_dir: Path, log: Path, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.log, self.interval = run_dir, log, interval
        self.timeline: list[tuple[float, int]] = []  # (t, highest step) at every change
        self.lines: list[tuple[float, int, str]] = []  # (t, byte offset of the line's end, line)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self._read = 0
        self._partial = b""

    def poll(self) -> None:
        now = time.monotonic()
        try:
            with open(self.log, "rb") as f:
                f.seek(self._read)
                data = f.read()
        except OSError:
            data = b""
        self._read += len(data)
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        end = self._read - len(self._partial)
        offset = end - sum(len(c) + 1 for c in complete)
        found = []
        for raw in complete:
            offset += len(raw) + 1
            line = SOURCE.sub("", raw.decode(errors="replace")).strip()
            if any(word in line for word in NOTABLE):
                found.append((now, offset, line))
        steps = ppo_steps(self.run_dir)
        top = max(steps) if steps else 0
        with self.lock:
            self.lines.extend(found)
            if not self.timeline or self.timeline[-1][1] != top:
                self.timeline.append((now, top))

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            time.sleep(self.interval)
        self.poll()

    def step(self) -> int:
        with self.lock:
            return self.timeline[-1][1] if self.timeline else 0

    def recovered(self, kill: dict) -> float | None:
        """When the stage had recovered from `kill`: the first time, at or after its last recovery
        line since the kill, that metrics.jsonl shows a step beyond both the step reached at the
        kill and the step shown when the stage noticed the loss (its first "lost" line). With a
        rewind, the metrics are truncated to the checkpoint first, so the steps run again count.
        None while the loss has not been noticed or the interrupted step is not done."""
        with self.lock:
            lines = [
                (t, line)
                for t, offset, line in self.lines
                if kill["log_offset"] < offset <= kill.get("log_end", float("inf"))
            ]
            timeline = list(self.timeline)
        noticed = next((t for t, line in lines if LOST_LINE.match(line)), None)
        if noticed is None:
            return None
        shown = max([top for t, top in timeline if t <= noticed] or [0])
        target = max(kill["step_reached"], shown)
        last = lines[-1][0]
        return next((t for t, top in timeline if t >= last and top > target), None)


def start_rto_run(job: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "COLUMNS": "400",
        "PYTHONUNBUFFERED": "1",
    }
    env = ray_env(env)
    return subprocess.Popen(
        [sys.executable, "-m", "rto.cli", "run", str(job), "--run-dir", str(run_dir)],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip


def check_output(run_dir: Path, steps: int) -> dict:
    metrics = ppo_steps(run_dir)
    traces = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "traces").glob("step-*.parquet"))
    left = sorted(str(p.relative_to(run_dir)) for p in (run_dir / "checkpoints").glob("ppo-*/step-*"))
    return {
        "metrics_steps_once": metrics == list(range(1, steps + 1)),
        "traces_steps_once": traces == list(range(1, steps + 1)),
        "no_checkpoint_left": not left,
        "metrics_steps": metrics if metrics != list(range(1, steps + 1)) else f"1..{steps}",
        "trace_steps": traces if traces != list(range(1, steps + 1)) else f"1..{steps}",
    }


def ppo_rows(run_dir: Path) -> list[dict]:
    """The ppo records of metrics.jsonl (a half-written last line is not a record)."""
    return RunDir(run_dir).read_metrics("ppo")


def run_summary(run_dir: Path, log: Path, returncode: int | None, wall: float, steps: int) -> dict:
    summary_path = run_dir / "summary.json"
    ppo = json.loads(summary_path.read_text()).get("ppo", {}) if summary_path.exists() else {}
    rows = ppo_rows(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    times = [r["time_step"] for r in rows if "time_step" in r]
    out = {
        "returncode": returncode,
        "succeeded": returncode == 0,
        "wall_s": round(wall, 1),
        "ppo_stage_s": round(ppo["seconds"], 1) if "seconds" in ppo else None,
        "restarts": ppo.get("restarts"),
        "steps_run_again": ppo.get("steps_run_again"),
        "last_metrics_restarts": rows[-1].get("restarts") if rows else None,
        "median_step_s": round(statistics.median(times), 2) if times else None,
        "mean_step_s": round(statistics.mean(times), 2) if times else None,
        "log": str(log),
        "run_dir": str(run_dir),
        **check_output(run_dir, steps),
    }
    if returncode != 0:
        out["log_tail"] = log.read_text(errors="replace")[-3000:]
    return out


# ---------------------------------------------------------------- the kills


def wait_until(process: subprocess.Popen, condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise RuntimeError(f"rto run exited ({process.returncode}) while waiting for {what}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {what} within {timeout:.0f} s")
        time.sleep(0.2)


def kill(cluster: LocalCluster, plan: dict) -> dict:
    """Carry out one planned kill now; returns what was killed and when (seconds since the run began)."""
    if plan["kind"] == "node":
        node = cluster.node_with(plan["node"])
        resources = dict(node.resources)
        t_kill = time.monotonic()
        count = cluster.kill(node)
        row = {
            "t_kill": t_kill,
            "target": f"{plan['node']} node (ray start pid {node.pid}, {count} processes)",
            "pid": node.pid,
            "processes_killed": count,
        }
        replacement = cluster.add_node(num_cpus=NODE_CPUS, resources=resources)
        row["replacement_up_after_s"] = round(time.monotonic() - t_kill, 1)
        row["replacement_pid"] = replacement.pid
        return row
    title = TITLES[plan["kind"]]
    deadline = time.monotonic() + 60
    while True:  # right after a rebuild a group may not have its processes yet
        node = cluster.node_with(plan["node"])
        pids = node.worker_pids(title)
        if pids or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    if not pids:
        raise RuntimeError(f"no {title} process on the {plan['node']} node")
    pid = pids[int(plan["draw"] * len(pids))]
    try:
        title_now = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        title_now = title
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return {
        "t_kill": t_kill,
        "target": f"{title_now} pid {pid} on the {plan['node']} node (1 of {len(pids)})",
        "pid": pid,
        "candidates": pids,
    }


RUN_AGAIN = re.compile(r"steps (\d+)\.\.(\d+) are run again")
LOST_TRAINABLE = re.compile(r"lost trainable actor (.*?): rebuilding")
LOST = re.compile(r"lost (.*?) during (.*?) \(")
REBUILT = re.compile(r"rebuilt (.*?) in ([0-9.]+) s")
RESUMED = re.compile(r"resumed from .*\(step (\d+)\)")
SOURCE = re.compile(r"\s{2,}[\w.]+\.py:\d+\s*$")  # rich's "faults.py:113" at the right
LOST_LINE = re.compile(r"^(\[[0-9:]+\]\s+)?lost ")
NOTABLE = ("lost ", "rebuilt ", "resumed from", "continuing from", "does not answer", "gave up", "placement")


def explain(segment: str) -> dict:
    """What the stage logged between one kill and the next (or the end)."""
    lines = [SOURCE.sub("", line).strip() for line in segment.splitlines() if any(w in line for w in NOTABLE)]
    again = [(int(a), int(b)) for a, b in RUN_AGAIN.findall(segment)]
    lost = LOST.findall(segment)
    return {
        "steps_lost": sum(max(0, b - a + 1) for a, b in again),
        "steps_run_again": [f"{a}..{b}" for a, b in again],
        "recoveries": len(lost),
        "lost": [f"{who} during {what}" for who, what in lost],
        "rebuilt": [f"{names} in {s} s" for names, s in REBUILT.findall(segment)],
        "rewound_to": [int(s) for s in RESUMED.findall(segment)],
        "log_lines": lines,
    }


def chaos_run(cluster, job, run_dir, log, plans, steps, timeout) -> tuple[dict, list[dict]]:
    started = time.monotonic()
    process = start_rto_run(job, run_dir, log)
    monitor = Monitor(run_dir, log)
    monitor.start()
    rows: list[dict] = []
    error = None

    def left() -> float:
        return timeout - (time.monotonic() - started)

    try:
        for plan in plans:
            if rows:  # the previous kill's recovery first, so that kills never overlap
                prev = rows[-1]
                wait_until(
                    process, lambda prev=prev: monitor.recovered(prev) is not None, left(),
                    f"the recovery from kill {len(rows)}",
                )  # fmt: skip
            wait_until(
                process, lambda plan=plan: monitor.step() >= plan["step"], left(), f"ppo step {plan['step']}"
            )
            reached = monitor.step()
            row = {"kind": plan["kind"], "planned_step": plan["step"], "step_reached": reached}
            row["log_offset"] = log.stat().st_size
            row.update(kill(cluster, plan))
            rows.append(row)
            print(f"  kill {len(rows)}: {plan['kind']} at step {reached}: {row['target']}", flush=True)
        process.wait(timeout=max(1.0, left()))
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        error = f"{type(exc).__name__}: {exc}"
        print(f"  chaos run: {error}", flush=True)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        wall = time.monotonic() - started
        monitor.done.set()
        monitor.join()
    data = log.read_bytes()
    offsets = [r["log_offset"] for r in rows] + [len(data)]
    for row, end in zip(rows, offsets[1:], strict=True):
        row["log_end"] = end  # what the stage logged after the next kill is that kill's
    kills = []
    for i, row in enumerate(rows):
        segment = data[offsets[i] : offsets[i + 1]].decode(errors="replace")
        t_back = monitor.recovered(row)
        noticed = next(
            (t for t, o, line in monitor.lines if o > row["log_offset"] and LOST_LINE.match(line)), None
        )
        kills.append(
            {
                "kill": i + 1,
                "kind": row["kind"],
                "planned_step": row["planned_step"],
                "step_reached": row["step_reached"],
                "at_s": round(row["t_kill"] - started, 1),
                "target": row["target"],
                "pid": row["pid"],
                **{k: row[k] for k in ("processes_killed", "replacement_up_after_s", "replacement_pid", "candidates") if k in row},
                "noticed_after_s": round(noticed - row["t_kill"], 1) if noticed is not None else None,
                "recovery_s": round(t_back - row["t_kill"], 1) if t_back is not None else None,
                "recovered_at_step": next((top for t, top in monitor.timeline if t == t_back), None),
                **explain(segment),
            }
        )  # fmt: skip
    result = run_summary(run_dir, log, process.returncode, wall, steps)
    result["error"] = error
    result["timeline"] = [(round(t - started, 1), top) for t, top in monitor.timeline]
    result["recovery_lines"] = [(round(t - started, 1), line) for t, _, line in monitor.lines]
    return result, kills


def plain_run(job, run_dir, log, steps, timeout) -> dict:
    started = time.monotonic()
    process = start_rto_run(job, run_dir, log)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    return run_summary(run_dir, log, process.returncode, time.monotonic() - started, steps)


# ---------------------------------------------------------------- the report


def table(kills: list[dict]) -> str:
    lines = [
        "| kill | step | target | noticed after s | recovery s | steps lost | what the stage did |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in kills:
        if k["steps_run_again"]:
            back = k["rewound_to"][0] if k["rewound_to"] else "?"
            did = f"rewound to checkpoint step {back}, steps {', '.join(k['steps_run_again'])} run again"
        elif k["rebuilt"]:
            did = "rebuilt " + "; ".join(k["rebuilt"]) + ", the interrupted phase run again"
        else:
            did = "nothing logged"
        if k["kind"] == "node":
            target = f"{k['target'].split(' (')[0]}, {k.get('processes_killed', '?')} processes"
            if "replacement_up_after_s" in k:
                target += f"; replacement up {k['replacement_up_after_s']:.1f} s after"
        else:
            title, rest = k["target"].split(" pid ", 1)
            where = rest.split(" on the ", 1)[1].split(" (")[0]
            who = k["lost"][0].split(" on node ")[0] if k["lost"] else "?"
            target = f"{who}: {title} pid {k['pid']}, {where}"
        noticed = f"{k['noticed_after_s']:.1f}" if k.get("noticed_after_s") is not None else "never"
        recovery = f"{k['recovery_s']:.1f}" if k["recovery_s"] is not None else "never"
        lines.append(
            f"| {k['kill']}. {k['kind']} | {k['step_reached']} | {target} | {noticed} | {recovery} "
            f"| {k['steps_lost']} | {did} |"
        )
    return "\n".join(lines)


def rto_tree() -> str:
    """HEAD plus a digest of the uncommitted changes under rto/ (the code the run used)."""
    import hashlib

    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=False).stdout

    head = git("rev-parse", "--short", "HEAD").decode().strip()
    diff = git("diff", "HEAD", "--", "rto")
    return f"{head}+{hashlib.sha1(diff).hexdigest()[:10]}" if diff else head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    parser.add_argument("--work", type=Path, default=None, help="work directory (default: a new /tmp dir)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per ppo run")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still stops the cluster

    plans = schedule(args.seed, args.steps)
    work = args.work or Path(tempfile.mkdtemp(prefix="rto-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"work dir {work}; kills: " + ", ".join(f"{p['kind']} at step {p['step']}" for p in plans), flush=True
    )
    started = time.monotonic()
    trees = {}  # the code each run used (the checkout may be edited meanwhile)

    trained = work / "trained"
    changes = job_changes(None, args.steps, args.checkpoint_every, stages=["sft", "dpo", "rm"])
    changes.pop("resources")
    (work / "train").mkdir(exist_ok=True)
    t0 = time.monotonic()
    result = rto("run", str(write_job(work / "train", **changes)), "--run-dir", str(trained), timeout=900)
    if result.returncode != 0:
        raise SystemExit(f"sft/dpo/rm failed:\n{result.stderr[-3000:]}")
    train_s = time.monotonic() - t0
    print(f"sft, dpo, rm trained in {train_s:.0f} s", flush=True)

    def prepare(name: str, address: str) -> tuple[Path, Path, Path]:
        root = work / name
        root.mkdir(exist_ok=True)
        shutil.rmtree(root / "run", ignore_errors=True)
        shutil.copytree(trained, root / "run")
        job = write_job(root, **job_changes(address, args.steps, args.checkpoint_every))
        return job, root / "run", root / "run.log"

    baseline = None
    with LocalCluster(head_cpus=0) as cluster:
        cluster.add_node(num_cpus=NODE_CPUS, resources=TRAINER)
        cluster.add_node(num_cpus=NODE_CPUS, resources=SCORER)
        if not args.no_baseline:
            job, run_dir, log = prepare("baseline", cluster.address)
            trees["baseline"] = rto_tree()
            baseline = plain_run(job, run_dir, log, args.steps, args.timeout)
            print(
                f"baseline: {'ok' if baseline['succeeded'] else 'FAILED'} in {baseline['wall_s']} s",
                flush=True,
            )
        job, run_dir, log = prepare("chaos", cluster.address)
        trees["chaos"] = rto_tree()
        chaos, kills = chaos_run(cluster, job, run_dir, log, plans, args.steps, args.timeout)
        print(f"chaos: {'ok' if chaos['succeeded'] else 'FAILED'} in {chaos['wall_s']} s", flush=True)

    trees["end"] = rto_tree()
    totals = {
        "succeeded": chaos["succeeded"] and all(chaos[k] for k in ("metrics_steps_once", "traces_steps_once", "no_checkpoint_left")),
        "kills": len(kills),
        "wall_s": chaos["wall_s"],
        "baseline_wall_s": baseline["wall_s"] if baseline else None,
        "overhead": round(chaos["wall_s"] / baseline["wall_s"], 2) if baseline and baseline["succeeded"] else None,
        "extra_s": round(chaos["wall_s"] - baseline["wall_s"], 1) if baseline else None,
        "restarts": chaos["restarts"],
        "steps_run_again": chaos["steps_run_again"],
        "steps_lost_from_log": sum(k["steps_lost"] for k in kills),
        "recovery_s_total": round(sum(k["recovery_s"] or 0 for k in kills), 1),
        "baseline_median_step_s": baseline["median_step_s"] if baseline else None,
        "benchmark_wall_s": round(time.monotonic() - started, 1),
        "rto_changed_during_run": len(set(trees.values())) > 1,
    }  # fmt: skip
    settings = {
        "steps": args.steps,
        "seed": args.seed,
        "checkpoint_every": args.checkpoint_every,
        "cluster": {"head_cpus": 0, "nodes": {"trainer": {"cpus": NODE_CPUS, "resources": TRAINER},
                                              "scorer": {"cpus": NODE_CPUS, "resources": SCORER}}},
        "schedule": [{k: v for k, v in p.items()} for p in plans],
        "fault_tolerance": FAULT_TOLERANCE,
        "job": job_changes("<cluster address>", args.steps, args.checkpoint_every),
        "sft_dpo_rm_s": round(train_s, 1),
        "rto_tree": trees,
        "work": str(work),
        "recovery_s": "from the SIGKILL until metrics.jsonl shows a ppo step beyond the step reached at the kill",
        "steps_lost": "steps named by the stage's 'steps X..Y are run again' lines after the kill (0: no rewind)",
    }  # fmt: skip
    path = write_results(
        "chaos", settings, {"kills": kills, "totals": totals, "chaos": chaos, "baseline": baseline}, args.out
    )
    print()
    print(table(kills))
    print()
    print(json.dumps(totals, indent=1))
    print(f"wrote {path}")
    if totals["rto_changed_during_run"]:
        print("warning: rto/ changed during the benchmark (uncommitted edits); see settings.rto_tree")
    if not totals["succeeded"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
