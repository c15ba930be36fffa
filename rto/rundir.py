"""The run directory (docs/design.md, "The contract") and the atomic file operations every stage relies on.

    RUN_DIR/config.yaml          resolved job configuration
    RUN_DIR/prepared/<hash>/     tokenizer, data files and base models the stages start from
    RUN_DIR/stages/<stage>/      a finished stage's outputs (+ .rto-stage.json with its config hash)
    RUN_DIR/metrics.jsonl        one JSON object per logged step
    RUN_DIR/traces/              step-NNNNNN.parquet reward traces (ppo)
    RUN_DIR/checkpoints/         resumable ppo checkpoints
    RUN_DIR/summary.json         per-stage summary figures
    RUN_DIR/.rto-lock            held (flock) by the one run using the directory; holds its PID

A stage writes into a temporary folder that is renamed into place only when it has finished, so an
interrupted stage never leaves an output that looks complete. Temporary names are unique per writer
(PID and a random part), and one run at a time holds the directory's lock (`RunDir.lock`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rto.errors import UserError

MARKER = ".rto-stage.json"
LOCK_FILE = ".rto-lock"
RUN_ENTRIES = {
    "config.yaml", "prepared", "stages", "metrics.jsonl", "traces", "checkpoints", "summary.json",
    "tensorboard", "archive", "scores", "rto.log", LOCK_FILE,
}  # fmt: skip
"""What a run writes into its directory (anything else there means it is someone else's folder)."""


def unique_suffix() -> str:
    """A temporary name's suffix no other writer (process or call) uses."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder (fsync, then rename), so
    readers see the old or the new file, never part of one; the temporary file never outlives an
    error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{unique_suffix()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def check_output_file(path: Path, field: str) -> Path:
    """An output file the command can write, checked before any work: not a directory, not under a
    file, in a writable folder (created if missing)."""
    path = Path(path)
    if str(path).strip() in ("", "."):
        raise UserError("is empty; give a file name", field=field)
    if path.is_dir():
        raise UserError("is a directory; give a file name", source=str(path), field=field)
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"lies under the file {parent}", source=str(path), field=field)
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UserError(f"{parent} is not writable", source=str(path), field=field)
            break
    if path.exists() and not os.access(path, os.W_OK):
        raise UserError("is not writable", source=str(path), field=field)
    return path


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished temporary folder into place, replacing an older output."""
    old = final.with_name(f".{final.name}.old-{unique_suffix()}")
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

    def check_usable(self, field: str = "--run-dir") -> None:
        """Refuse a path that cannot hold a run, or a folder that is not a run's (it holds files
        no run writes: `--run-dir .` in a project would overwrite its config.yaml)."""
        where = str(self.root)
        for parent in [self.root, *self.root.parents]:
            if parent.exists():
                if not parent.is_dir():
                    what = "is a file" if parent == self.root else f"lies under the file {parent}"
                    raise UserError(f"{what}, not a run directory", source=where, field=field)
                if not os.access(parent, os.W_OK | os.X_OK):
                    raise UserError(f"{parent} is not writable", source=where, field=field)
                break
        if self.root.is_dir():
            foreign = sorted(
                p.name
                for p in self.root.iterdir()
                if p.name not in RUN_ENTRIES and not p.name.startswith(".")
            )
            if foreign:
                shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
                raise UserError(
                    f"not a run directory: it holds files no run writes ({shown}); give an empty or new directory",
                    source=where,
                    field=field,
                )

    @contextlib.contextmanager
    def lock(self, field: str = "--run-dir") -> Iterator[RunDir]:
        """Hold the directory's lock while a run uses it; a second run gets a `UserError` naming the
        holder's PID. The lock is an flock: it dies with its holder, however that ends."""
        import fcntl

        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / LOCK_FILE, "a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise UserError(
                    f"another rto run is using this run directory (PID {holder}); wait for it or use another",
                    source=str(self.root),
                    field=field,
                ) from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            self.remove_stale_temp()
            yield self
        finally:
            handle.close()

    def remove_stale_temp(self) -> None:
        """Delete what killed writers left (temporary stage and prepared folders); call it only
        while holding the lock, when no other writer can be at work."""
        for folder in (self.stages_dir, self.prepared_dir):
            if folder.is_dir():
                for entry in folder.iterdir():
                    if entry.name.startswith(".") and (".tmp" in entry.name or ".old-" in entry.name):
                        shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(
                            missing_ok=True
                        )

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
        tmp = self.stages_dir / f".{name}.tmp-{unique_suffix()}"
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
        for raw in self.metrics_path.read_bytes().splitlines():
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                continue  # a line cut by a crash mid-write (or damaged): not a record
            if not isinstance(row, dict):
                continue
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
        """The per-stage figures; a corrupt summary.json (a crash mid-write, a bad edit) is rebuilt
        from the finished stages' own records and written back where the directory allows."""
        if not self.summary_path.is_file():
            return {}
        try:
            summary = json.loads(self.summary_path.read_text())
            if isinstance(summary, dict):
                return summary
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            pass
        rebuilt = {
            name: (self.stage_record(name) or {}).get("summary", {})
            for name in sorted(self.finished_stages())
        }
        with contextlib.suppress(OSError):
            atomic_write_json(self.summary_path, rebuilt)
        return rebuilt

    def update_summary(self, key: str, value: Any) -> None:
        summary = self.read_summary()
        summary[key] = value
        atomic_write_json(self.summary_path, summary)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)
