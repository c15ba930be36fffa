"""Functions the policy and critic workers run on their batch slice (forward passes + losses).

They are referenced by name ("rto.ppo.losses:policy_loss") so Ray workers import them; each takes
the model first and the batch entries it needs by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rto.forward import (
    entropy_from_logits,
    forward_micro_batches,
    response_logits,
    response_logprobs,
    token_logprobs,
)
from rto.ppo.algo import POLICY_LOSSES, clipped_value_loss, entropy_bonus, masked_mean


def critic_values(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    micro_batch_size: int = 64,
    pixel_values: Tensor | None = None,
) -> Tensor:
    """V(s_h) `[B, R]` for each response token h: the critic's output at the position that precedes
    the token (the state the token was chosen in), zero on response padding. `pixel_values`: one
    picture per row for a vision-language critic."""
    chunks = []
    response_len = sequences.size(1) - prompt_len
    for _, mask, out in forward_micro_batches(
        model, sequences, attention_mask, micro_batch_size, pixel_values
    ):
        values = out.logits[:, prompt_len - 1 : prompt_len - 1 + response_len, 0].float()
        chunks.append(values * mask[:, prompt_len:].to(values.dtype))
    return torch.cat(chunks)


def policy_scores(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    temperature: float = 1.0,
    pixel_values: Tensor | None = None,
) -> dict[str, Tensor]:
    """The current policy on a rollout batch, from one forward: ``logprobs`` (the model's own
    distribution, T = 1: what the token reward's KL term and the traces use), ``sampling_logprobs``
    (at the rollouts' sampling temperature, before truncation: what PPO's ratio and the importance
    weights compare) and ``entropy`` of the sampling distribution. Dense (the whole picture,
    unpruned, for a vision-language policy): PPO's log-probs are always the dense model's."""
    own, sampling, entropy = [], [], []
    for logits, targets, mask in response_logits(
        model, sequences, attention_mask, prompt_len, 64, pixel_values
    ):
        own.append(token_logprobs(logits, targets) * mask)
        sampling.append(
            token_logprobs(logits, targets, temperature) * mask if temperature != 1.0 else own[-1]
        )
        entropy.append(entropy_from_logits(logits / temperature) * mask)
    return {
        "logprobs": torch.cat(own),
        "sampling_logprobs": torch.cat(sampling),
        "entropy": torch.cat(entropy),
    }


def policy_loss(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    response_mask: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    is_weights: Tensor | None = None,
    clip_eps: float = 0.2,
    entropy_coef: float = 0.0,
    temperature: float = 1.0,
    policy_loss_name: str = "ppo_clip",
    pixel_values: Tensor | None = None,
):
    """The configured policy loss (`ppo.policy_loss`, a name in `POLICY_LOSSES`); `old_logprobs`
    are `policy_scores`' ``sampling_logprobs`` of the same rows, so the log-probs here are taken at
    the same `temperature` (ratio = 1 before any update: ``ratio_error`` = max |ratio − 1|)."""
    logprobs, entropy = response_logprobs(
        model, sequences, attention_mask, prompt_len, sequences.size(0), return_entropy=True,
        pixel_values=pixel_values, temperature=temperature,
    )  # fmt: skip
    loss, stats = POLICY_LOSSES.get(policy_loss_name)(
        logprobs, old_logprobs, advantages, response_mask, clip_eps=clip_eps, is_weights=is_weights
    )
    with torch.no_grad():
        ratio = torch.exp(logprobs - old_logprobs)[response_mask > 0]
        stats["ratio_error"] = float((ratio - 1).abs().max()) if ratio.numel() else 0.0
    if entropy_coef > 0:
        loss = loss - entropy_bonus(entropy, response_mask, entropy_coef)
    stats["entropy"] = float(masked_mean(entropy.detach(), response_mask))
    stats["policy_loss"] = float(loss.detach())
    return loss, stats


def value_loss(
    model,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    response_mask: Tensor,
    old_values: Tensor,
    returns: Tensor,
    value_clip: float = 0.2,
    pixel_values: Tensor | None = None,
):
    values = critic_values(model, sequences, attention_mask, prompt_len, sequences.size(0), pixel_values)
    loss, stats = clipped_value_loss(values, old_values, returns, response_mask, clip_eps=value_clip)
    stats["value_loss"] = float(loss.detach())
    return loss, stats


def dpo_pair_loss(
    model,
    pair_sequences: Tensor,
    pair_attention_mask: Tensor,
    pair_response_mask: Tensor,
    ref_logprob_sums: Tensor,
    prompt_len: int,
    beta: float,
    loss_scale: float | None = None,
    micro_batch_size: int = 64,
):
    """DPO's loss on preference pairs of rollouts (the online refresh, ``ppo.dpo_refresh``):
    ``pair_* [P, 2, ...]`` hold each pair's chosen (index 0) and rejected (1) response to the same
    prompt; ``ref_logprob_sums [P, 2]`` their summed log-probs under the reference model. Per pair,
    ℓ = −log σ(β·[(Σ log π − Σ log π_ref)(chosen) − (Σ log π − Σ log π_ref)(rejected)]).

    The loss is Σℓ · ``loss_scale`` (default 1/P, the mean): with the pairs split unevenly over W
    ranks, whose gradients DeepSpeed averages, ``loss_scale`` = W / (all pairs) makes the step the
    gradient of the mean over every pair. The metrics are sums (``dpo_refresh_n`` pairs), so the
    caller can average over ranks exactly."""
    pairs, _, length = pair_sequences.shape
    logprobs = response_logprobs(
        model, pair_sequences.reshape(2 * pairs, length), pair_attention_mask.reshape(2 * pairs, length),
        prompt_len, micro_batch_size,
    )  # fmt: skip
    sums = (logprobs * pair_response_mask.reshape(2 * pairs, -1)).sum(-1).view(pairs, 2)
    implicit = sums - ref_logprob_sums.to(sums.dtype)
    margin = beta * (implicit[:, 0] - implicit[:, 1])
    per_pair = -torch.nn.functional.logsigmoid(margin)
    loss = per_pair.sum() * (loss_scale if loss_scale is not None else 1.0 / pairs)
    return loss, {
        "dpo_refresh_n": float(pairs),
        "dpo_refresh_loss_sum": float(per_pair.detach().sum()),
        "dpo_refresh_correct": float((margin.detach() > 0).sum()),
        "dpo_refresh_margin_sum": float(margin.detach().sum()),
    }


def reseed(worker, seed: int) -> None:
    """Run inside a rollout worker: make this step's sampling reproducible (and resumable)."""
    torch.manual_seed(seed + worker.rank)
