"""Samples/s of PPO iterations: rto's arms against TRL's GRPOTrainer, each repetition in a fresh process.

    python benchmarks/throughput.py                       # every arm, both sizes, 1 and 2 threads, 3 reps
    python benchmarks/throughput.py --arms trl_grpo rto_distributed_ppo --sizes tiny --threads 1 2 \\
        --repeats 2 --iterations 6                        # a short run of two arms

Arms (`--arms`): `trl_grpo` (TRL's GRPOTrainer, one process, `torch.set_num_threads(threads)`),
`rto_distributed_ppo` (the `ppo` stage on Ray: one actor per group, `resources.actor_threads=threads`
where the field exists), `rto_colocated_ppo` (`resources.colocate=all`: one process per rank holds
every model) and `rto_colocated_reinforce_pp` (the same with the critic-free REINFORCE++ estimator).
rto's arms keep the job's full RTO reward (reference, DPO model and reward model). Every arm starts
from the same prepared policy folder (one per `--sizes` entry, prepared once by this process before
any arm runs), the same prompts, `--batch` samples per iteration, the same generation length limit
and one optimizer step per iteration.

Each repetition of each (arm, size, threads) is its own `python benchmarks/throughput.py --worker
SPEC` process, so no arm inherits another's warm caches, thread pools or Ray cluster; repetitions are
interleaved (rep 1 runs every arm once, then rep 2, ...) and each repetition's order is the previous
one's rotated by one, so no arm always runs first or last. A worker reports its iteration times, the
torch threads of the processes that compute (the TRL process; rto's Ray actors), the CPUs it could
see (os.cpu_count, affinity, cgroup quota, OMP/MKL_NUM_THREADS) and the CPU seconds of its whole
process tree (for rto: the driver, Ray's daemons and every actor) over the measured iterations;
CPU utilisation = CPU seconds / wall seconds, so a figure above the cores available means threads
fought over them. Figures: the median over repetitions of batch / (median post-warm-up iteration
time), and for each rto row the ratio to `trl_grpo` at the same size and threads, repetitions paired
by index (median, min, max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from common import write_results  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
BASELINE = "trl_grpo"

# name -> (kind, config overrides of the job besides the shared ones and resources.actor_threads)
ARMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "trl_grpo": ("trl", ()),
    "rto_distributed_ppo": ("rto", ()),
    "rto_colocated_ppo": ("rto", ("resources.colocate=all",)),
    "rto_colocated_reinforce_pp": (
        "rto",
        ("resources.colocate=all", "ppo.advantage_estimator=reinforce_pp"),
    ),
}
COLOCATED = {name for name, (_, overrides) in ARMS.items() if "resources.colocate=all" in overrides}

# Policy shapes (overrides of the job's `policy.arch`, LlamaConfig fields of the built-in tiny-llama;
# vocabulary: the text task's tokenizer). The reward model (and the critic, initialised from it)
# stays the job's.
SIZES: dict[str, tuple[str, ...]] = {
    "tiny": (),  # the quickstart's policy: hidden 128, 4 layers, about 0.9 M parameters
    "25m": (
        "policy.arch.hidden_size=512",
        "policy.arch.intermediate_size=1376",
        "policy.arch.num_hidden_layers=8",
        "policy.arch.num_attention_heads=8",
        "policy.arch.num_key_value_heads=8",
    ),  # about 25 M parameters
}
PHASES = ("time_generate", "time_score", "time_train", "time_sync")
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "TOKENIZERS_PARALLELISM")


# ---------------------------------------------------------------------------- what a process can use


def _quota_from_cpu_max(text: str) -> tuple[int, int] | None:
    quota, _, period = text.strip().partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota), int(period)


def cgroup_cpu_quota(root: Path | str = "/sys/fs/cgroup", proc_cgroup: str | None = None) -> dict:
    """The CPU quota the cgroups of this process allow: ``{"cpus": quota/period or None (no limit),
    "limits": [{"file", "quota_us", "period_us"}]}``, the smallest of every limited ancestor, from
    cgroup v2's ``cpu.max`` or v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``. ``proc_cgroup`` is
    the text of /proc/self/cgroup (read when None)."""
    root = Path(root)
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    limits: list[dict] = []
    for line in proc_cgroup.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            bases = [root, root / "unified"]
        elif "cpu" in controllers.split(","):
            bases = [root / controllers, root / "cpu", root / "cpu,cpuacct"]
        else:
            continue
        relative = Path(path.lstrip("/"))
        for base in dict.fromkeys(bases):
            if not base.is_dir():
                continue
            for folder in [base / relative, *(base / p for p in relative.parents)]:
                limit = _read_limit(folder)
                if limit is not None:
                    limits.append(limit)
    cpus = min((x["quota_us"] / x["period_us"] for x in limits), default=None)
    unique = list({x["file"]: x for x in limits}.values())
    return {"cpus": cpus, "limits": unique}


def _read_limit(folder: Path) -> dict | None:
    try:
        if (folder / "cpu.max").is_file():
            parsed = _quota_from_cpu_max((folder / "cpu.max").read_text())
            if parsed is None:
                return None
            return {"file": str(folder / "cpu.max"), "quota_us": parsed[0], "period_us": parsed[1]}
        if (folder / "cpu.cfs_quota_us").is_file():
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
            if quota <= 0 or period <= 0:
                return None
            return {"file": str(folder / "cpu.cfs_quota_us"), "quota_us": quota, "period_us": period}
    except (OSError, ValueError):
        return None
    return None


def cpu_view() -> dict:
    """What this process can see of the CPUs, and the thread settings it inherited."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    return {
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "cgroup_cpu_quota": cgroup_cpu_quota()["cpus"],
        "env": {k: os.environ.get(k) for k in THREAD_ENV},
        "loadavg": list(os.getloadavg()),
    }


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str | None:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return None


