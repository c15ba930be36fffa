"""The run directory (design §7) and the atomic file operations every stage relies on.

    RUN_DIR/config.yaml          resolved job configuration
    RUN_DIR/prepared/<hash>/     tokenizer, data files and base models the stages start from
    RUN_DIR/stages/<stage>/      a finished stage's outputs (+ .rto-stage.json with its config hash)
    RUN_DIR/metrics.jsonl        one JSON object per logged step
    RUN_DIR/traces/              step-NNNNNN.parquet reward traces (ppo)
    RUN_DIR/checkpoints/         resumable ppo checkpoints
    RUN_DIR/summary.json         per-stage summary figures

A stage writes into a temporary folder that is renamed into place only when it has finished, so an
interrupted stage never leaves an output that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

MARKER = ".rto-stage.json"


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older output."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.stages_dir = self.root / "stages"
        self.traces_dir = self.root / "traces"
        self.checkpoints_dir = self.root / "checkpoints"
        self.prepared_dir = self.root / "prepared"
        self.metrics_path = self.root / "metrics.jsonl"
        self.summary_path = self.root / "summary.json"
        self.config_path = self.root / "config.yaml"

    def create(self) -> RunDir:
        for d in (self.root, self.stages_dir):
            d.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------ stages

    def stage_dir(self, name: str) -> Path:
        return self.stages_dir / name

    def stage_record(self, name: str) -> dict | None:
        marker = self.stage_dir(name) / MARKER
        if not marker.is_file():
            return None
        try:
            return json.loads(marker.read_text())
        except (OSError, json.JSONDecodeError):
            return None

    def is_done(self, name: str, config_hash: str | None = None) -> bool:
        record = self.stage_record(name)
        return record is not None and (config_hash is None or record.get("hash") == config_hash)

    def finished_stages(self) -> set[str]:
        """Names of the stages whose output is complete in this run directory (none if it does not exist)."""
        if not self.stages_dir.is_dir():
            return set()
        return {
            p.name for p in self.stages_dir.iterdir() if not p.name.startswith(".") and self.is_done(p.name)
        }

    def temp_stage_dir(self, name: str) -> Path:
        tmp = self.stages_dir / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def finish_stage(self, name: str, tmp: Path, config_hash: str, summary: dict) -> Path:
        record = {"stage": name, "hash": config_hash, "finished": time.time(), "summary": summary}
        atomic_write_json(tmp / MARKER, record)
        final = self.stage_dir(name)
        replace_dir(tmp, final)
        self.update_summary(name, summary)
        return final

    # ------------------------------------------------------------ metrics and summary

    def append_metrics(self, record: dict) -> None:
        line = json.dumps(record, default=_json_default, allow_nan=True) + "\n"
        with open(self.metrics_path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_metrics(self, stage: str | None = None) -> list[dict]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash mid-write
            if stage is None or row.get("stage") == stage:
                rows.append(row)
        return rows

    def truncate_metrics(self, stage: str, after_step: int) -> None:
        """Drop `stage`'s records past `after_step` (work lost with an interrupted run)."""
        if not self.metrics_path.is_file():
            return
        kept = [
            r for r in self.read_metrics() if not (r.get("stage") == stage and r.get("step", 0) > after_step)
        ]
        atomic_write_text(
            self.metrics_path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept)
        )

    def read_summary(self) -> dict:
        if not self.summary_path.is_file():
            return {}
        return json.loads(self.summary_path.read_text())

    def update_summary(self, key: str, value: Any) -> None:
        summary = self.read_summary()
        summary[key] = value
        atomic_write_json(self.summary_path, summary)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
