"""Token batches for router training and calibration from TRL-format SFT rows."""

from __future__ import annotations

import torch


def encode_record(tokenizer, record: dict, max_length: int) -> list[int]:
    """prompt+completion (standard or conversational), messages, or text -> token ids (truncated)."""
    if "messages" in record:
        ids = tokenizer.apply_chat_template(record["messages"], tokenize=True)
    elif "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, list):
            ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True)
        else:
            ids = tokenizer(prompt + completion)["input_ids"]
    else:
        ids = tokenizer(record["text"])["input_ids"]
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return ids[:max_length]


def left_padded_batches(
    sequences: list[list[int]], batch_size: int, pad_id: int, device: str = "cpu"
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(input_ids [B, T], attention_mask [B, T])], left-padded like generation prompts."""
    batches = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, seq in enumerate(chunk):
            ids[i, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            mask[i, width - len(seq) :] = 1
        batches.append((ids.to(device), mask.to(device)))
    return batches
