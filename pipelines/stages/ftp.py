"""`ftp`: train the FTP router and sparsity schedule for the policy (the LLM stays frozen).

Reads the SFT model (or the base policy when there is no SFT stage) and the SFT data; writes
`router.safetensors` + `ftp.json` (model fingerprint, schedule, settings, metrics) to the stage
folder, which the `ftp` rollout sampler (`prune/ftp/rollout.py`, registered in `prune.samplers`) reads.
"""

from __future__ import annotations

import json
import random

from pipelines.stages import StageContext, register_stage
from prune.ftp.config import FTPConfig
from rto.models import load_causal_lm, load_tokenizer


@register_stage("ftp", rank=3, sections=("ftp",), uses=("sft",))
def run_ftp(ctx: StageContext) -> dict:
    # deferred: every stage module is imported to validate a job (start-up time)
    from prune.ftp.data import encode_record, left_padded_batches
    from prune.ftp.fit import fit_ftp
    from prune.ftp.router import (
        Router,
        check_supported,
        model_fingerprint,
        save_router,
        task_identity,
        tokenizer_fingerprint,
    )  # fmt: skip
    from rto.generation import encode_prompt

    cfg: FTPConfig = getattr(ctx.cfg, "ftp", None) or FTPConfig()
    path = ctx.policy_init()
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path, device=ctx.device).eval()
    check_supported(model)

    records = ctx.prepared.records("sft")
    random.Random(cfg.seed).shuffle(records)
    sequences = [encode_record(tokenizer, r, cfg.train.max_length) for r in records]
    n_calib = min(cfg.search.calib_samples, max(1, len(sequences) // 4))
    n_train = cfg.train.steps * cfg.train.batch_size
    calib = left_padded_batches(sequences[:n_calib], cfg.train.batch_size, tokenizer.pad_token_id, ctx.device)
    train = left_padded_batches(
        sequences[n_calib : n_calib + n_train] or sequences,
        cfg.train.batch_size,
        tokenizer.pad_token_id,
        ctx.device,
    )

    prompts = [
        encode_prompt(tokenizer, r["prompt"]) for r in records[: cfg.search.calib_samples] if "prompt" in r
    ]
    prompt_batches = left_padded_batches(prompts, cfg.train.batch_size, tokenizer.pad_token_id, ctx.device)
    if cfg.decode_threshold == "calibrated" and not prompt_batches:
        cfg = cfg.model_copy(update={"decode_threshold": 0.5})  # no prompt column: the paper's rule
    result = fit_ftp(model, train, calib, cfg, prompt_batches, log=ctx.log)
    for record in result.history[:: max(1, len(result.history) // 20)]:
        ctx.metrics(record)
    router = result.router if isinstance(result.router, Router) else Router(cfg.router_hidden)
    save_router(
        ctx.out_dir, router, result.schedule, model_fingerprint(model),
        kind="learned" if isinstance(result.router, Router) else "static",
        sparsity=cfg.sparsity, decode_thresholds=result.decode_thresholds, attention_probes=cfg.attention_probes,
        static_schedule=result.static_schedule, source_model=path, metrics=result.metrics,
        tokenizer=tokenizer_fingerprint(tokenizer), task=task_identity(ctx.cfg),
        config=cfg.model_dump(mode="json"),
    )  # fmt: skip
    (ctx.out_dir / "train_history.json").write_text(json.dumps(result.history))
    return {"sparsity": cfg.sparsity, "schedule": [round(s, 4) for s in result.schedule], **result.metrics}
