"""Trainable worker: a Hugging Face model inside a DeepSpeed engine spread over the group's ranks.

The policy and the critic are the same worker with a different head (``model_kind``) and a
different loss passed to :meth:`TrainableWorker.train_step`. DeepSpeed runs with gloo on CPU and
NCCL on GPU; the optimizer is ``torch.optim.AdamW`` (DeepSpeed's ``torch_adam``: no compiled op).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from rto.distributed.workers import (
    Worker,
    call_with_batch,
    default_device,
    run_scoring_fn,
    weights_checksum,
)
from rto.errors import UserError
from rto.models import ModelKind, disable_dropout, load_model

# A loss function: loss_fn(model, **minibatch) -> loss or (loss, {"metric": float, ...}).
LossFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, dict[str, float]]"]


@dataclasses.dataclass
class EngineConfig:
    """Optimisation settings of one trainable group (mapped onto a DeepSpeed config).

    ``gradient_accumulation_steps`` counts :meth:`TrainableWorker.train_step` calls per optimizer
    step; ``micro_batch_size`` is the per-rank rows of one call (DeepSpeed bookkeeping only).
    Scheduler names are ``transformers.get_scheduler``'s (``constant_with_warmup``, ``linear``,
    ``cosine``, ...); ``total_steps`` counts optimizer steps.
    """

    zero_stage: int = 2
    bf16: bool = False
    lr: float = 1e-6
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    total_steps: int = 1000
    gradient_accumulation_steps: int = 1
    micro_batch_size: int = 1
    gradient_checkpointing: bool = False
    seed: int = 0

    def deepspeed_config(self, world_size: int) -> dict[str, Any]:
        """The DeepSpeed config dictionary for ``world_size`` data-parallel ranks."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        return {
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "train_batch_size": self.micro_batch_size * self.gradient_accumulation_steps * world_size,
            "gradient_clipping": self.grad_clip,
            "zero_optimization": {"stage": self.zero_stage},
            "bf16": {"enabled": self.bf16},
            "optimizer": {
                "type": "AdamW",
                "params": {
                    "lr": self.lr,
                    "betas": list(self.betas),
                    "eps": self.eps,
                    "weight_decay": self.weight_decay,
                    "torch_adam": True,
                },
            },
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }


DEEPSPEED_STATE_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
)
"""The non-tensor types DeepSpeed's ZeRO checkpoints hold (found by loading ZeRO-2 and ZeRO-3
checkpoints with weights_only=True); nothing else is unpickled from a checkpoint."""


def safe_checkpoint_load(path: str, map_location=None):
    """`torch.load(weights_only=True)` with DeepSpeed's own state types allowed (see above)."""
    import pickle

    allowed = []
    for name in DEEPSPEED_STATE_TYPES:
        module, _, attr = name.partition(":")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer types to allow
            continue
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        detail = detail.split(" was not an allowed global")[0].strip()
        raise UserError(
            f"refusing to load a checkpoint file that holds more than tensors and DeepSpeed's state ({detail}); "
            "a run directory from elsewhere can be resumed only if its checkpoints are plain DeepSpeed ones",
            source=path,
        ) from None


def _skip_shm_comm_op() -> None:
    """Stop DeepSpeed from JIT-compiling its CPU shared-memory all-reduce op at ``init_distributed``
    (about a minute with a C++ compiler, a failure without one). DeepSpeed 0.19 uses it only for
    ``inference_all_reduce`` (tensor-parallel inference), never for ZeRO training, and falls back to
    the process group's all-reduce when the op is absent."""
    # import_module, not "import deepspeed.comm.torch as m": deepspeed.comm re-exports the torch
    # package under the name "torch", which that statement would return instead of the submodule.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


