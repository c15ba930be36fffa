"""AdaptInfer: text-guided vision-token pruning for Llava-family policies (Zhang et al., 2508.06084).

Public API (what rollout workers call):

* `generate_pruned(model, inputs, schedule, method="adaptinfer", **gen_kwargs) -> PrunedGeneration`
* `vlm_token_logprobs(model, input_ids, pixel_values, attention_mask) -> (B, T-1) log-probs` (dense)
* `prefill(...)` / `decode(...)`: the pruned forward itself; `PRESETS`, `proportional_schedule`,
  `mean_vision_tokens` for schedules; `AdaptInferConfig` for the YAML config.
"""

from prune.adaptinfer.config import AdaptInferConfig
from prune.adaptinfer.engine import PruneTrace, decode, prefill
from prune.adaptinfer.generate import PrunedGeneration, generate_pruned, vlm_token_logprobs
from prune.adaptinfer.schedule import PRESETS, mean_vision_tokens, proportional_schedule
from prune.adaptinfer.scoring import SCORERS, adaptinfer_scores, text_prior_weights

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
