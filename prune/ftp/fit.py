"""The whole FTP recipe for one frozen model: search a schedule with the static router, train the
router on it, search again with the trained router. Used by the `ftp` stage and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from prune.ftp.config import FTPConfig
from prune.ftp.generate import calibrate_decode_thresholds
from prune.ftp.router import Router, check_supported
from prune.ftp.scheduler import dense_logits, schedule_kl, search_schedule, uniform_schedule
from prune.ftp.train import train_router


@dataclass
class FTPResult:
    router: Router | str
    schedule: list[float]
    static_schedule: list[float]
    decode_thresholds: list[float] | float = 0.5
    metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)


def fit_ftp(
    model, train_batches, calib_batches, cfg: FTPConfig, prompt_batches=(), log: Callable[[str], None] = print
) -> FTPResult:
    """`*_batches`: [(input_ids, attention_mask)] of training / calibration sequences and of
    prompts (for calibrated decode thresholds); the model is frozen and never updated."""
    check_supported(model)
    torch.manual_seed(cfg.seed)
    model.requires_grad_(False)
    model.eval()
    n_layers = len(model.model.layers)
    teacher = dense_logits(model, calib_batches)

    def kl(router, schedule) -> float:
        return schedule_kl(model, router, schedule, calib_batches, teacher, cfg.attention_probes)

    common = dict(
        max_block=cfg.max_block_sparsity, seed=cfg.seed, n_probes=cfg.attention_probes, teacher=teacher
    )

    static_schedule, search_log = search_schedule(
        model, "static", calib_batches, cfg.sparsity, cfg.search, **common
    )
    metrics = {
        "kl_static_uniform": kl("static", uniform_schedule(n_layers, cfg.sparsity)),
        "kl_static_searched": search_log[-1]["best"],
    }
    log(
        f"ftp: static schedule {[round(s, 3) for s in static_schedule]} (KL {metrics['kl_static_searched']:.4f})"
    )
    if cfg.router == "static":
        # the static router has no keep-probabilities to calibrate on: "calibrated" means the paper's 0.5
        threshold = 0.5 if cfg.decode_threshold == "calibrated" else cfg.decode_threshold
        return FTPResult(
            router="static",
            schedule=static_schedule,
            static_schedule=static_schedule,
            decode_thresholds=threshold,
            metrics=metrics,
        )

    router = Router(cfg.router_hidden)
    history = train_router(
        model, router, static_schedule, train_batches, cfg.train, n_probes=cfg.attention_probes
    )
    router.eval()
    schedule = static_schedule
    metrics["kl_learned_static_schedule"] = kl(router, static_schedule)
    if cfg.search.research_after_training:
        schedule, _ = search_schedule(
            model, router, calib_batches, cfg.sparsity, cfg.search, init=[static_schedule], **common
        )
    metrics["kl_learned"] = kl(router, schedule)
    if history:
        metrics["train_loss_first"], metrics["train_loss_last"] = history[0]["loss"], history[-1]["loss"]
    thresholds = cfg.decode_threshold
    if thresholds == "calibrated":
        if not prompt_batches:
            raise ValueError("decode_threshold 'calibrated' needs prompt_batches")
        thresholds = calibrate_decode_thresholds(
            model,
            router,
            schedule,
            prompt_batches,
            max_new_tokens=cfg.calib_decode_tokens,
            n_probes=cfg.attention_probes,
        )
    log(f"ftp: learned schedule {[round(s, 3) for s in schedule]} (KL {metrics['kl_learned']:.4f})")
    return FTPResult(
        router=router,
        schedule=schedule,
        static_schedule=static_schedule,
        decode_thresholds=thresholds,
        metrics=metrics,
        history=history,
    )
