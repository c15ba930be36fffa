"""Frozen scoring models (π_ref, π_dpo and the sentence-level reward model) and the tokenizer
check between them; the forward passes themselves are `rto.forward`'s."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from rto.errors import UserError
from rto.forward import response_logprobs, sequence_scores
from rto.models import check_model_path, load_model, load_tokenizer

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
