"""Frozen scoring models: per-token log-probs of responses (π, π_ref, π_dpo) and sequence scores (RM).

Sequence layout used everywhere in the PPO layer: `sequences [B, P + R]` = a **left-padded prompt**
of length P (`prompt_len`) followed by a **right-padded response** of length R; `attention_mask`
is 0 on both kinds of padding. Position ids are computed from the attention mask, so a padded row
scores exactly as the same row would unpadded. Outputs are response-aligned `[B, R]`: position t
scores the t-th response token, and is 0 where the response is padding.
"""

from __future__ import annotations

import inspect
import os

import torch
from torch import Tensor, nn

from rto.errors import UserError
from rto.models import check_model_path, load_model, load_tokenizer
from rto.ppo.algo import entropy_from_logits


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


def response_logits(
    model: nn.Module,
    sequences: Tensor,
    attention_mask: Tensor,
    prompt_len: int,
    micro_batch_size: int = 8,
    pixel_values: Tensor | None = None,
):
    """Yield, micro-batch by micro-batch, ``(rows, logits [b, R, V] float32, targets [b, R],
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
    for start in range(0, sequences.size(0), micro_batch_size):
        ids = sequences[start : start + micro_batch_size]
        mask = attention_mask[start : start + micro_batch_size]
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            **keep,
            **image_inputs(model, pixel_values, start, micro_batch_size),
        ).logits
        logits = logits[:, -(response_len + 1) : -1].float()  # [b, R, V]
        yield (
            slice(start, start + ids.size(0)),
            logits,
            ids[:, prompt_len:],
            mask[:, prompt_len:].to(logits.dtype),
        )


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
    for _, logits, targets, response_mask in response_logits(
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


# ---------------------------------------------------------------- loading


def _load(path_or_name: str | os.PathLike, kind: str, dtype: torch.dtype) -> nn.Module:
    """A frozen model (eval mode, no gradients), loaded as every stage loads it
    (`rto.models.load_model`: pad token and embeddings agree); a bad folder is a `UserError`."""
    model = load_model(str(path_or_name), kind, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class FrozenLM:
    """A causal LM in eval mode without gradients, returning per-token log-probs of responses."""

    def __init__(
        self,
        path_or_name: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        micro_batch_size: int = 8,
    ):
        self.path = str(path_or_name)
        self.model = _load(path_or_name, "causal_lm", dtype).to(device)
        self.device = torch.device(device)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def logprobs(
        self, sequences: Tensor, attention_mask: Tensor, prompt_len: int, return_entropy: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """[B, R] response log-probs (see `response_logprobs`), on the input's device."""
        out = response_logprobs(
            self.model,
            sequences.to(self.device),
            attention_mask.to(self.device),
            prompt_len,
            self.micro_batch_size,
            return_entropy,
        )
        if return_entropy:
            return out[0].to(sequences.device), out[1].to(sequences.device)
        return out.to(sequences.device)


class FrozenRM:
    """A sequence-classification reward model (num_labels=1) returning one score per sequence."""

    def __init__(
        self,
        path_or_name: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        micro_batch_size: int = 8,
    ):
        self.path = str(path_or_name)
        self.model = _load(path_or_name, "sequence_classification", dtype).to(device)
        self.device = torch.device(device)
        self.micro_batch_size = micro_batch_size

    @torch.no_grad()
    def scores(self, sequences: Tensor, attention_mask: Tensor) -> Tensor:
        """[B] float32 scores at each row's last real token, on the input's device."""
        out = sequence_scores(
            self.model, sequences.to(self.device), attention_mask.to(self.device), self.micro_batch_size
        )
        return out.to(sequences.device)


def check_same_tokenizer(path_a: str | os.PathLike, path_b: str | os.PathLike) -> None:
    """UserError unless the two models' tokenizers have the same vocabulary (π_dpo vs π_ref, the
    RM vs the policy: they score the policy's token ids)."""
    vocabularies = []
    for path in (path_a, path_b):
        text = check_model_path(path)
        try:
            vocabularies.append(load_tokenizer(text, field=None).get_vocab())  # pad-completed, as loaded
        except UserError as error:
            raise UserError(str(error).removeprefix("cannot load a tokenizer from "), source=text) from None
    if vocabularies[0] != vocabularies[1]:
        only_a = len(set(vocabularies[0].items()) - set(vocabularies[1].items()))
        raise UserError(
            f"tokenizer differs from {path_b} ({len(vocabularies[0])} vs {len(vocabularies[1])} tokens, "
            f"{only_a} entries not shared); models that score the policy's tokens must share its tokenizer",
            source=str(path_a),
        )
