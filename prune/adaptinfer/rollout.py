"""AdaptInfer-pruned generation for the PPO rollout workers of a vision-language policy.

`RolloutWorker` calls `generate_fn(model, input_ids, attention_mask, *, max_new_tokens, temperature,
top_p, top_k, eos_token_id, pad_token_id, pixel_values) -> (response_ids, sampler_logprobs)`. This
one prefills with the configured vision-token pruning (AdaptInfer, or a baseline scorer) and
decodes from the pruned KV cache. The log-probs it returns are those of the pruned sampler; the PPO
loop recomputes them with the dense policy and weights each token by min(π_dense/π_sampler, C).

The schedule is resolved and checked against the policy's shape by the driver
(:func:`resolve_for_model`), so a schedule that names a missing layer or keeps more tokens than the
picture has is a config error before any Ray actor starts.
"""

from __future__ import annotations

from pathlib import Path

from prune.samplers import register_sampler
from rto.errors import UserError
from rto.models import check_model_path


def vision_shape(config) -> tuple[int, int]:
    """(decoder layers, vision tokens per picture) of a Llava-family config."""
    vision = getattr(config, "vision_config", None)
    if vision is None:
        raise UserError(
            f"{type(config).__name__} has no vision tower; vision-token pruning needs a vision-language model"
        )
    n_patches = (vision.image_size // vision.patch_size) ** 2
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    n_vision = n_patches + (1 if strategy == "full" else 0)
    return config.get_text_config().num_hidden_layers, n_vision


def resolve_for_model(settings, model_path: str, field: str = "adaptinfer") -> dict[int, int]:
    """The schedule of an `AdaptInferConfig` for the model at `model_path`; errors name the field."""
    from transformers import AutoConfig

    check_model_path(model_path, "policy.path")
    config = AutoConfig.from_pretrained(model_path)
    try:
        n_layers, n_vision = vision_shape(config)
        return settings.resolve(n_layers, n_vision)
    except UserError as error:
        raise UserError(
            str(error).removeprefix("schedule: "), field=f"{field}.{error.field or 'schedule'}"
        ) from None


class AdaptInferGenerate:
    """A picklable generate function (sent to Ray rollout workers) with a resolved schedule."""

    def __init__(self, schedule: dict[int, int], method: str = "adaptinfer", seed: int = 0):
        self.schedule = {int(k): int(v) for k, v in schedule.items()}
        self.method = method
        self.seed = seed

    def __call__(
        self, model, input_ids, attention_mask, *, max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        eos_token_id=None, pad_token_id=None, pixel_values=None, suppress_token_ids=None,
    ):  # fmt: skip
        import torch  # deferred: the sampler registry loads without torch

        from prune.adaptinfer.generate import generate_pruned  # deferred: torch

        if pixel_values is None:
            raise ValueError("AdaptInfer rollouts need pixel_values (one picture per prompt)")
        sampling = temperature > 0
        generator = None
        if self.method == "random":  # the random baseline's scores follow the step's seed (resumable)
            generator = torch.Generator(device=input_ids.device).manual_seed(self.seed + torch.initial_seed())
        with torch.no_grad():
            out = generate_pruned(
                model,
                {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values},
                self.schedule,
                self.method,
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                temperature=temperature if sampling else 1.0,
                top_k=top_k or None,
                top_p=top_p,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                generator=generator,
                suppress_token_ids=suppress_token_ids,
            )
        return out.sequences[:, input_ids.shape[1] :], out.sampler_logprobs


def make_generate_fn(settings, model_path: str) -> AdaptInferGenerate:
    """The rollout generate function of an enabled `AdaptInferConfig` for the policy at `model_path`."""
    return AdaptInferGenerate(resolve_for_model(settings, model_path), settings.method, settings.seed)


def _schedule_given(job) -> tuple[str, str] | None:
    if not job.adaptinfer.enabled:
        return (
            "adaptinfer",
            "ppo.rollout_pruner 'adaptinfer' needs a schedule: set adaptinfer.keep_ratio, .preset or .schedule",
        )
    return None


@register_sampler("adaptinfer", policies="vision", check=_schedule_given)
def adaptinfer_sampler(job, policy: str, stage_dir: Path | None) -> AdaptInferGenerate:
    """Rollouts from the vision-language policy with the `adaptinfer` section's vision-token pruning."""
    return make_generate_fn(job.adaptinfer, policy)