def cpu_bf16() -> list[str]:
    """The CPU's bf16 instructions (/proc/cpuinfo flags): without them bf16 autocast is emulated and
    slower than float32; with AMX it is much faster. What a bf16 arm's time depends on."""
    flags = next(
        (line.split(":", 1)[1].split() for line in _cpuinfo().splitlines() if line.startswith("flags")), []
    )
    return [f for f in ("avx512_bf16", "amx_bf16", "amx_tile") if f in flags]


def environment() -> dict:
    """The machine as this (the parent) process sees it; torch's thread defaults are those of a
    process that never set them."""
    import torch

    try:
        import psutil

        physical = psutil.cpu_count(logical=False)
    except ImportError:
        physical = None
    return {
        **cpu_view(),
        "cpu_model": cpu_model(),
        "cpu_bf16": cpu_bf16(),
        "cgroup": cgroup_cpu_quota(),
        "physical_cores": physical,
        "torch": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "torch_default_interop_threads": torch.get_num_interop_threads(),
        "psutil": physical is not None,
    }


# ---------------------------------------------------------------------------- CPU time of a process tree

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stat(pid: str | int) -> tuple[int, float, int, float] | None:
    """(ppid, cpu seconds including reaped children, start time in ticks, os threads) from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # after "pid (comm) ": state is fields[0] (field 3)
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return int(fields[1]), (utime + stime + cutime + cstime) / _CLOCK_TICKS, int(fields[19]), int(fields[17])


def tree_snapshot_proc(pid: int) -> dict[int, dict]:
    """:func:`tree_snapshot` from /proc alone (no psutil)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(entry)
            if stat is not None:
                stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for child, (ppid, *_rest) in stats.items():
        children.setdefault(ppid, []).append(child)
    out, todo = {}, [pid]
    while todo:
        current = todo.pop()
        if current in out or current not in stats:
            continue
        _, cpu, start, threads = stats[current]
        name = ""
        try:
            name = Path(f"/proc/{current}/comm").read_text().strip()
        except OSError:
            pass
        out[current] = {"start": float(start), "cpu": cpu, "name": name, "threads": threads}
        todo.extend(children.get(current, []))
    return out


def tree_snapshot_psutil(pid: int) -> dict[int, dict]:
    """:func:`tree_snapshot` with psutil."""
    import psutil

    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return {}
    out = {}
    for process in processes:
        try:
            with process.oneshot():
                t = process.cpu_times()
                out[process.pid] = {
                    "start": process.create_time(),
                    "cpu": t.user + t.system + t.children_user + t.children_system,
                    "name": process.name(),
                    "threads": process.num_threads(),
                }
        except psutil.Error:
            continue  # ended between the listing and the read
    return out


def tree_snapshot(pid: int) -> dict[int, dict]:
    """``{pid: {"start", "cpu", "name", "threads"}}`` for ``pid`` and all its descendants: CPU
    seconds (user + system, plus those of reaped children, so a child that ends and is waited for
    keeps counting through its parent), a start time telling a reused pid from the same process,
    the name and the OS threads."""
    try:
        import psutil  # noqa: F401
    except ImportError:
        return tree_snapshot_proc(pid)
    return tree_snapshot_psutil(pid)


