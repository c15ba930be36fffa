"""Resumable PPO checkpoints.

    RUN_DIR/checkpoints/step-000010/policy/   DeepSpeed checkpoint (weights, optimizer, scheduler)
                                   critic/    (none with a critic-free estimator)
                                   dpo/       (with ppo.dpo_refresh: the refreshed DPO model)
                                   state.json  step, prompts consumed, RNG states, counters, stage hash

A checkpoint is written into `.step-000010.tmp/` and renamed when complete, so the newest folder
named `step-*` is always whole; `state.json` is written last inside it. Every file is flushed to
stable storage (fsync) before the rename, and the driver checks that it sees every file each rank
wrote: with trainable ranks on several nodes the run directory must be storage they all share
(NFS, a cluster file system), and a checkpoint that is not is refused instead of being half there.

Nothing in a checkpoint can run code when it is loaded: `state.json` is plain JSON (the RNG states
as numbers and base64 bytes, checked before use), and the DeepSpeed files are read with
`torch.load(weights_only=True)` (`rto.distributed.trainable.safe_checkpoint_load`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from rto.errors import ClusterError, UserError
from rto.rundir import atomic_write_json, replace_dir

TAG = "ckpt"


def checkpoint_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    dirs = [
        d
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith("step-") and (d / "state.json").is_file()
    ]
    return sorted(dirs, key=lambda d: int(d.name.split("-")[1]))


def checkpoint_step(path: Path) -> int:
    return int(path.name.split("-")[1])


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def rng_state() -> dict:
    """The driver's RNG states as JSON values (no pickle)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
    }


def restore_rng(state: dict, source: str = "state.json") -> None:
    """Set the RNG states written by `rng_state`; anything malformed is a `UserError`."""
    try:
        version, internal, gauss = state["python"]
        kind, keys, pos, has_gauss, cached = state["numpy"]
        torch_bytes = base64.b64decode(state["torch"], validate=True)
        if not (
            isinstance(internal, list) and len(internal) == 625 and all(isinstance(x, int) for x in internal)
        ):
            raise ValueError("python state")
        if kind != "MT19937" or len(keys) != 624:
            raise ValueError("numpy state")
        python_state = (int(version), tuple(internal), None if gauss is None else float(gauss))
        numpy_state = (kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        torch_state = torch.frombuffer(bytearray(torch_bytes), dtype=torch.uint8)
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"unreadable RNG state in the checkpoint ({exc})", source=source, field="rng"
        ) from None


def save(root: Path, step: int, groups, state: dict, keep: int) -> Path:
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for group in groups.trainable():  # policy, critic (none when critic-free), dpo (online refresh)
        written = group.run_all("save_checkpoint", str(tmp / group.name), TAG)
        check_visible(tmp / group.name, group.name, written)
    atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": rng_state()})
    _fsync_dir(tmp)
    replace_dir(tmp, final)
    _fsync_dir(root)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def check_visible(directory: Path, group: str, written: list[dict]) -> None:
    """Every file a rank wrote is visible to the driver, or the run directory is not shared."""
    for rank, answer in enumerate(written):
        missing = [name for name in answer["files"] if not (directory / name).is_file()]
        if missing:
            raise ClusterError(
                f"{group} rank {rank} on node {(answer['node_id'] or 'local')[:8]} ({answer['ip']}) wrote "
                f"{missing[0]} but it is not visible at {directory}: with trainable ranks on several "
                "nodes, the run directory must be on storage every node shares"
            )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(path: Path, groups) -> dict:
    state_file = path / "state.json"
    try:
        state = json.loads(state_file.read_text())
        rng = state.pop("rng")
        int(state["step"])
    except (
        OSError,
        UnicodeDecodeError,
        json.JSONDecodeError,
        KeyError,
        TypeError,
        ValueError,
        AttributeError,
    ) as exc:
        raise UserError(
            f"unreadable checkpoint state ({type(exc).__name__})", source=str(state_file)
        ) from None
    try:
        for group in groups.trainable():
            if not (path / group.name).is_dir():
                raise UserError(
                    f"the checkpoint has no {group.name} state (was it written with other ppo settings, "
                    "e.g. without ppo.dpo_refresh?)",
                    source=str(path),
                )
            group.run_all("load_checkpoint", str(path / group.name), TAG)
    except UserError as exc:  # raised in a worker: Ray's error is also a UserError; keep its one line
        raise UserError(str(exc).splitlines()[-1].removeprefix("rto.errors.UserError: ")) from None
    restore_rng(rng, str(state_file))
    return state


def remove_partial(root: Path) -> None:
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".step-"):
                shutil.rmtree(d, ignore_errors=True)
