"""Worker bases: plain Python classes that :class:`rto.distributed.groups.ActorGroup` turns into Ray
actors. They are usable without Ray (construct, then call ``setup()``), which is how unit tests use
them. What they compute comes from pure functions passed in (scoring functions, losses, a generate
function); the workers only hold the model and run those functions on their slice of the batch.

A "function" argument is a callable or an import path ``"package.module:function"`` (import paths are
resolved lazily inside the worker, so e.g. ``rto.forward`` is only imported where it runs). It is
called as ``fn(model, **batch, **kwargs)`` with only the batch entries its signature names (all of
them if it takes ``**kwargs``), so one experience dict can feed scorers that each need a few keys.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
import socket
from collections.abc import Callable
from typing import Any

import torch

from rto.models import ModelKind, load_model


def resolve_function(fn: Callable | str) -> Callable:
    """Return ``fn`` itself, or import ``"package.module:function"``."""
    if callable(fn):
        return fn
    module_name, sep, attr = fn.partition(":")
    if not sep:
        raise ValueError(f"expected a callable or 'package.module:function', got {fn!r}")
    return getattr(importlib.import_module(module_name), attr)


def call_with_batch(fn: Callable | str, model: Any, batch: dict[str, Any], **kwargs: Any) -> Any:
    """``fn(model, **batch, **kwargs)``, passing only the batch entries that ``fn`` accepts."""
    fn = resolve_function(fn)
    params = inspect.signature(fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        batch = {k: v for k, v in batch.items() if k in params}
    return fn(model, **batch, **kwargs)


def weights_checksum(model: torch.nn.Module) -> str:
    """SHA-256 of all parameters and buffers of ``model`` (names sorted, fp32 bytes): equal models
    give equal checksums, whatever process they live in."""
    return state_dict_checksum(model.state_dict())


def state_dict_checksum(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict (names sorted, values as contiguous fp32 CPU bytes)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        digest.update(name.encode())
        digest.update(state_dict[name].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def default_device() -> torch.device:
    """The worker's device: the first visible GPU (Ray restricts CUDA_VISIBLE_DEVICES per actor) or
    the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


class Worker:
    """Base of every worker: knows its rank and world size, limits torch threads, runs functions.

    Args:
        rank: this worker's rank in its group (the group passes it).
        world_size: number of ranks in the group.
        num_threads: torch intra-op threads (1 per actor on a small machine).
    """

    def __init__(self, rank: int = 0, world_size: int = 1, num_threads: int | None = 1) -> None:
        self.rank = rank
        self.world_size = world_size
        if num_threads:
            torch.set_num_threads(num_threads)
        self.master_addr: str | None = None
        self.master_port: int | None = None

    def node_ip(self) -> str:
        """The IP address of the node this worker runs on (``127.0.0.1`` outside Ray)."""
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    def where(self) -> dict[str, Any]:
        """Where this worker runs: its Ray node id, the node's IP address and the process id (also
        the group's health check: a lost worker does not answer)."""
        import ray

        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        return {"node_id": node_id, "ip": self.node_ip(), "pid": os.getpid()}

    def master_address(self) -> tuple[str, int]:
        """This node's IP address and a free TCP port on it (rank 0 answers this for the group)."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            return self.node_ip(), sock.getsockname()[1]

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        """Record the rendezvous address and set the torch.distributed environment variables
        (MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE/LOCAL_RANK). Subclasses that need a process group
        extend this; the group calls it on every rank right after construction."""
        if master_port is None:
            master_addr, master_port = "127.0.0.1", self.master_address()[1]
        self.master_addr, self.master_port = master_addr, master_port
        os.environ.update(
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_RANK="0",  # Ray gives each actor its own CUDA_VISIBLE_DEVICES; device 0 is ours
        )

    def peak_rss_mb(self) -> float:
        """This worker process's peak resident memory so far, in MiB (Linux's ru_maxrss)."""
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def call(self, fn: Callable | str, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(self, *args, **kwargs)`` in the worker (an escape hatch for one-off inspection)."""
        return resolve_function(fn)(self, *args, **kwargs)


def run_scoring_fn(
    model: torch.nn.Module, fn: Callable | str, batch: dict[str, Any], device: torch.device, **kwargs: Any
) -> Any:
    """``fn(model, **batch, **kwargs)`` under ``torch.no_grad`` with tensors moved to ``device`` and
    the result moved back to the CPU."""
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = call_with_batch(fn, model, batch, **kwargs)
    model.train(was_training)
    return _to_cpu(out)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class FrozenModelWorker(Worker):
    """Holds a frozen HF model (reference, DPO, reward model) and scores batches with it.

    Args:
        model_path: a Hugging Face model folder.
        model_kind: ``causal_lm`` (ref/dpo log-probs) or ``sequence_classification`` (reward model).
        scoring_fn: default function for :meth:`score`, called as
            ``scoring_fn(model, **batch, **kwargs)``; e.g. ``"rto.forward:response_logprobs"``.
        dtype: model dtype (``"bfloat16"`` on GPU).
    """

    def __init__(
        self,
        model_path: str,
        model_kind: ModelKind = "causal_lm",
        scoring_fn: Callable | str | None = None,
        dtype: torch.dtype | str = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(rank, world_size, num_threads)
        self.device = default_device()
        self.model = load_model(model_path, model_kind, dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.scoring_fn = scoring_fn

    def score(self, batch: dict[str, Any], fn: Callable | str | None = None, **kwargs: Any) -> Any:
        """Run ``fn`` (default: the constructor's ``scoring_fn``) on ``batch``; CPU results."""
        fn = fn or self.scoring_fn
        if fn is None:
            raise ValueError("no scoring function: pass fn= or construct the worker with scoring_fn=")
        return run_scoring_fn(self.model, fn, batch, self.device, **kwargs)

    def weights_checksum(self) -> str:
        """See :func:`weights_checksum`."""
        return weights_checksum(self.model)
