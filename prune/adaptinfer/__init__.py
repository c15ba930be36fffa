"""AdaptInfer: text-guided vision-token pruning for Llava-family policies (Zhang et al., 2508.06084).

Public API (what rollout workers call):

* `generate_pruned(model, inputs, schedule, method="adaptinfer", **gen_kwargs) -> PrunedGeneration`
* `vlm_token_logprobs(model, input_ids, pixel_values, attention_mask) -> (B, T-1) log-probs` (dense)
* `prefill(...)` / `decode(...)`: the pruned forward itself; `PRESETS`, `proportional_schedule`,
  `mean_vision_tokens` for schedules; `AdaptInferConfig` for the YAML config.
"""

import importlib

_EXPORTS = {
    "AdaptInferConfig": "config", "PruneTrace": "engine", "decode": "engine", "prefill": "engine",
    "PrunedGeneration": "generate", "generate_pruned": "generate", "vlm_token_logprobs": "generate",
    "PRESETS": "schedule", "mean_vision_tokens": "schedule", "proportional_schedule": "schedule",
    "SCORERS": "scoring", "adaptinfer_scores": "scoring", "text_prior_weights": "scoring",
}  # fmt: skip


def __getattr__(name: str):
    """The public names, imported on first use: the job schema imports this package's config,
    which must not pull torch into `rto validate` and `rto --help` (start-up time)."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'prune.adaptinfer' has no attribute {name!r}")
    return getattr(importlib.import_module(f"prune.adaptinfer.{_EXPORTS[name]}"), name)


__all__ = [
    "PRESETS",
    "SCORERS",
    "AdaptInferConfig",
    "PruneTrace",
    "PrunedGeneration",
    "adaptinfer_scores",
    "decode",
    "generate_pruned",
    "mean_vision_tokens",
    "prefill",
    "proportional_schedule",
    "text_prior_weights",
    "vlm_token_logprobs",
]
