"""Forward helpers every model-running part shares: log-probs of response tokens, a sequence
classifier's score at the last real token, entropy. Pure functions of a model and tensors.

Sequence layout used everywhere in the PPO layer: `sequences [B, P + R]` = a **left-padded prompt**
of length P (`prompt_len`) followed by a **right-padded response** of length R; `attention_mask`
is 0 on both kinds of padding. Position ids are computed from the attention mask, so a padded row
scores exactly as the same row would unpadded. Outputs are response-aligned `[B, R]`: position t
scores the t-th response token, and is 0 where the response is padding.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim: logsumexp(z) − Σ softmax(z)·z. [..., V] → [...]."""
    probs = F.softmax(logits.float(), dim=-1)
    return torch.logsumexp(logits.float(), dim=-1) - (probs * logits.float()).sum(dim=-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """[B, L] positions counted over real tokens only (padding gets 0): left padding then starts at 0."""
    return (attention_mask.long().cumsum(dim=1) - 1).clamp_min(0)


def image_inputs(model: nn.Module, pixel_values: Tensor | None, start: int, size: int) -> dict:
    """``{"pixel_values": rows start…start+size}`` in the model's dtype, or {} for a text-only batch."""
    if pixel_values is None:
        return {}
    dtype = next(model.parameters()).dtype
    return {"pixel_values": pixel_values[start : start + size].to(dtype)}


def _accepts(model: nn.Module, argument: str) -> bool:
    """Whether the model's forward takes `argument`; a DeepSpeed engine (whose own forward is
    ``forward(*inputs, **kwargs)``) is asked about the module it wraps."""
    wrapped = getattr(model, "module", model)
    return argument in inspect.signature(wrapped.forward).parameters


def forward_micro_batches(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    micro_batch_size: int,
    pixel_values: Tensor | None = None,
    **kwargs,
):
    """Yield ``(ids, mask, output)`` for each micro-batch of rows: the model's forward with position
    ids from the attention mask (so padding changes nothing), no cache, and the rows' pictures for
    a vision-language model; `kwargs` go to the forward as well."""
    for start in range(0, sequences.size(0), micro_batch_size):
        ids = sequences[start : start + micro_batch_size]
        mask = attention_mask[start : start + micro_batch_size]
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            **kwargs,
            **image_inputs(model, pixel_values, start, micro_batch_size),
        )
        yield ids, mask, output


def response_logits(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    micro_batch_size: int = 8,
    pixel_values: Tensor | None = None,
):
    """Yield, micro-batch by micro-batch, ``(logits [b, R, V] float32, targets [b, R],
    response_mask [b, R])``: the logits that predict each response token `sequences[:, prompt_len:]`.
    Only the R + 1 last positions are computed where the model takes ``logits_to_keep``."""
    if sequences.shape != attention_mask.shape or sequences.dim() != 2:
        raise ValueError(
            f"sequences {tuple(sequences.shape)} and attention_mask {tuple(attention_mask.shape)} must be the same [B, L]"
        )
    response_len = sequences.size(1) - prompt_len
    if prompt_len < 1 or response_len < 1:
        raise ValueError(
            f"prompt_len={prompt_len} must leave ≥1 prompt and ≥1 response column of {sequences.size(1)}"
        )
    # Logits at positions P−1 … P+R−2 predict the response tokens P … P+R−1.
    keep = {"logits_to_keep": response_len + 1} if _accepts(model, "logits_to_keep") else {}
    for ids, mask, output in forward_micro_batches(
        model, sequences, attention_mask, micro_batch_size, pixel_values, **keep
    ):
        logits = output.logits[:, -(response_len + 1) : -1].float()  # [b, R, V]
        yield logits, ids[:, prompt_len:], mask[:, prompt_len:].to(logits.dtype)


def token_logprobs(logits: Tensor, targets: Tensor, temperature: float = 1.0) -> Tensor:
    """log softmax(logits / T) of the target tokens: the model's log-prob at sampling temperature T,
    before any top-p/top-k truncation (what every sampler reports as its log-prob too)."""
    if temperature != 1.0:
        logits = logits / temperature
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(logits, dim=-1)


def response_logprobs(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    micro_batch_size: int = 8,
    return_entropy: bool = False,
    pixel_values: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probs `[B, R]` of the response tokens `sequences[:, prompt_len:]` under `model` at
    `temperature` (and the per-token entropy `[B, R]` of that distribution when `return_entropy`),
    zero on response padding. `pixel_values [B, 3, H, W]` (one picture per row) go to a
    vision-language model.

    Differentiable when called with grad enabled (the policy's training pass uses it too)."""
    logprob_chunks, entropy_chunks = [], []
    for logits, targets, response_mask in response_logits(
        model, sequences, attention_mask, prompt_len, micro_batch_size, pixel_values
    ):
        logprob_chunks.append(token_logprobs(logits, targets, temperature) * response_mask)
        if return_entropy:
            scaled = logits / temperature if temperature != 1.0 else logits
            entropy_chunks.append(entropy_from_logits(scaled) * response_mask)
    logprobs = torch.cat(logprob_chunks)
    return (logprobs, torch.cat(entropy_chunks)) if return_entropy else logprobs


def sequence_scores(
    model: nn.Module, sequences: Tensor, attention_mask: Tensor, micro_batch_size: int = 8
) -> Tensor:
    """[B] score of a sequence-classification model (num_labels=1) at each row's last real token:
    the backbone, then the `score` head at the last position where attention_mask is 1.

    That is the token TRL's RewardTrainer trains on (transformers' own pooling: the rightmost token
    ≠ pad_token_id) because every tokenizer gets a pad token distinct from EOS
    (`rto.models.ensure_pad_token`) and reward-model training data ends at EOS, as rollouts do."""
    if not hasattr(model, "score"):
        raise TypeError(
            f"{type(model).__name__} has no `score` head; expected a *ForSequenceClassification model"
        )
    backbone = model.base_model
    last = attention_mask.size(1) - 1 - attention_mask.long().flip(1).argmax(dim=1)  # [B]
    chunks = []
    for start in range(0, sequences.size(0), micro_batch_size):
        mask = attention_mask[start : start + micro_batch_size]
        hidden = backbone(
            input_ids=sequences[start : start + micro_batch_size],
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        ).last_hidden_state  # [b, L, H]
        rows = torch.arange(hidden.size(0), device=hidden.device)
        chunks.append(model.score(hidden[rows, last[start : start + micro_batch_size]]).squeeze(-1).float())
    return torch.cat(chunks)