class TrainableWorker(Worker):
    """One rank of a trainable group (policy: ``causal_lm``; critic: ``token_classification``,
    which also loads a reward model's folder). Build it, then ``setup(master_addr, master_port)``
    (the :class:`ActorGroup` does both); every rank must then make the same collective calls
    (``train_step``, ``state_dict_for_broadcast``, checkpoints) in the same order.

    Args:
        model_path: Hugging Face folder to start from.
        config: :class:`EngineConfig` (or a dict of its fields).
        model_kind: head to load (see :func:`rto.models.load_model`).
    """

    def __init__(
        self,
        model_path: str,
        config: EngineConfig | dict[str, Any] | None = None,
        model_kind: ModelKind = "causal_lm",
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(rank, world_size, num_threads)
        self.model_path = model_path
        self.model_kind = model_kind
        self.config = config if isinstance(config, EngineConfig) else EngineConfig(**(config or {}))
        self.engine = None

    def setup(self, master_addr: str = "127.0.0.1", master_port: int | None = None) -> None:
        """Join the process group (gloo on CPU, NCCL on GPU) and build the DeepSpeed engine."""
        import deepspeed
        import transformers

        super().setup(master_addr, master_port)
        self.device = default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            _skip_shm_comm_op()
        deepspeed.init_distributed(
            dist_backend="nccl" if self.device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            verbose=False,
            rank=self.rank,
            world_size=self.world_size,
        )
        transformers.set_seed(self.config.seed)
        model = load_model(self.model_path, self.model_kind, torch.float32)
        # PPO compares this model's training forward with its scoring forward (ratio, value clip):
        # they must compute the same thing, so no dropout (GPT-2/OPT configs have it; so does
        # transformers' token-classification value head, 0.1 unless the config says otherwise)
        disable_dropout(model)
        if self.config.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        cfg = self.config
        self.engine, *_ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=cfg.deepspeed_config(self.world_size),
            lr_scheduler=lambda optimizer: transformers.get_scheduler(
                cfg.scheduler,
                optimizer,
                num_warmup_steps=cfg.warmup_steps,
                num_training_steps=cfg.total_steps,
            ),
        )

    @property
    def model(self) -> torch.nn.Module:
        """The wrapped Hugging Face model (``engine.module``)."""
        if self.engine is None:
            raise RuntimeError("TrainableWorker.setup() has not been called")
        return self.engine.module

    def train_step(self, minibatch: dict[str, Any], loss_fn: LossFn | str) -> dict[str, float]:
        """One forward/backward on this rank's ``minibatch`` and a DeepSpeed ``step()`` (the optimizer
        steps at gradient-accumulation boundaries; gradients are averaged over ranks).

        ``loss_fn(model, **minibatch)`` returns the loss, or ``(loss, metrics)``; it is a callable or
        ``"module:function"`` and gets only the minibatch entries it names (see ``call_with_batch``);
        ``model`` is the DeepSpeed engine, which forwards like the Hugging Face model. Returns ``{"loss", "lr", "grad_norm"?, **metrics}`` for this rank.
        """
        self.engine.train()
        batch = {
            k: v.to(self.engine.device) if isinstance(v, torch.Tensor) else v for k, v in minibatch.items()
        }
        out = call_with_batch(loss_fn, self.engine, batch)  # the engine forwards to the model
        loss, metrics = out if isinstance(out, tuple) else (out, {})
        self.engine.backward(loss)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.engine.step()
        result = {"loss": float(loss.detach()), "lr": float(self.engine.get_lr()[0]), **metrics}
        grad_norm = self.engine.get_global_grad_norm() if boundary else None
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        return result

    def score(self, batch: dict[str, Any], fn: Callable | str, **kwargs: Any) -> Any:
        """``fn(model, **batch, **kwargs)`` without gradients (policy log-probs, critic values)."""
        return run_scoring_fn(self.engine.module, fn, batch, self.engine.device, **kwargs)

    def state_dict_for_broadcast(self) -> dict[str, torch.Tensor] | None:
        """Full weights as CPU tensors on rank 0, ``None`` on the others. Collective (ZeRO-3 gathers
        the partitioned parameters), so call it on every rank."""
        if self.config.zero_stage == 3:
            import deepspeed

            params = list(self.model.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                state = (
                    {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
                    if self.rank == 0
                    else None
                )
            return state
        if self.rank != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def broadcast_weights_ref(self) -> Any:
        """:meth:`state_dict_for_broadcast`, stored once in Ray's object store by rank 0. Returns
        ``[ObjectRef]`` on rank 0 (wrapped so Ray hands back the reference, not the value) and
        ``None`` on the other ranks. Collective."""
        import ray

        state = self.state_dict_for_broadcast()
        return [ray.put(state)] if state is not None else None

    def save_checkpoint(
        self, directory: str, tag: str, client_state: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """DeepSpeed checkpoint (weights, optimizer and scheduler states) under ``directory/tag``,
        plus ``client_state`` (e.g. the PPO step). Collective; ranks must share the filesystem.

        Every file is flushed to stable storage before this returns; the answer lists the files
        this rank sees under ``directory`` (relative paths) and where it runs, so the caller can
        check that the storage is shared."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state or {})
        files = sorted(str(p.relative_to(directory)) for p in Path(directory).rglob("*") if p.is_file())
        for name in files:
            with open(Path(directory) / name, "rb") as handle:
                os.fsync(handle.fileno())
        return {"files": files, **self.where()}

    def load_checkpoint(self, directory: str, tag: str) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote; returns its ``client_state``. Collective.

        Every file is read with ``torch.load(weights_only=True)``, allowing only tensors, plain
        containers and the few state types DeepSpeed itself stores (`DEEPSPEED_STATE_TYPES`):
        a checkpoint from elsewhere cannot run code here (DeepSpeed's own loader would unpickle
        anything). Anything else is a `UserError` naming the file and the type."""
        self.engine.checkpoint_engine.load = safe_checkpoint_load
        path, client_state = self.engine.load_checkpoint(
            directory, tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {directory}")
        return client_state or {}

    def save_hf(self, directory: str) -> None:
        """``save_pretrained`` of the full model on rank 0 (collective under ZeRO-3)."""
        state = self.state_dict_for_broadcast()
        if self.rank == 0:
            self.model.save_pretrained(directory, state_dict=state)

    def training_state(self) -> dict[str, Any]:
        """Counters for tests and logs: ``global_steps`` (optimizer steps), ``optimizer_step`` (Adam's
        own step count), ``lr``."""
        optimizer = self.engine.optimizer
        while hasattr(optimizer, "optimizer"):  # unwrap DeepSpeed's ZeRO/fp16 wrappers
            optimizer = optimizer.optimizer
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        return {
            "global_steps": int(self.engine.global_steps),
            "optimizer_step": int(max(steps)) if steps else 0,
            "lr": float(self.engine.get_lr()[0]),
        }

    def weights_checksum(self) -> str:
        """See :func:`rto.distributed.workers.weights_checksum` (this rank's full replica; ZeRO-3
        holds only partitions, so use :meth:`state_dict_for_broadcast` there)."""
        return weights_checksum(self.model)


class TrainableScorer(TrainableWorker):
    """A trainable model that also scores like a
    :class:`~rto.distributed.workers.FrozenModelWorker`: ``score(batch, **kwargs)`` runs the
    constructor's ``scoring_fn``. The DPO model of an online refresh (``ppo.dpo_refresh``) is one:
    it scores every step's rollouts and takes a DPO update on some of them.

    ``dtype`` is accepted for the frozen worker's signature and not used: the engine trains in
    float32 (bf16 mixed precision with ``config.bf16``)."""

    def __init__(
        self,
        model_path: str,
        config: EngineConfig | dict[str, Any] | None = None,
        model_kind: ModelKind = "causal_lm",
        scoring_fn: Callable | str | None = None,
        dtype: Any = None,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int | None = 1,
    ) -> None:
        super().__init__(model_path, config, model_kind, rank, world_size, num_threads)
        self.scoring_fn = scoring_fn

    def score(self, batch: dict[str, Any], fn: Callable | str | None = None, **kwargs: Any) -> Any:
        """``fn`` (default: the constructor's ``scoring_fn``) on ``batch``, without gradients."""
        fn = fn or self.scoring_fn
        if fn is None:
            raise ValueError("no scoring function: pass fn= or construct the worker with scoring_fn=")
        return super().score(batch, fn, **kwargs)
