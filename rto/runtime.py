"""Device, dtype and seeding decisions shared by every stage."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from rto.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> str:
    """The device a job runs on; on the CPU, DeepSpeed is told so (`DS_ACCELERATOR`, unless set)
    instead of detecting it and warning about it in every process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no GPU is visible", field="device")
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return device


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
