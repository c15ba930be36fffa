"""Pruners by name (verl-style registry): each entry loads what a pruner needs for one policy and
returns a `generate(input_ids, attention_mask, **gen_kwargs) -> sequences` function for rollouts.

    generate = PRUNERS.get("ftp")(model, "RUN_DIR/stages/ftp")
    sequences = generate(input_ids, attention_mask, max_new_tokens=48, do_sample=True)

The function reads the model's current weights at every call, so refreshing the policy's weights
in place after a PPO update needs no reload.
"""

from __future__ import annotations

from collections.abc import Callable

from rto.registry import Registry

PRUNERS: Registry[Callable] = Registry("pruner")


@PRUNERS.register("none")
def dense(model, path: str | None = None) -> Callable:
    return lambda input_ids, attention_mask, **gen_kwargs: model.generate(
        input_ids=input_ids, attention_mask=attention_mask, **gen_kwargs
    )


@PRUNERS.register("ftp")
def ftp(model, path: str) -> Callable:
    from prune.ftp.generate import generate_pruned
    from prune.ftp.router import load_router

    router, schedule, meta = load_router(path, model)
    threshold = meta.get("decode_thresholds", meta.get("decode_threshold", 0.5))
    n_probes = int(meta.get("attention_probes", 8))

    def generate(input_ids, attention_mask, **gen_kwargs):
        if hasattr(router, "to"):
            router.to(input_ids.device)
        return generate_pruned(
            model,
            router,
            schedule,
            input_ids,
            attention_mask,
            threshold=threshold,
            n_probes=n_probes,
            **gen_kwargs,
        )

    return generate
