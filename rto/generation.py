"""Batched sampling in the layout every scorer uses.

sequences [B, P + R] = left-padded prompt (length P) followed by the right-padded response
response_mask [B, R] = 1 for generated tokens up to and including the first EOS
sampler_logprobs [B, R] = log-prob of each generated token under the sampling distribution
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from rto.forward import entropy_from_logits, token_logprobs


class Sampler(Protocol):
    """What generates rollouts: the dense `hf_generate`, or a pruned sampler (FTP, AdaptInfer; a new
    one registers in `prune.samplers`). Prompts are left-padded; returns the response ids `[B, R']`
    (R' <= max_new_tokens) and the sampler's log-probs of them `[B, R']`, defined as for every
    sampler: log softmax(logits / T) of the sampling model, before top-p/top-k truncation and
    token suppression (greedy: T = 1). `suppress_token_ids` are never sampled; `pixel_values` (one
    picture per prompt) is given to vision-language policies only."""

    def __call__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        suppress_token_ids: list[int] | None = None,
        pixel_values: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class Samples:
    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_mask: torch.Tensor
    sampler_logprobs: torch.Tensor

    @property
    def responses(self) -> torch.Tensor:
        return self.sequences[:, self.prompt_len :]

    def terminated(self, eos_id: int) -> torch.Tensor:
        return ((self.responses == eos_id) & self.response_mask.bool()).any(dim=1)


def prompt_text(prompt) -> str:
    """The user's words of a TRL prompt (a string, or a conversation)."""
    if isinstance(prompt, str):
        return prompt
    return " ".join(m["content"] for m in prompt if m.get("role") == "user")


def encode_prompt(tokenizer, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tokenizer(prompt, add_special_tokens=True)["input_ids"]
    encoded = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def left_pad(prompt_ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


@contextlib.contextmanager
def bare_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """While the block runs, ``model.generation_config`` is a blank ``GenerationConfig``. HF generate
    (and FTP's ``generate_pruned``) fill every setting a call leaves unset from the model's
    generation config: a checkpoint's repetition penalty, top-k, top-p, minimum length, banned
    tokens (Qwen2.5-Instruct ships a repetition penalty of 1.05 and top-k 20) would change what a
    sampler draws from while its log-probs, computed from the raw logits, describe the configured
    distribution. Samplers state every setting they use and inherit nothing."""
    from transformers import GenerationConfig

    shipped = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = shipped


GENERATION_CACHES = ("auto", "static", "dynamic")


def kv_cache_kind(cache: str, device: torch.device | str, vision: bool = False) -> str:
    """The KV cache :func:`hf_generate` decodes with: ``"static"`` (preallocated for the prompt and
    ``max_new_tokens``, written in place) or ``"dynamic"`` (grown by concatenation at every token,
    which copies the whole cache each step). ``"auto"``: static for a text policy on the CPU, where
    the copies are about 15 % of a 25 M policy's decoding (benchmarks/README.md, "Throughput"; the
    gain measured end to end so far is within the machine's noise), and
    dynamic elsewhere: on a GPU the copy is cheap and a static cache makes every step attend over
    the full length; vision-language policies keep the dynamic cache. Both sample the same tokens
    (logits agree to ~1e-7)."""
    if cache not in GENERATION_CACHES:
        raise ValueError(f"unknown generation cache {cache!r}: one of {', '.join(GENERATION_CACHES)}")
    if cache != "auto":
        return cache
    return "static" if torch.device(device).type == "cpu" and not vision else "dynamic"


def hf_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    pixel_values: torch.Tensor | None = None,
    suppress_token_ids: list[int] | None = None,
    return_policy_scores: bool = False,
    cache: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The default generate function: HF ``generate`` with sampling (greedy if ``temperature == 0``)
    under exactly these settings: the model's own generation defaults (a repetition penalty, a
    minimum length, its top-p, as Qwen and Llama-3 ship) are not applied, so the rollouts are
    samples of softmax(logits / T) truncated by top-p/top-k and nothing else. ``pixel_values`` (one
    picture per prompt) go to a vision-language policy; ``suppress_token_ids`` are never sampled.

    Returns ``response_ids [B, R']`` (R' <= max_new_tokens) and the sampler's log-probs of those
    tokens ``[B, R']``, defined as for every sampler: log softmax(logits / T) of the sampling model,
    before top-p/top-k truncation and token suppression (greedy: T = 1). For this dense sampler
    they equal the policy's log-probs at T (``rto.forward.response_logprobs(temperature=T)``).
    Any function with this signature can replace it (pruned generators: FTP, AdaptInfer).

    ``return_policy_scores``: also return what PPO's policy pass would compute from the same logits
    (:func:`rto.ppo.losses.policy_scores`: ``logprobs`` at T = 1 and the sampling distribution's
    ``entropy``, ``[B, R']``), so that a dense rollout need not be scored again by the policy.

    ``cache``: the KV cache the decoding keeps (:func:`kv_cache_kind`; ``ppo.generation_cache``).
    """
    from transformers import GenerationConfig

    static = kv_cache_kind(cache, input_ids.device, pixel_values is not None) == "static"
    do_sample = temperature > 0
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        suppress_tokens=list(suppress_token_ids) if suppress_token_ids else None,
        return_dict_in_generate=True,
        output_logits=True,
        # a static cache without the CUDA auto-compile (shapes change every call: it would recompile)
        **({"cache_implementation": "static", "disable_compile": True} if static else {}),
        # top_k 0 (off) said explicitly: HF fills an unset top_k with its own default, 50
        **({"temperature": temperature, "top_p": top_p, "top_k": top_k or 0} if do_sample else {}),
    )
    with bare_generation_config(model):
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=settings,
            **({"pixel_values": pixel_values} if pixel_values is not None else {}),
        )
    response_ids = out.sequences[:, input_ids.shape[1] :]
    raw = torch.stack(out.logits, dim=1).float()  # [B, R', V]: the model's, before any processing
    logits = raw / temperature if do_sample and temperature != 1.0 else raw
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    if not return_policy_scores:
        return response_ids, logprobs
    own = token_logprobs(raw, response_ids) if logits is not raw else logprobs
    return response_ids, logprobs, {"logprobs": own, "entropy": entropy_from_logits(logits)}


def response_mask(response_ids: torch.Tensor, eos_token_ids: list[int]) -> torch.Tensor:
    """1 for every response token up to and including the first EOS, 0 after it. ``[B, R]``."""
    is_eos = torch.isin(response_ids, torch.tensor(eos_token_ids, device=response_ids.device))
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS tokens strictly before h
    return (eos_before == 0).long()


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[list[int]],
    *,
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    suppress_token_ids: list[int] | None = None,
) -> Samples:
    """Sample responses to `prompt_ids` (see `rto.distributed.rollout.hf_generate`); pass
    `rto.models.sampling_token_ids(...)["suppress_token_ids"]` so no special token but EOS is emitted."""
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompt_ids, pad_id)
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    responses, logprobs = hf_generate(
        model, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
        top_p=top_p, eos_token_id=eos_id, pad_token_id=pad_id, suppress_token_ids=suppress_token_ids,
    )  # fmt: skip
    prompt_len = input_ids.shape[1]
    mask = response_mask(responses, [eos_id])
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))
    full_mask = torch.cat([attention_mask, mask], dim=1)
    sequences = torch.cat([input_ids, responses], dim=1)
    return Samples(sequences, full_mask, prompt_len, mask, logprobs)


def decode_responses(tokenizer, samples: Samples) -> list[str]:
    texts = []
    for row, mask in zip(samples.responses, samples.response_mask, strict=True):
        ids = [
            t for t, m in zip(row.tolist(), mask.tolist(), strict=True) if m and t != tokenizer.eos_token_id
        ]
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def encode_completion(
    tokenizer, prompt, completion, prompt_ids: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """Token ids of a prompt (ready for generation) and of its completion (ending with EOS).

    Conversational data goes through the chat template, and the completion is what the full
    conversation adds after the prompt; plain strings get the tokenizer's EOS appended.
    `prompt_ids`: the prompt's `encode_prompt` ids where the caller has them already.
    """
    if prompt_ids is None:
        prompt_ids = encode_prompt(tokenizer, prompt)
    if isinstance(completion, str):
        completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion_ids = completion_ids + [tokenizer.eos_token_id]
        return prompt_ids, completion_ids
    messages = (prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]) + completion
    full = tokenizer.apply_chat_template(messages, tokenize=True)
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[: len(prompt_ids)] != prompt_ids:
        raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
    completion_ids = full[len(prompt_ids) :]
    eos = tokenizer.eos_token_id
    if eos in completion_ids:  # drop template text after the end-of-turn token
        completion_ids = completion_ids[: completion_ids.index(eos) + 1]
    return prompt_ids, completion_ids


def pack(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int):
    """Left-padded prompts + right-padded completions: (sequences, attention_mask, prompt_len, response_mask)."""
    prompts, prompt_mask = left_pad(prompt_ids, pad_id)
    width = max(len(c) for c in completion_ids)
    responses = torch.full((len(completion_ids), width), pad_id, dtype=torch.long)
    response_mask = torch.zeros((len(completion_ids), width), dtype=torch.long)
    for i, c in enumerate(completion_ids):
        responses[i, : len(c)] = torch.tensor(c, dtype=torch.long)
        response_mask[i, : len(c)] = 1
    sequences = torch.cat([prompts, responses], dim=1)
    return sequences, torch.cat([prompt_mask, response_mask], dim=1), prompts.shape[1], response_mask