def tree_cpu_delta(before: dict[int, dict], after: dict[int, dict]) -> float:
    """CPU seconds the tree used between two snapshots: each process of ``after`` counts from its
    value in ``before`` (the same pid and start time) or from zero (it started in between). A process
    that ended in between without being reaped by one of the tree's is lost (not counted)."""
    total = 0.0
    for pid, now in after.items():
        then = before.get(pid)
        same = then is not None and abs(then["start"] - now["start"]) < 1e-3
        total += max(0.0, now["cpu"] - (then["cpu"] if same else 0.0))
    return total


def per_process_cpu(before: dict[int, dict], after: dict[int, dict]) -> list[dict]:
    """The processes of ``after`` with the CPU seconds each used since ``before``, busiest first."""
    rows = []
    for pid, now in after.items():
        then = before.get(pid)
        same = then is not None and abs(then["start"] - now["start"]) < 1e-3
        cpu = max(0.0, now["cpu"] - (then["cpu"] if same else 0.0))
        rows.append(
            {"pid": pid, "name": now["name"], "os_threads": now["threads"], "cpu_seconds": round(cpu, 3)}
        )
    return sorted(rows, key=lambda r: -r["cpu_seconds"])


class IterationMeter:
    """Wall and process-tree CPU seconds of each iteration: ``begin(step)`` / ``end(step)`` around
    it. A step begun again (after a rewind) replaces its earlier figures."""

    def __init__(self, pid: int | None = None):
        self.pid = pid or os.getpid()
        self.open: dict[int, tuple[float, dict]] = {}
        self.done: dict[int, dict] = {}
        self.first: dict[int, dict] = {}
        self.last: dict[int, dict] = {}

    def begin(self, step: int) -> None:
        snap = tree_snapshot(self.pid)
        self.open[step] = (time.perf_counter(), snap)
        self.first.setdefault(step, snap)

    def end(self, step: int) -> None:
        wall_end = time.perf_counter()
        snap = tree_snapshot(self.pid)
        started, before = self.open.pop(step)
        self.done[step] = {"step": step, "wall": wall_end - started, "cpu": tree_cpu_delta(before, snap)}
        self.last[step] = snap

    def iterations(self) -> list[dict]:
        return [self.done[s] for s in sorted(self.done)]

    def processes(self, steps: Sequence[int]) -> list[dict]:
        """Each process's CPU seconds from the start of the first of ``steps`` to the end of the last."""
        steps = [s for s in steps if s in self.first and s in self.last]
        if not steps:
            return []
        return per_process_cpu(self.first[min(steps)], self.last[max(steps)])


