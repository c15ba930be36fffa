"""Resumable PPO checkpoints.

    RUN_DIR/checkpoints/step-000010/policy/   DeepSpeed checkpoint (weights, optimizer, scheduler)
                                   critic/
                                   state.json  step, prompts consumed, RNG states, counters, stage hash

A checkpoint is written into `.step-000010.tmp/` and renamed when complete, so the newest folder
named `step-*` is always whole; `state.json` is written last inside it.
"""

from __future__ import annotations

import base64
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

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


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def rng_state() -> str:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    return base64.b64encode(pickle.dumps(state)).decode()


def restore_rng(blob: str) -> None:
    state = pickle.loads(base64.b64decode(blob))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save(root: Path, step: int, groups, state: dict, keep: int) -> Path:
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups.policy.run_all("save_checkpoint", str(tmp / "policy"), TAG)
    groups.critic.run_all("save_checkpoint", str(tmp / "critic"), TAG)
    atomic_write_json(tmp / "state.json", {**state, "step": step, "rng": rng_state()})
    replace_dir(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load(path: Path, groups) -> dict:
    import json

    groups.policy.run_all("load_checkpoint", str(path / "policy"), TAG)
    groups.critic.run_all("load_checkpoint", str(path / "critic"), TAG)
    state = json.loads((path / "state.json").read_text())
    restore_rng(state.pop("rng"))
    return state


def remove_partial(root: Path) -> None:
    if root.is_dir():
        for d in root.iterdir():
            if d.name.startswith(".step-"):
                shutil.rmtree(d, ignore_errors=True)
