"""Batched generation with vision-token pruning, and the dense log-prob recomputation for PPO.

`generate_pruned` is what a rollout worker calls: prompts (left-padded, one image each) in,
sequences and the sampler's per-token log-probs out. Because the pruned sampler is not the dense
policy, PPO recomputes log-probs with `vlm_token_logprobs` on the dense model (differentiable,
plain transformers forward, so DeepSpeed wraps it as usual) and corrects the mismatch with
truncated importance sampling (docs/design.md, "PPO": off-policy rollouts).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune.adaptinfer.engine import PruneTrace, decode, prefill


@dataclass
class PrunedGeneration:
    sequences: torch.Tensor  # (B, T_prompt + T_new): prompt ids followed by generated ids (pad after EOS)
    sampler_logprobs: torch.Tensor  # (B, T_new): log p_sampler(token) at temperature, 0 after EOS
    response_mask: torch.Tensor  # (B, T_new): 1 for generated tokens up to and including EOS
    trace: PruneTrace


def _warpers(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None):
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if do_sample and top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if do_sample and top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers


@torch.no_grad()
def generate_pruned(
    model,
    inputs: dict,
    schedule: dict[int, int] | None = None,
    method: str = "adaptinfer",
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    generator: torch.Generator | None = None,
    suppress_token_ids: list[int] | None = None,
) -> PrunedGeneration:
    """Generate from `inputs` (processor output: input_ids, attention_mask, pixel_values) with pruning.

    `schedule` maps a decoder layer to the number of vision tokens kept after it (None or {} =
    dense). `method` names a registered scorer: adaptinfer, adaptinfer_no_prior, fastv, random.
    `suppress_token_ids` are never generated (a policy must not emit image tokens or other special
    tokens). Sampling: temperature, then top-k / top-p; `sampler_logprobs` are defined as for every
    sampler: log-softmax(logits / temperature) of the chosen tokens, before top-k/top-p truncation
    and token suppression (what vLLM reports too; greedy: temperature 1).
    """
    import prune.fastv  # noqa: F401  (registers the fastv scorer)

    input_ids = inputs["input_ids"]
    generation_config = getattr(model, "generation_config", None)
    eos = eos_token_id if eos_token_id is not None else getattr(generation_config, "eos_token_id", None)
    eos_ids = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), device=input_ids.device)
    pad = pad_token_id if pad_token_id is not None else getattr(generation_config, "pad_token_id", None)
    pad = 0 if pad is None else pad
    logits, state, trace = prefill(
        model, input_ids, inputs["pixel_values"], inputs.get("attention_mask"), schedule, method, generator
    )
    warpers = _warpers(do_sample, temperature, top_k, top_p)
    batch = input_ids.shape[0]
    done = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    tokens, logprobs, masks = [], [], []
    for step in range(max_new_tokens):
        scaled = logits.float() / (temperature if do_sample else 1.0)
        logp = torch.log_softmax(scaled, dim=-1)
        if suppress_token_ids:
            scaled[:, suppress_token_ids] = float("-inf")
        if do_sample:
            warped = scaled
            for warper in warpers:
                warped = warper(None, warped)
            token = torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=generator)[:, 0]
        else:
            token = scaled.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad), token)
        tokens.append(token)
        logprobs.append(torch.where(done, 0.0, logp.gather(1, token[:, None])[:, 0]))
        masks.append((~done).long())
        done = done | torch.isin(token, eos_ids)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = decode(model, token, state)
    new = torch.stack(tokens, dim=1)
    return PrunedGeneration(
        sequences=torch.cat([input_ids, new], dim=1),
        sampler_logprobs=torch.stack(logprobs, dim=1),
        response_mask=torch.stack(masks, dim=1),
        trace=trace,
    )


def vlm_token_logprobs(
    model,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense per-token log-probs (B, T-1): entry t is log π(input_ids[t+1] | input_ids[:t+1], image).

    Plain transformers forward of the full (unpruned) model, differentiable; position ids follow
    the attention mask exactly as `generate` and `generate_pruned` do for left-padded prompts.
    Slice the response part with the rollout's `response_mask`.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = (
        model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
        )
        .logits[:, :-1]
        .float()
    )
    return torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None])[..., 0]
