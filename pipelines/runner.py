"""Runs a job's stages in order, skipping those whose output exists with a matching config hash."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from pipelines.prepare import prepare
from pipelines.stages import StageContext, stages
from rto.config import Config, dump_config
from rto.errors import UserError
from rto.progress import LOG_FILE, console, library_output, quiet_libraries
from rto.rundir import RunDir, atomic_write_text
from rto.runtime import resolve_device, seed_everything


def stage_hash(cfg: Config, name: str, run: RunDir, prepared_key: str) -> str:

    spec = stages()[name]
    parts = [name, prepared_key, cfg.section_hash(*spec.sections, "seed", "device", "dtype")]
    for upstream in spec.uses:
        record = run.stage_record(upstream)
        parts.append(f"{upstream}={record['hash'] if record else '-'}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_job(cfg: Config, run_dir: str | Path, resume: bool = False, verbose: bool = False) -> dict:
    """Run `cfg.stages` in `run_dir`, holding its lock; returns the run's summary. Library output
    goes to RUN_DIR/rto.log unless `verbose`."""
    quiet_libraries()
    run = RunDir(run_dir)
    run.check_usable()
    with run.lock():
        library_output(run.root / LOG_FILE, verbose)
        return _run_stages(cfg, run.create(), resume)


def _run_stages(cfg: Config, run: RunDir, resume: bool) -> dict:

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
        key = stage_hash(cfg, name, run, prepared.root.name)
        if run.is_done(name, key):
            console.log(f"[green]stage {name}: up to date, skipped[/green] ({run.stage_dir(name)})")
            continue
        seed_everything(cfg.seed)
        tmp = run.temp_stage_dir(name)
        console.rule(f"stage {name}")
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
    return run.read_summary()
