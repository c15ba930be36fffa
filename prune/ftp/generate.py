"""Generation with the FTP-pruned model: routed prefill (top-k per block), then decoding one token
at a time where the new token computes a block when sigmoid(router logit) > threshold.

`generate_pruned` is what rollout workers call; it returns `model.generate`-style sequences
(prompt + new tokens, finished rows padded with `pad_token_id`). The sampler's log-probs are not
returned on purpose: PPO recomputes them with the dense policy and corrects the mismatch with
truncated importance sampling.
"""

from __future__ import annotations

import copy

import torch
from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from prune.ftp.forward import skipping_forward
from prune.ftp.router import Router

_UNSUPPORTED = {"num_beams": 1, "num_return_sequences": 1, "repetition_penalty": 1.0, "min_new_tokens": None}


def _generation_settings(model, gen_kwargs: dict):
    config = copy.deepcopy(model.generation_config)
    unused = config.update(**gen_kwargs)
    if unused:
        raise TypeError(f"generate_pruned got unknown generation arguments: {sorted(unused)}")
    for name, neutral in _UNSUPPORTED.items():
        value = getattr(config, name, neutral)
        if value not in (neutral, None, 0) and not (name == "repetition_penalty" and value == 1.0):
            raise ValueError(f"generate_pruned does not support {name}={value!r}")
    return config


def _warp(config, scores: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    if config.temperature is not None and config.temperature != 1.0:
        scores = TemperatureLogitsWarper(config.temperature)(input_ids, scores)
    if config.top_k:
        scores = TopKLogitsWarper(config.top_k)(input_ids, scores)
    if config.top_p is not None and config.top_p < 1.0:
        scores = TopPLogitsWarper(config.top_p)(input_ids, scores)
    return scores


@torch.no_grad()
def generate_pruned(
    model,
    router: Router | str,
    schedule: list[float],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    threshold: float | list[float] = 0.5,
    n_probes: int = 8,
    generator: torch.Generator | None = None,
    stats: dict | None = None,
    logprobs_out: list | None = None,
    suppress_token_ids: list[int] | None = None,
    **gen_kwargs,
) -> torch.LongTensor:
    """Sample continuations of left-padded prompts with token skipping.

    `router`: a trained `Router`, or "static" / "random"; `schedule`: per-block sparsity. Generation
    settings (max_new_tokens, do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)
    default to `model.generation_config`, as in `model.generate`. Returns [B, T + new] token ids.
    `threshold`: the decode rule, one value or one per block (see `calibrate_decode_thresholds`).
    With a `stats` dict, adds to stats["computed"] / stats["tokens"] (per block) the tokens each
    block computed and the tokens it could have computed (prefill and decode, unfinished rows), and
    to stats["decode_computed"] / stats["decode_tokens"] the same for decoded tokens alone.
    With a `logprobs_out` list, appends each step's [B] log-prob of the chosen tokens as every
    sampler defines it: log softmax(logits / T) of the pruned model, before top-k/top-p truncation
    and token suppression (greedy: T = 1); PPO's truncated importance weights compare it with the
    dense policy's log-prob at T. `suppress_token_ids` are never sampled.
    """
    config = _generation_settings(model, gen_kwargs)
    batch, prompt_len = input_ids.shape
    max_new = config.max_new_tokens if config.max_new_tokens is not None else config.max_length - prompt_len
    eos = config.eos_token_id
    eos_list = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    eos_ids = torch.tensor(eos_list, dtype=torch.long, device=input_ids.device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos_ids[0]) if len(eos_ids) else 0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    sequences, finished = input_ids, torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    common = dict(
        schedule=schedule, router=router, threshold=threshold, n_probes=n_probes, generator=generator
    )
    out = skipping_forward(model, input_ids, attention_mask, logits_to_keep=1, **common)
    _count(stats, out.routes, None)
    for _ in range(max_new):
        scores = out.logits[:, -1].float()
        allowed = scores.clone()
        if suppress_token_ids:
            allowed[:, suppress_token_ids] = float("-inf")
        if config.do_sample:
            probs = _warp(config, allowed, sequences).softmax(-1)
            next_tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            next_tokens = allowed.argmax(-1)
        if logprobs_out is not None:
            temperature = config.temperature if config.do_sample and config.temperature else 1.0
            chosen = (
                torch.log_softmax(scores / temperature, dim=-1).gather(-1, next_tokens[:, None]).squeeze(1)
            )
            logprobs_out.append(torch.where(finished, torch.zeros_like(chosen), chosen))
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad), next_tokens)
        sequences = torch.cat([sequences, next_tokens[:, None]], dim=1)
        finished |= torch.isin(next_tokens, eos_ids)
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        if bool(finished.all()) or sequences.shape[1] - prompt_len >= max_new:
            break
        out = skipping_forward(
            model, next_tokens[:, None], attention_mask, cache=out.cache, logits_to_keep=1, **common
        )
        _count(stats, out.routes, ~finished)
    return sequences


@torch.no_grad()
def calibrate_decode_thresholds(
    model,
    router: Router,
    schedule: list[float],
    prompt_batches,
    *,
    max_new_tokens: int = 32,
    n_probes: int = 8,
    rounds: int = 2,
) -> list[float]:
    """Per-block decode thresholds such that decoded tokens skip block l at about its target
    sparsity s_l: the s_l-quantile of the router's keep-probabilities of tokens decoded greedily
    from calibration prompts [(input_ids, attention_mask)]. The first round decodes densely, each
    further round with the previous round's thresholds (the states then look like pruned decoding)."""
    thresholds = [0.0] * len(schedule)
    for _ in range(rounds):
        probs = _decode_keep_probs(
            model, router, schedule, prompt_batches, thresholds, max_new_tokens, n_probes
        )
        thresholds = [
            float(torch.quantile(torch.cat(p), s)) if p and 0 < s < 1 else 0.5
            for p, s in zip(probs, schedule, strict=True)
        ]
    return thresholds


def _decode_keep_probs(model, router, schedule, prompt_batches, thresholds, max_new_tokens, n_probes):
    probs: list[list[torch.Tensor]] = [[] for _ in schedule]
    common = dict(
        schedule=schedule, router=router, threshold=thresholds, n_probes=n_probes, route_dense_decode=True
    )
    for input_ids, attention_mask in prompt_batches:
        out = skipping_forward(model, input_ids, attention_mask, logits_to_keep=1, **common)
        for _ in range(max_new_tokens):
            next_tokens = out.logits[:, -1].argmax(-1)
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(next_tokens), 1)], dim=1)
            out = skipping_forward(
                model, next_tokens[:, None], attention_mask, cache=out.cache, logits_to_keep=1, **common
            )
            for idx, route in enumerate(out.routes):
                if route.keep_prob is not None:
                    probs[idx].append(route.keep_prob.flatten().float())
    return probs


def _count(stats: dict | None, routes, active: torch.Tensor | None) -> None:
    """Per block: tokens computed and tokens that could have been, in all (`computed`, `tokens`)
    and for decoded tokens alone (`decode_computed`, `decode_tokens`; `active` is None in prefill)."""
    if stats is None:
        return
    keys = ("computed", "tokens") + (() if active is None else ("decode_computed", "decode_tokens"))
    for key in keys:
        stats.setdefault(key, [0] * len(routes))
    for i, route in enumerate(routes):
        valid = route.valid if active is None else route.valid & active[:, None]
        computed, tokens = int((route.keep & valid).sum()), int(valid.sum())
        stats["computed"][i] += computed
        stats["tokens"][i] += tokens
        if active is not None:
            stats["decode_computed"][i] += computed
            stats["decode_tokens"][i] += tokens