def probe_worker(worker=None) -> dict:
    """What a compute process runs with (called in rto's Ray actors through ``Worker.call``, which
    passes the worker; and in the TRL process with no argument)."""
    import torch

    try:
        import psutil

        os_threads = psutil.Process().num_threads()
    except ImportError:
        stat = _proc_stat(os.getpid())
        os_threads = stat[3] if stat else None
    return {
        "pid": os.getpid(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "os_threads": os_threads,
        **cpu_view(),
    }


# ---------------------------------------------------------------------------- the plan of a run


def schedule(units: Sequence, repeats: int) -> list[tuple[int, object]]:
    """``(rep, unit)`` pairs: every unit once per repetition, repetitions one after the other, each
    repetition's order the previous one's rotated left by one."""
    units = list(units)
    out = []
    for rep in range(repeats):
        shift = rep % len(units) if units else 0
        out.extend((rep, unit) for unit in units[shift:] + units[:shift])
    return out


def has_actor_threads() -> bool:
    from rto.ppo.config import ResourcesConfig

    return "actor_threads" in ResourcesConfig.model_fields


def shared_overrides(args) -> list[str]:
    """What every rto arm sets: the run's length, one optimizer step of the whole batch per iteration."""
    return [
        f"ppo.steps={args.iterations}", f"ppo.rollout_batch_size={args.batch}", f"ppo.train_batch_size={args.batch}",
        f"ppo.micro_batch_size={args.batch}", f"ppo.max_new_tokens={args.max_new_tokens}",
        f"ppo.checkpoint_every={args.iterations + 1000}", "ppo.tensorboard=false",
        *([f"ppo.actor_lr={args.lr}"] if args.lr is not None else []), *args.overrides,
    ]  # fmt: skip


def arm_overrides(arm: str, threads: int | str, actor_threads_field: bool) -> list[str]:
    """The arm's own overrides at ``threads`` (torch threads per Ray actor): colocated arms always
    set ``resources.actor_threads`` (a colocated rank runs every phase); the distributed arm only
    where the field exists. ``threads == "default"`` sets none."""
    kind, own = ARMS[arm]
    if kind != "rto":
        return []
    out = list(own)
    if threads != "default" and (arm in COLOCATED or actor_threads_field):
        out.append(f"resources.actor_threads={threads}")
    return out


# ---------------------------------------------------------------------------- figures


def _median(values: Iterable[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def rep_summary(result: dict, warmup: int, batch: int) -> dict:
    """One repetition's figures from its worker's result: the post-warm-up iterations only."""
    seconds = result["iteration_seconds"][warmup:]
    if not seconds:
        raise ValueError(f"{result.get('arm')}: no iteration after the {warmup} warm-up iterations")
    median = statistics.median(seconds)
    phases = {
        k: statistics.median(v[warmup:]) for k, v in result.get("phase_seconds", {}).items() if v[warmup:]
    }
    if not phases:
        phases = {"total": median}
    lengths = result.get("response_length", [])[warmup:] or result.get("response_length", [])
    measured = result.get("cpu_iterations", [])[warmup:]
    wall = sum(x["wall"] for x in measured)
    cpu = sum(x["cpu"] for x in measured)
    length = statistics.fmean(lengths) if lengths else None
    return {
        "samples_per_s": batch / median,
        "tokens_per_s": batch * length / median if length is not None else None,
        "iteration_seconds": median,
        "phase_seconds": phases,
        "response_length_mean": length,
        "cpu_seconds_per_iteration": cpu / len(measured) if measured else None,
        "cpu_utilisation": cpu / wall if wall > 0 else None,
        "torch_threads_used": threads_used(result.get("compute_processes", [])),
    }


def threads_used(processes: list[dict]) -> int | list[int] | None:
    """The torch threads of the compute processes: one number if they agree, else the distinct ones."""
    values = sorted({p["torch_threads"] for p in processes if p.get("torch_threads") is not None})
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def build_rows(reps: list[dict], repeats: int) -> list[dict]:
    """One row per (arm, params, threads) from the repetitions' records (``arm``, ``params``,
    ``threads``, ``rep``, ``summary`` or ``error``); lists by repetition index, None where one failed."""
    groups: dict[tuple, list[dict]] = {}
    for rec in reps:
        groups.setdefault((rec["arm"], rec["params"], rec["threads"]), []).append(rec)
    rows = []
    for (arm, params, threads), recs in groups.items():
        by_rep: list[dict | None] = [None] * repeats
        for rec in recs:
            by_rep[rec["rep"]] = rec.get("summary")
        ok = [s for s in by_rep if s is not None]
        phase_names = sorted({k for s in ok for k in s["phase_seconds"]})
        first = next((rec for rec in sorted(recs, key=lambda r: r["rep"]) if rec.get("summary")), recs[0])
        rows.append(
            {
                "arm": arm,
                "params": params,
                "threads": threads,
                "size": first.get("size"),
                "samples_per_s": _median(s["samples_per_s"] for s in ok),
                "samples_per_s_reps": [s["samples_per_s"] if s else None for s in by_rep],
                "tokens_per_s": _median(s.get("tokens_per_s") for s in ok),
                "iteration_seconds": _median(s["iteration_seconds"] for s in ok),
                "phase_seconds": {k: _median(s["phase_seconds"].get(k) for s in ok) for k in phase_names},
                "response_length_mean": (
                    statistics.fmean(x)
                    if (x := [s["response_length_mean"] for s in ok if s["response_length_mean"] is not None])
                    else None
                ),  # fmt: skip
                "cpu_seconds_per_iteration": _median(s["cpu_seconds_per_iteration"] for s in ok),
                "cpu_utilisation": _median(s["cpu_utilisation"] for s in ok),
                "torch_threads_used": ok[0]["torch_threads_used"] if ok else None,
                "precision": first.get("precision"),
                "overrides": first.get("overrides", []),
                "process_view": first.get("process_view"),
                "failed_reps": [i for i, s in enumerate(by_rep) if s is None],
            }
        )
    order = {name: i for i, name in enumerate(ARMS)}
    return sorted(rows, key=lambda r: (r["params"], str(r["threads"]), order.get(r["arm"], len(order))))


def build_ratios(rows: list[dict], baseline: str = BASELINE) -> list[dict]:
    """For each row not of ``baseline``: its samples/s over the baseline's at the same (params,
    threads), repetitions paired by index (a pair where either failed is left out)."""
    base = {(r["params"], r["threads"]): r for r in rows if r["arm"] == baseline}
    out = []
    for row in rows:
        other = base.get((row["params"], row["threads"]))
        if row["arm"] == baseline or other is None:
            continue
        pairs = [
            a / b
            for a, b in zip(row["samples_per_s_reps"], other["samples_per_s_reps"], strict=False)
            if a is not None and b
        ]
        out.append(
            {
                "arm": row["arm"],
                "params": row["params"],
                "threads": row["threads"],
                "baseline": baseline,
                "median": statistics.median(pairs) if pairs else None,
                "min": min(pairs) if pairs else None,
                "max": max(pairs) if pairs else None,
                "reps": pairs,
            }
        )
    return out


def _fmt(value, spec: str = ".2f") -> str:
    return "–" if value is None else format(value, spec)


def markdown_table(rows: list[dict], ratios: list[dict]) -> str:
    ratio = {(r["arm"], r["params"], r["threads"]): r for r in ratios}
    lines = [
        "| arm | params | threads | samples/s | per rep | s / iter | phases (gen / score / train / sync) "
        "| mean length | tokens/s | CPU s / iter | CPU util. | torch threads | × trl_grpo (min–max) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        p = row["phase_seconds"]
        phases = " / ".join(_fmt(p.get(k)) for k in PHASES) if any(k in p for k in PHASES) else "total only"
        r = ratio.get((row["arm"], row["params"], row["threads"]))
        rtext = f"{_fmt(r['median'])}× ({_fmt(r['min'])}–{_fmt(r['max'])})" if r else ""
        reps = ", ".join(_fmt(x, ".1f") for x in row["samples_per_s_reps"])
        lines.append(
            f"| {row['arm']} | {row['params'] / 1e6:.2f} M | {row['threads']} | {_fmt(row['samples_per_s'], '.1f')} "
            f"| {reps} | {_fmt(row['iteration_seconds'])} | {phases} | {_fmt(row['response_length_mean'], '.1f')} | {_fmt(row['tokens_per_s'], '.0f')} "
            f"| {_fmt(row['cpu_seconds_per_iteration'])} | {_fmt(row['cpu_utilisation'])} "
            f"| {row['torch_threads_used']} | {rtext} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- workers (one per repetition)


def run_worker(spec: dict) -> dict:
    from rto.config import load_config

    cfg = load_config(spec["config"], spec["overrides"])
    if spec["kind"] == "rto" and cfg.resources.torch_threads:  # as `rto run` does for its driver
        import torch

        torch.set_num_threads(cfg.resources.torch_threads)
    prepared = load_prepared(cfg, Path(spec["base"]))
    work = Path(spec["work"])
    started = time.perf_counter()
    load_start = os.getloadavg()
    if spec["kind"] == "rto":
        result = rto_iterations(cfg, work, prepared, spec["warmup"])
    else:
        result = trl_iterations(cfg, work, prepared, spec)
    result.update(
        arm=spec["arm"],
        wall_seconds_including_startup=time.perf_counter() - started,
        loadavg_start=list(load_start),
        loadavg_end=list(os.getloadavg()),
        process_view=cpu_view(),
    )
    return result


def load_prepared(cfg, base: Path):
    """The folder the parent prepared for this size (never prepared here: every arm shares it)."""
    from pipelines.prepare import prepare, prepared_key
    from rto.rundir import RunDir

    run = RunDir(base)
    if not (run.prepared_dir / prepared_key(cfg) / "prepared.json").is_file():
        raise SystemExit(f"no prepared folder for this job under {run.prepared_dir}: the parent prepares it")
    return prepare(cfg, run, log=lambda _: None)


def rto_iterations(cfg, work: Path, prepared, warmup: int) -> dict:
    import ray

    import rto.ppo.trainer as trainer
    from pipelines.prompts import TextPrompts
    from rto.models import load_tokenizer
    from rto.ppo.groups import ModelPaths
    from rto.ppo.trainer import PPOInputs, run_ppo
    from rto.rundir import RunDir

    meter = IterationMeter()
    probes: list[dict] = []
    one_step = trainer.one_step

    def measured_step(inputs, groups, state, step, supervisor=None):
        meter.begin(step)
        record = one_step(inputs, groups, state, step, supervisor)
        meter.end(step)
        if step == inputs.cfg.ppo.steps:
            probes.extend(probe_groups(groups))
        return record

    trainer.one_step = measured_step  # run_steps looks it up in the module at every step
    run = RunDir(work / "rto").create()
    policy = prepared.model("policy")
    rm = prepared.model("reward_model")
    paths = ModelPaths(policy=policy, critic=rm, ref=policy, dpo=policy, rm=rm)
    tokenizer = load_tokenizer(policy)
    try:
        run_ppo(
            PPOInputs(
                cfg=cfg,
                run=run,
                out_dir=work / "rto-out",
                paths=paths,
                prompts=TextPrompts(tokenizer, prepared.records("prompts")),
                tokenizer=tokenizer,
                processing_class=tokenizer,
                ground_truth=prepared.ground_truth(),
                rm_normalization=(0.0, 1.0),
                stage_hash="throughput",
                resume=False,
            )
        )
        processes = meter.processes(range(warmup + 1, cfg.ppo.steps + 1))
    finally:
        trainer.one_step = one_step
        if ray.is_initialized():
            ray.shutdown()
    if not meter.done:
        raise RuntimeError("the PPO steps were never measured: rto.ppo.trainer.one_step is no longer called")
    rows = [r for r in run.read_metrics("ppo") if "time_step" in r]
    return {
        "iteration_seconds": [r["time_step"] for r in rows],
        "phase_seconds": {k: [r[k] for r in rows] for k in PHASES},
        "response_length": [r["response_length"] for r in rows],
        "cpu_iterations": meter.iterations(),
        "compute_processes": probes,
        "tree_processes": processes,
    }


def probe_groups(groups) -> list[dict]:
    """:func:`probe_worker` in every actor process of the PPO groups (each process once)."""
    bases = [groups.colocated] if getattr(groups, "colocated", None) is not None else groups.all()
    out, seen = [], set()
    for group in bases:
        try:
            answers = group.run_all("call", "throughput:probe_worker")
        except Exception as exc:  # noqa: BLE001 - a figure to report, not a reason to fail the run
            out.append({"group": group.name, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for answer in answers:
            if answer["pid"] not in seen:
                seen.add(answer["pid"])
                out.append({"group": group.name, **answer})
    return out


def trl_config(cfg, work: Path, spec: dict):
    """GRPOTrainer's arguments for the TRL arm. ``bf16`` is set explicitly: GRPOConfig's default is
    bf16 autocast even on a CPU, where rto computes in float32; float32 unless the spec asks for
    TRL's default (``trl_precision: bf16``, `--trl-precision`)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=spec["batch"],
        num_generations=spec["generations"], max_completion_length=cfg.ppo.max_new_tokens,
        max_steps=spec["iterations"], learning_rate=cfg.ppo.actor_lr, beta=0.04, temperature=cfg.ppo.temperature,
        logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True,
        steps_per_generation=1, num_iterations=1, seed=cfg.seed,
        bf16=spec.get("trl_precision", "fp32") == "bf16", fp16=False,
    )  # fmt: skip


def trl_iterations(cfg, work: Path, prepared, spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from rto.models import load_tokenizer

    if spec["threads"] != "default":
        torch.set_num_threads(int(spec["threads"]))
    policy = prepared.model("policy")
    tokenizer = load_tokenizer(policy)
    gt = prepared.ground_truth()

    eos = tokenizer.eos_token_id

    def ground_truth(prompts, completions, completion_ids, **kwargs):
        """The task's ground truth, as rto's driver computes it (a response that ended with EOS is
        terminated)."""
        return [
            gt({"prompt": p}, c[-1]["content"] if isinstance(c, list) else c, bool(ids) and ids[-1] == eos)
            for p, c, ids in zip(prompts, completions, completion_ids, strict=True)
        ]

    meter = IterationMeter()
    seconds: list[float] = []
    lengths: list[float] = []
    probes: list[dict] = []
    iterations = spec["iterations"]

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            meter.begin(state.global_step + 1)
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            seconds.append(time.perf_counter() - self.start)
            meter.end(state.global_step)
            if state.global_step == iterations:
                probes.append({"group": "trl", **probe_worker()})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    prompts = [{"prompt": r["prompt"]} for r in prepared.records("prompts")]
    args = trl_config(cfg, work, spec)
    trainer = GRPOTrainer(
        model=policy, reward_funcs=ground_truth, args=args, train_dataset=Dataset.from_list(prompts),
        processing_class=tokenizer, callbacks=[Timer()],
    )  # fmt: skip
    trainer.train()
    return {
        "iteration_seconds": seconds,
        "response_length": lengths,
        "cpu_iterations": meter.iterations(),
        "compute_processes": probes,
        "tree_processes": meter.processes(range(spec["warmup"] + 1, iterations + 1)),
    }


# ---------------------------------------------------------------------------- the parent


def count_params(path: str, head: str = "causal") -> int:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cls = AutoModelForCausalLM if head == "causal" else AutoModelForSequenceClassification
    model = cls.from_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def parse_threads(value: str) -> int | str:
    if value == "default":
        return value
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError("threads must be >= 1 or 'default'")
    return n


def parse_env(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def worker_env(set_env: dict[str, str], unset: list[str]) -> dict[str, str]:
    """The parent's environment with ``--env`` / ``--unset-env`` applied; benchmarks/ goes on
    PYTHONPATH so that rto's Ray actors can import this module's probe."""
    env = dict(os.environ)
    env.update(set_env)
    for key in unset:
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH), str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def run_one(spec: dict, env: dict, log: Path, timeout: float) -> dict:
    """Run one worker process; its result, or ``{"error": ...}`` with the tail of its log."""
    spec_path = Path(spec["work"]) / "spec.json"
    Path(spec["work"]).mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    out = Path(spec["out"])
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path)],
            env=env, stdout=f, stderr=subprocess.STDOUT, cwd=str(ROOT), start_new_session=True,
        )  # fmt: skip
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(
                proc.pid, signal.SIGKILL
            )  # the worker's own session: it, and Ray's processes it started
            proc.wait()
            code = "timeout"
    if code == 0 and out.is_file():
        return json.loads(out.read_text())
    tail = log.read_text(errors="replace").splitlines()[-15:]
    return {"error": f"worker exited with {code}", "log": str(log), "log_tail": tail}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(QUICKSTART))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument(
        "--threads", nargs="+", type=parse_threads, default=[1, 2],
        help="torch threads of the TRL process and of each rto actor ('default': set none)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each arm, interleaved")
    parser.add_argument(
        "--lr", type=float, default=1e-9,
        help="policy learning rate of every arm (rto's ppo.actor_lr, GRPO's learning_rate); the default "
        "keeps the policy where it starts, so every arm generates responses of the same length and an "
        "iteration is the same work (with the job's 5e-5 rto's RTO reward shortens them within steps "
        "while GRPO's does not); pass the job's own to measure training as it runs",
    )  # fmt: skip
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every rto arm (after the shared ones)",
    )  # fmt: skip
    parser.add_argument(
        "--trl-precision", choices=["fp32", "bf16"], default="fp32",
        help="the TRL arm's precision: float32 as rto computes on a CPU (default), or bf16 autocast, "
        "GRPOConfig's own default (emulated, about 3x slower, on a CPU without bf16 instructions)",
    )  # fmt: skip
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2, help="iterations left out of the figures")
    parser.add_argument("--batch", type=int, default=64, help="samples per iteration")
    parser.add_argument("--generations", type=int, default=8, help="GRPO samples per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--env", action="append", default=[], metavar="KEY=VALUE", help="set in every worker's environment"
    )
    parser.add_argument("--unset-env", action="append", default=[], metavar="KEY", help="remove from it")
    parser.add_argument("--name", default="throughput", help="results file benchmarks/results/NAME.json")
    parser.add_argument("--out", default=None, help="results file (instead of benchmarks/results/NAME.json)")
    parser.add_argument(
        "--work-dir",
        default=None,
        help="keep the prepared models, worker logs and results in a new folder here",
    )
    parser.add_argument("--worker-timeout", type=float, default=1800.0, help="seconds per worker process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker is not None:  # a worker: one repetition of one arm
        spec = (
            json.loads(args.worker)
            if args.worker.lstrip().startswith("{")
            else json.loads(Path(args.worker).read_text())
        )
        result = run_worker(spec)
        Path(spec["out"]).write_text(json.dumps(result, default=str))
        return
    if args.warmup >= args.iterations:
        parser.error("--warmup must be below --iterations")
    if args.batch % args.generations:
        parser.error("--batch must be a multiple of --generations (GRPO's groups)")

    from pipelines.prepare import prepare
    from rto.config import load_config
    from rto.rundir import RunDir

    field = has_actor_threads()
    shared = shared_overrides(args)
    env = worker_env(parse_env(args.env), args.unset_env)
    # every (arm, size, threads) configuration is checked before anything runs
    for arm in args.arms:
        for size in args.sizes:
            for threads in args.threads:
                load_config(args.config, [*SIZES[size], *shared, *arm_overrides(arm, threads, field)])

    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(tempfile.mkdtemp(prefix="throughput-", dir=args.work_dir))
        else:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        (work / "logs").mkdir()
        sizes = {}
        for size in args.sizes:
            cfg = load_config(args.config, [*SIZES[size], *shared])
            base = work / f"base-{size}"
            prepared = prepare(cfg, RunDir(base).create(), log=lambda m: print(m, flush=True))
            sizes[size] = {
                "base": str(base),
                "overrides": list(SIZES[size]),
                "params": count_params(prepared.model("policy")),
                "rm_params": count_params(prepared.model("reward_model"), head="rm"),
            }
            print(
                f"size {size}: policy {sizes[size]['params']:,} parameters (RM/critic {sizes[size]['rm_params']:,})"
            )
        units = [(size, threads, arm) for size in args.sizes for threads in args.threads for arm in args.arms]
        plan = schedule(units, args.repeats)
        reps = []
        for n, (rep, (size, threads, arm)) in enumerate(plan, 1):
            kind = ARMS[arm][0]
            unit_dir = work / f"rep{rep}-{arm}-{size}-t{threads}"
            spec = {
                "arm": arm, "kind": kind, "size": size, "threads": threads, "config": args.config,
                "overrides": [*SIZES[size], *shared, *arm_overrides(arm, threads, field)],
                "base": sizes[size]["base"], "work": str(unit_dir), "out": str(unit_dir / "result.json"),
                "iterations": args.iterations, "warmup": args.warmup, "batch": args.batch,
                "generations": args.generations, "trl_precision": args.trl_precision,
            }  # fmt: skip
            result = run_one(spec, env, work / "logs" / f"{unit_dir.name}.log", args.worker_timeout)
            record = {
                "rep": rep, "arm": arm, "size": size, "params": sizes[size]["params"], "threads": threads,
                "overrides": spec["overrides"] if kind == "rto" else [], **result,
                "precision": (
                    ("bf16 autocast" if args.trl_precision == "bf16" else "float32")
                    if kind == "trl"
                    else load_config(args.config, spec["overrides"]).dtype
                ),
            }  # fmt: skip
            if "error" not in result:
                try:
                    record["summary"] = rep_summary(result, args.warmup, args.batch)
                except ValueError as exc:
                    record["error"] = str(exc)
            s = record.get("summary")
            status = (
                f"{s['samples_per_s']:.1f} samples/s, {s['iteration_seconds']:.2f} s/iter, "
                f"CPU {_fmt(s['cpu_utilisation'])} cores, torch threads {s['torch_threads_used']}"
                if s
                else f"FAILED: {record['error']} {record.get('log_tail', [''])[-1:]}"
            )
            print(f"[{n}/{len(plan)}] rep {rep + 1} {arm} {size} threads={threads}: {status}", flush=True)
            reps.append(record)

    rows = build_rows(reps, args.repeats)
    ratios = build_ratios(rows)
    results = {
        "rows": rows,
        "ratios": ratios,
        "environment": environment(),
        "sizes": {k: {kk: vv for kk, vv in v.items() if kk != "base"} for k, v in sizes.items()},
        "arms": {arm: {"kind": ARMS[arm][0], "overrides": list(ARMS[arm][1])} for arm in args.arms},
        "actor_threads_field": field,
        "worker_env": {"set": parse_env(args.env), "unset": args.unset_env},
        "order": [[rep, arm, size, threads] for rep, (size, threads, arm) in plan],
        "repetitions": reps,
    }
    out = write_results(args.name, vars(args), results, Path(args.out) if args.out else None)
    print()
    print(markdown_table(rows, ratios))
    e = results["environment"]
    print(
        f"\nenvironment: cpu_count {e['cpu_count']}, affinity {e['affinity']}, cgroup quota "
        f"{e['cgroup_cpu_quota']}, torch {e['torch']} (default threads {e['torch_default_threads']}, "
        f"interop {e['torch_default_interop_threads']}), env {e['env']}"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
