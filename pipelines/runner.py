"""Runs a job's stages in order, skipping those whose output exists with a matching config hash.

Where the process has a core to spare (one torch thread on two cores, the quickstart's setting, and
no other process keeping it busy: `pipelines.training.spare_cores`), a later stage whose inputs
are all ready (`StageSpec.needs_of`: the `rm` stage from its base model) starts beside the running
one, in a niced child process that takes the idle core; at its turn the runner takes its output,
figures and metrics, in the order a sequential run would have them. It runs the stage function it
would run itself, seeded the same way: the same model and figures. Should the child fail, the
stage runs in this process at its turn instead.

Likewise, while the last stage before `ppo` runs, a local Ray instance for `ppo` starts on a second
thread (`RayWarmUp`): its processes start while that stage trains, not on the critical path.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pipelines.prepare import Prepared, prepare
from pipelines.stages import StageContext, stages
from rto.config import Config, dump_config
from rto.errors import UserError
from rto.progress import LOG_FILE, console, library_output, quiet_libraries
from rto.rundir import RunDir, atomic_write_text
from rto.runtime import resolve_device, seed_everything


def stage_hash(
    cfg: Config, name: str, run: RunDir, prepared_key: str, upstream: dict[str, str] | None = None
) -> str:
    """The stage's cache key: its settings and the keys of the stages it uses (their records', or
    `upstream`'s where given: the keys they will have once they have run)."""

    spec = stages()[name]
    parts = [name, prepared_key, cfg.section_hash(*spec.sections, "seed", "device", "dtype")]
    if spec.revision:
        parts.append(f"revision={spec.revision}")
    for used in spec.uses:
        if upstream is not None and used in upstream:
            parts.append(f"{used}={upstream[used]}")
            continue
        record = run.stage_record(used)
        parts.append(f"{used}={record['hash'] if record else '-'}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def planned_hashes(cfg: Config, run: RunDir, prepared_key: str) -> dict[str, str]:
    """Each of the job's stages' key as it will be at its turn (after the stages before it ran)."""
    planned: dict[str, str] = {}
    for name in cfg.stages:
        planned[name] = stage_hash(cfg, name, run, prepared_key, planned)
    return planned


def run_job(cfg: Config, run_dir: str | Path, resume: bool = False, verbose: bool = False) -> dict:
    """Run `cfg.stages` in `run_dir`, holding its lock; returns the run's summary. Library output
    goes to RUN_DIR/rto.log unless `verbose`."""
    quiet_libraries()
    run = RunDir(run_dir)
    run.check_usable()
    with run.lock():
        library_output(run.root / LOG_FILE, verbose)
        return _run_stages(cfg, run.create(), resume, verbose)


def _run_stages(cfg: Config, run: RunDir, resume: bool, verbose: bool = False) -> dict:

    device = resolve_device(cfg.device)
    if cfg.resources.torch_threads:
        import torch

        torch.set_num_threads(cfg.resources.torch_threads)
    prepared = prepare(cfg, run, log=console.log)
    if resume and not any(run.checkpoints_dir.glob("ppo-*/step-*/state.json")):
        console.log(
            f"[yellow]--resume: nothing to resume in {run.root} (no ppo checkpoint); "
            "the stages run as they would without it[/yellow]"
        )
    # the run is accepted (its data and models are ready): only now does its config replace the record
    atomic_write_text(run.config_path, dump_config(cfg))
    for name in cfg.stages:
        if name not in stages():
            raise UserError(
                f"stage '{name}' is not available in this install",
                source=str(run.config_path),
                field="stages",
            )
    beside: dict[str, Beside] = {}
    warm_up: RayWarmUp | None = None
    try:
        for name in cfg.stages:
            key = stage_hash(cfg, name, run, prepared.root.name)
            if run.is_done(name, key):
                console.log(f"[green]stage {name}: up to date, skipped[/green] ({run.stage_dir(name)})")
                continue
            console.rule(f"stage {name}")
            done = beside.pop(name).take(run, key) if name in beside else None
            if done is not None:
                continue
            if not beside:
                _start_beside(cfg, run, prepared, name, device, resume, verbose, beside)
            if warm_up is not None and name == "ppo":
                warm_up.join(run)
            elif warm_up is None and ray_warm_up_due(cfg, name, _to_run(cfg, run, prepared), set(beside)):
                warm_up = RayWarmUp.start(cfg, name)
            seed_everything(cfg.stage_seed(name))
            tmp = run.temp_stage_dir(name)
            started = time.time()
            ctx = StageContext(
                name=name,
                cfg=cfg,
                run=run,
                out_dir=tmp,
                prepared=prepared,
                resume=resume,
                device=device,
                log=console.log,
                extras={"stage_hash": key},
            )
            summary = stages()[name].run(ctx) or {}
            summary["seconds"] = round(time.time() - started, 1)
            run.finish_stage(name, tmp, key, summary)
            console.log(f"[green]stage {name}: done in {summary['seconds']} s[/green]")
    finally:
        for other in beside.values():  # an error or interrupt before their turn
            other.stop()
        if warm_up is not None:
            warm_up.started.wait()  # never leave Ray half started (it is shut down at exit)
    return run.read_summary()


# ---------------------------------------------------------------- Ray, started before its stage


def _to_run(cfg: Config, run: RunDir, prepared: Prepared) -> set[str]:
    """The job's stages that will run (not up to date at their turn)."""
    planned = planned_hashes(cfg, run, prepared.root.name)
    return {n for n in cfg.stages if not run.is_done(n, planned[n])}


def ray_warm_up_due(cfg: Config, current: str, to_run: set[str], beside: set[str]) -> bool:
    """Whether to start Ray while `current` runs: `ppo` will run and start a local Ray instance (no
    `resources.ray_address`: a cluster is already up), and no stage runs in this process between
    `current` and it (each stage between is up to date or running beside)."""
    if cfg.resources.ray_address is not None or "ppo" not in to_run or current not in cfg.stages:
        return False
    here, ppo = cfg.stages.index(current), cfg.stages.index("ppo")
    return here < ppo and all(n not in to_run or n in beside for n in cfg.stages[here + 1 : ppo])


@dataclass
class RayWarmUp:
    """`rto.distributed.init_ray` as the ppo stage calls it, on a thread while an earlier stage
    runs: Ray's processes (GCS, raylet, idle workers) start on the core that stage leaves; at its
    turn the ppo stage finds Ray running. Should it fail, the ppo stage starts Ray itself (and
    reports what fails).

    The thread then waits, idle, until the process ends: Ray's GCS and raylet are started with the
    parent-death signal (PR_SET_PDEATHSIG), which Linux sends when the *thread* that started them
    ends, so that thread must outlive them."""

    alongside: str
    started: object  # threading.Event: set once Ray is up (or failed to start)
    error: list

    @classmethod
    def start(cls, cfg: Config, alongside: str) -> RayWarmUp:
        import threading

        started, error = threading.Event(), []

        def start_ray() -> None:
            from rto.distributed import init_ray  # deferred: Ray and torch (start-up of rto validate)

            try:
                init_ray(None, cfg.resources.num_cpus)
            except BaseException as exc:  # noqa: BLE001 - the ppo stage tries again and reports it
                error.append(exc)
            finally:
                started.set()
            threading.Event().wait()  # the processes Ray started die with this thread

        if threading.current_thread() is threading.main_thread():
            import signal
            import sys

            # what ray.init installs when called on the main thread: SIGTERM ends the process through
            # its exit handlers (Ray's shutdown among them)
            signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(signum))
        threading.Thread(target=start_ray, daemon=True, name="rto-ray-warm-up").start()
        console.log(f"ray: starting beside {alongside}, for the ppo stage")
        return cls(alongside, started, error)

    def join(self, run: RunDir) -> None:
        self.started.wait()
        if self.error:
            with open(run.root / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(f"starting Ray beside {self.alongside} failed: {self.error[0]!r}\n")


# ---------------------------------------------------------------- a stage beside the running one


def _start_beside(
    cfg: Config,
    run: RunDir,
    prepared: Prepared,
    current: str,
    device: str,
    resume: bool,
    verbose: bool,
    beside: dict[str, Beside],
) -> None:
    """Start the first later stage whose inputs are ready in a child process, if there is a core
    for it: a CPU job whose torch threads leave one free (`pipelines.training.spare_cores`)."""
    from pipelines.training import spare_cores  # deferred: it imports transformers (start-up of rto validate)

    if device != "cpu" or not spare_cores():
        return
    planned = planned_hashes(cfg, run, prepared.root.name)
    later = cfg.stages[cfg.stages.index(current) + 1 :]
    to_run = {current} | {n for n in later if not run.is_done(n, planned[n])}

    def ready(n: str) -> bool:  # finished for good before this job's remaining stages run
        return n not in to_run and run.is_done(n, planned.get(n))

    for name in later:
        if name in to_run and all(ready(n) for n in stages()[name].needs_of(cfg)):
            beside[name] = Beside.start(
                cfg, run, prepared, name, current, planned[name], device, resume, verbose
            )
            console.log(f"stage {name}: started beside {current}, on the spare core")
            return


@dataclass
class Beside:
    """A stage running in a child process (`_child`) while this one runs another."""

    name: str
    alongside: str
    tmp: Path
    key: str
    process: object
    conn: object
    started: float

    @classmethod
    def start(
        cls,
        cfg: Config,
        run: RunDir,
        prepared: Prepared,
        name: str,
        alongside: str,
        key: str,
        device: str,
        resume: bool,
        verbose: bool,
    ) -> Beside:
        import multiprocessing

        import torch

        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked threads or locks
        receive, send = context.Pipe(duplex=False)
        tmp = run.temp_stage_dir(name)
        job = {
            "cfg": cfg,
            "run": str(run.root),
            "prepared": prepared,
            "name": name,
            "out_dir": str(tmp),
            "key": key,
            "device": device,
            "resume": resume,
            "verbose": verbose,
            "threads": torch.get_num_threads(),
        }
        process = context.Process(target=_child, args=(job, send), name=f"rto-stage-{name}", daemon=True)
        process.start()
        send.close()
        return cls(name, alongside, tmp, key, process, receive, time.time())

    def take(self, run: RunDir, key: str) -> dict | None:
        """At the stage's turn: its summary, its output finished in the run directory and its
        metrics appended, or None (the child failed, or ran with other settings) to run it here."""
        import shutil

        if self.process.is_alive() and not self.conn.poll():
            console.log(f"stage {self.name}: waiting for it (beside {self.alongside} since {self._since()})")
            _set_nice(self.process.pid, os.getpid(), 0)  # nothing runs here now: it is the critical path
        try:
            result = self.conn.recv()
        except (EOFError, OSError):
            result = {"error": f"the process ended with exit code {self.process.exitcode}"}
        self.process.join()
        if key != self.key:  # an earlier stage's output changed its key after all
            result = {"error": "its inputs changed while it ran"}
        if "error" in result:
            with open(run.root / LOG_FILE, "a", encoding="utf-8") as log:  # the whole story for the log
                log.write(f"stage {self.name} beside {self.alongside}: {result['error']}\n")
            console.log(
                f"[yellow]stage {self.name}: did not finish beside {self.alongside} "
                f"({result['error'].strip().splitlines()[-1]}); running it here[/yellow]"
            )
            shutil.rmtree(self.tmp, ignore_errors=True)
            return None
        for line in result["log"]:
            console.log(line)
        for record in result["metrics"]:
            run.append_metrics(record)
        summary = result["summary"]
        run.finish_stage(self.name, self.tmp, key, summary)
        console.log(
            f"[green]stage {self.name}: done in {summary['seconds']} s (beside {self.alongside})[/green]"
        )
        return summary

    def stop(self) -> None:
        import shutil

        if self.process.is_alive():
            self.process.terminate()
        self.process.join()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _since(self) -> str:
        return f"{time.time() - self.started:.0f} s"


def _child(job: dict, send) -> None:
    """The child process of `Beside`: runs one stage as `_run_stages` would (same threads, same
    seed), its library output to the run's log, its console lines and metrics sent back."""
    import sys
    import traceback

    _set_nice(os.getpid(), os.getppid(), BESIDE_NICE)  # idle CPU only: the runner's stage goes first
    _exit_with(os.getppid())
    log: list[str] = []
    metrics: list[dict] = []
    try:
        root = Path(job["run"])
        library_output(root / LOG_FILE, job["verbose"])
        if not job["verbose"]:  # what writes to the terminal directly goes to the log, as in the parent
            log_file = open(root / LOG_FILE, "a", encoding="utf-8")  # noqa: SIM115 (open for the process)
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(log_file.fileno(), 1)
            os.dup2(log_file.fileno(), 2)
        console.quiet = True  # its progress bar would draw over the parent's
        import torch

        torch.set_num_threads(job["threads"])
        cfg = job["cfg"]
        resolve_device(job["device"])
        seed_everything(cfg.stage_seed(job["name"]))
        started = time.time()
        ctx = StageContext(
            name=job["name"],
            cfg=cfg,
            run=RunDir(root),
            out_dir=Path(job["out_dir"]),
            prepared=job["prepared"],
            resume=job["resume"],
            device=job["device"],
            log=lambda message: log.append(str(message)),
            extras={"stage_hash": job["key"]},
            metrics_to=metrics.append,
        )
        summary = stages()[job["name"]].run(ctx) or {}
        summary["seconds"] = round(time.time() - started, 1)
        send.send({"summary": summary, "log": log, "metrics": metrics})
    except BaseException:
        send.send({"error": traceback.format_exc()})
    finally:
        send.close()


BESIDE_NICE = 10
"""Niceness a stage running beside another adds to the runner's: it takes what the cores leave
idle, and gives way to the runner's stage (the critical path) and to other processes."""


def _set_nice(pid: int, runner: int, extra: int) -> None:
    """Make process `pid` `extra` nicer than process `runner`, where the system lets us (raising a
    priority back needs the right to)."""
    try:
        os.setpriority(os.PRIO_PROCESS, pid, min(19, os.getpriority(os.PRIO_PROCESS, runner) + extra))
    except (AttributeError, OSError):  # not Unix, or not allowed
        pass


def _exit_with(parent: int) -> None:
    """End this process when its parent is gone (killed before it could stop this one)."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="rto-parent-watch").start()
