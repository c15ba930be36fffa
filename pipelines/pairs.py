"""Held-out preference figures: how often a model (or RM) ranks the chosen response first."""

from __future__ import annotations

import json

import torch

from rto.generation import encode_completion, encode_prompt, pack


def encode_pairs(tokenizer, pairs: list[dict]):
    """(prompt_ids, completion_ids) of each pair's chosen and of its rejected response
    (`encode_completion`); a prompt that several pairs share is encoded once."""
    chosen, rejected = [], []
    prompts: dict[str, list[int]] = {}
    for row in pairs:
        prompt = row.get("prompt", [] if isinstance(row["chosen"], list) else "")
        key = _prompt_key(prompt)
        if key not in prompts:
            prompts[key] = encode_prompt(tokenizer, prompt)
        for out, completion in ((chosen, row["chosen"]), (rejected, row["rejected"])):
            out.append(encode_completion(tokenizer, prompt, completion, list(prompts[key])))
    return chosen, rejected


def _prompt_key(prompt) -> str:
    try:
        return json.dumps(prompt, sort_keys=True)
    except (TypeError, ValueError):  # not plain JSON: encoded for this pair alone
        return f"id:{id(prompt)}"


def _packed(encoded, pad_id):
    return pack([p for p, _ in encoded], [c for _, c in encoded], pad_id)


@torch.no_grad()
def logprob_sums(lm, tokenizer, encoded, batch_size: int = 64) -> torch.Tensor:
    """Σ log π(completion | prompt) for each (prompt_ids, completion_ids)."""
    sums = []
    for i in range(0, len(encoded), batch_size):
        sequences, mask, prompt_len, response_mask = _packed(
            encoded[i : i + batch_size], tokenizer.pad_token_id
        )
        logprobs = lm.logprobs(sequences, mask, prompt_len)
        sums.append((logprobs * response_mask).sum(dim=1))
    return torch.cat(sums)


@torch.no_grad()
def rm_scores(rm, tokenizer, encoded, batch_size: int = 64) -> torch.Tensor:
    scores = []
    for i in range(0, len(encoded), batch_size):
        sequences, mask, _, _ = _packed(encoded[i : i + batch_size], tokenizer.pad_token_id)
        scores.append(rm.scores(sequences, mask))
    return torch.cat(scores)
