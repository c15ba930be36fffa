"""Token reward composition (docs/design.md, "The token reward (RTO)"): RTO, sentence-level PPO,
DPO-only, and two of the RTO paper's variants (the DPO term delayed to the last token; the DPO term
as pure shaping).

Tensor convention (shared by the whole PPO layer): per-token tensors are **response-aligned**
`[B, R]` — position t is the t-th generated token. `response_mask [B, R]` is 1 for real response
tokens up to and including EOS, 0 for padding and anything after EOS (so each row is 1…1 0…0).
`logprobs`, `ref_logprobs`, `dpo_logprobs` are log-probs of those tokens under π, π_ref, π_dpo;
`rm_scores [B]` is the raw reward-model score of each (prompt, response).

    r_h = DPO_h − β2·(log π − log π_ref)_h + [h = H]·β3·clamp(norm(r_RM), ±rm_clamp)

with DPO_h = clip(β1·(log π_dpo − log π_ref)_h, −c, c) when `clip_scaled` (the authors' released
script, the default) or β1·clip((log π_dpo − log π_ref)_h, −c, c) otherwise (the paper's formula).
H is the last position where `response_mask` is 1. A response cut at the length limit (no EOS)
gets its sentence-level score there too (`missing_eos: score`), or `missing_eos_penalty` in its
place (`missing_eos: penalty`).

`batch_rewards` is the entry point of the PPO step and of `rto score`: it takes the sentence-level
score from the configured source (the RM's raw score, or the task's ground truth) so that the two
cannot drift apart; `rm_score_column` is the trace's `rm_score` rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from reward.config import RewardConfig
from rto.registry import Registry


@dataclass(frozen=True)
class TokenRewards:
    """Each term of the token reward, all zero where `response_mask` is 0; `reward` is their sum."""

    reward: Tensor  # [B, R] total
    reward_dpo: Tensor  # [B, R] DPO term, scaled and clipped
    reward_kl: Tensor  # [B, R] −β2·(log π − log π_ref), the signed contribution
    reward_rm: Tensor  # [B, R] β3·r_RM at the last response token, 0 elsewhere
    rm_score: Tensor  # [B] β3·r_RM as added at the last token (0 in mode 'dpo' and for empty rows)


@dataclass(frozen=True)
class RewardInputs:
    response_mask: Tensor  # [B, R] float 0/1
    logprobs: Tensor  # [B, R]
    ref_logprobs: Tensor  # [B, R]
    dpo_logprobs: Tensor | None  # [B, R]
    rm_scores: Tensor | None  # [B] raw RM scores
    rm_mean: float | None
    rm_std: float | None
    terminated: Tensor | None = (
        None  # [B] bool: the response ended with EOS (needed by missing_eos 'penalty')
    )
    sentence_ends: Tensor | None = None  # [B, R] 1 where a token ends a sentence (mode 'semi_rto')


RewardMode = Callable[[RewardConfig, RewardInputs], TokenRewards]
REWARD_MODES: Registry[RewardMode] = Registry("reward mode")


# ---------------------------------------------------------------- terms (pure functions on tensors)


def last_token_index(response_mask: Tensor) -> Tensor:
    """[B] index of the last position where the mask is 1 (0 for an all-zero row)."""
    positions = torch.arange(response_mask.size(1), device=response_mask.device)
    return (positions * (response_mask > 0)).argmax(dim=1)


def at_last_token(scores: Tensor, response_mask: Tensor) -> Tensor:
    """[B] scores → [B, R] with each score at its row's last response token, zero elsewhere."""
    placed = torch.zeros(response_mask.shape, dtype=scores.dtype, device=scores.device)
    placed.scatter_(1, last_token_index(response_mask).unsqueeze(1), scores.unsqueeze(1))
    return placed * (response_mask > 0).any(dim=1, keepdim=True)


def kl_term(logprobs: Tensor, ref_logprobs: Tensor, response_mask: Tensor, beta2: float) -> Tensor:
    """[B, R] −β2·(log π − log π_ref), masked."""
    return -beta2 * (logprobs - ref_logprobs) * response_mask


def dpo_term(
    dpo_logprobs: Tensor,
    ref_logprobs: Tensor,
    response_mask: Tensor,
    beta1: float,
    clip: float,
    clip_scaled: bool,
) -> Tensor:
    """[B, R] the DPO token reward, scaled and clipped (see the module docstring), masked."""
    log_ratio = dpo_logprobs - ref_logprobs
    if clip_scaled:
        term = (beta1 * log_ratio).clamp(-clip, clip)
    else:
        term = beta1 * log_ratio.clamp(-clip, clip)
    return term * response_mask


def rm_term(
    rm_scores: Tensor, beta3: float, normalize: bool, mean: float | None, std: float | None, clamp: float
) -> Tensor:
    """[B] β3·clamp((s − mean)/std, ±clamp), or β3·clamp(s, ±clamp) without normalisation."""
    if normalize:
        rm_scores = (rm_scores - mean) / std
    return beta3 * rm_scores.clamp(-clamp, clamp)


# ---------------------------------------------------------------- modes


def _rm_rewards(config: RewardConfig, inputs: RewardInputs) -> tuple[Tensor, Tensor]:
    has_response = (inputs.response_mask > 0).any(dim=1)
    normalize = config.rm_normalize and config.sentence_reward == "rm"  # a rule reward is used as is
    score = rm_term(inputs.rm_scores, config.beta3, normalize, inputs.rm_mean, inputs.rm_std, config.rm_clamp)
    score = score.to(inputs.logprobs.dtype)
    if config.missing_eos == "penalty":
        cut = ~inputs.terminated.to(device=score.device, dtype=torch.bool)
        score = torch.where(cut, torch.full_like(score, config.missing_eos_penalty), score)
    score = score * has_response
    return at_last_token(score, inputs.response_mask), score


def _total(reward_dpo: Tensor, reward_kl: Tensor, reward_rm: Tensor, rm_score: Tensor) -> TokenRewards:
    return TokenRewards(reward_dpo + reward_kl + reward_rm, reward_dpo, reward_kl, reward_rm, rm_score)


def _dpo_and_kl(config: RewardConfig, inputs: RewardInputs) -> tuple[Tensor, Tensor]:
    """The two per-token terms `rto` and `dpo` share: the scaled, clipped DPO term and the KL."""
    reward_dpo = dpo_term(
        inputs.dpo_logprobs,
        inputs.ref_logprobs,
        inputs.response_mask,
        config.beta1,
        config.clip,
        config.clip_scaled,
    )
    reward_kl = kl_term(inputs.logprobs, inputs.ref_logprobs, inputs.response_mask, config.beta2)
    return reward_dpo, reward_kl


@REWARD_MODES.register("rto")
def rto_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """DPO term at every token + KL + RM score at the last token."""
    reward_dpo, reward_kl = _dpo_and_kl(config, inputs)
    reward_rm, rm_score = _rm_rewards(config, inputs)
    return _total(reward_dpo, reward_kl, reward_rm, rm_score)


@REWARD_MODES.register("ppo")
def ppo_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """Sentence-level baseline: RM score at the last token + KL."""
    reward_kl = kl_term(inputs.logprobs, inputs.ref_logprobs, inputs.response_mask, config.beta2)
    reward_rm, rm_score = _rm_rewards(config, inputs)
    return _total(torch.zeros_like(reward_kl), reward_kl, reward_rm, rm_score)


@REWARD_MODES.register("dpo")
def dpo_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """DPO term + KL, no RM."""
    reward_dpo, reward_kl = _dpo_and_kl(config, inputs)
    rm_score = torch.zeros(reward_kl.size(0), dtype=reward_kl.dtype, device=reward_kl.device)
    return _total(reward_dpo, reward_kl, torch.zeros_like(reward_kl), rm_score)


def sum_onto_segment_ends(term: Tensor, ends: Tensor, response_mask: Tensor) -> Tensor:
    """[B, R] each segment's sum of ``term`` at the token that closes it: a segment ends where
    ``ends`` is 1 and at the row's last response token; zero elsewhere and outside the mask."""
    mask = response_mask > 0
    closes = (ends > 0) & mask
    closes = closes | (at_last_token(torch.ones(mask.size(0), dtype=term.dtype), response_mask) > 0)
    out = torch.zeros_like(term)
    running = torch.zeros_like(term[:, 0])
    for t in range(term.size(1)):
        running = running + term[:, t] * mask[:, t]
        out[:, t] = torch.where(closes[:, t], running, 0.0)
        running = torch.where(closes[:, t], torch.zeros_like(running), running)
    return out


def sentence_end_mask(token_ids: Tensor, delimiter_ids: Tensor, response_mask: Tensor) -> Tensor:
    """[B, R] 1 where a response token is one of ``delimiter_ids`` (see `delimiter_token_ids`)."""
    return torch.isin(token_ids, delimiter_ids.to(token_ids.device)).to(response_mask.dtype) * response_mask


def delimiter_token_ids(tokenizer, delimiters: list[str]) -> Tensor:
    """The ids of the vocabulary's tokens whose text, stripped of spaces, ends with a delimiter
    ("." and also "," + "." merged into one BPE token like ".\n")."""
    ends = tuple(delimiters)
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_ids)
    ids = [
        i for i in sorted(vocab.values())
        if i not in special and tokenizer.decode([i]).strip().endswith(ends)
    ]  # fmt: skip
    return torch.tensor(ids, dtype=torch.long)


_DELIMITERS: dict[tuple[int, tuple[str, ...]], Tensor] = {}


def sentence_ends(config: RewardConfig, tokenizer, token_ids: Tensor, response_mask: Tensor) -> Tensor | None:
    """What `batch_rewards` takes as ``sentence_ends``: `sentence_end_mask` of the response tokens
    in mode `semi_rto` (the delimiter ids found once per tokenizer: it decodes the vocabulary),
    None in every other mode."""
    if config.mode != "semi_rto":
        return None
    key = (id(tokenizer), tuple(config.sentence_delimiters))
    if key not in _DELIMITERS:
        _DELIMITERS[key] = delimiter_token_ids(tokenizer, list(key[1]))
    return sentence_end_mask(token_ids, _DELIMITERS[key], response_mask)


@REWARD_MODES.register("semi_rto")
def semi_rto_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """The RTO paper's sentence-level ablation: `rto` with each sentence's DPO terms summed onto
    the token that ends it (`reward.sentence_delimiters`); what follows the last delimiter goes to
    the last token. KL per token and the RM score as in `rto`."""
    reward_dpo, reward_kl = _dpo_and_kl(config, inputs)
    reward_rm, rm_score = _rm_rewards(config, inputs)
    moved = sum_onto_segment_ends(reward_dpo, inputs.sentence_ends, inputs.response_mask)
    return _total(moved, reward_kl, reward_rm, rm_score)


@REWARD_MODES.register("delayed")
def delayed_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """The RTO paper's delayed-DPO ablation (DPPO): the same DPO, KL and RM terms as `rto`, but the
    DPO term's sum over the response given at its last token, Σ_h DPO_h; KL stays per token."""
    reward_dpo, reward_kl = _dpo_and_kl(config, inputs)
    reward_rm, rm_score = _rm_rewards(config, inputs)
    delayed = at_last_token(reward_dpo.sum(dim=1), inputs.response_mask)
    return _total(delayed, reward_kl, reward_rm, rm_score)


@REWARD_MODES.register("rs_ppo")
def shaped_rewards(config: RewardConfig, inputs: RewardInputs) -> TokenRewards:
    """`rto` minus the DPO term's sum at the last token: DPO_h at every token and −Σ_h DPO_h at the
    last, so the DPO terms of a response add up to 0 and its return (γ = 1) is the sentence-level
    one plus the KL; the DPO term only shapes when the reward arrives (the sum subtracted is of the
    same scaled, clipped terms, so the cancellation is exact)."""
    reward_dpo, reward_kl = _dpo_and_kl(config, inputs)
    reward_rm, rm_score = _rm_rewards(config, inputs)
    shaped = reward_dpo - at_last_token(reward_dpo.sum(dim=1), inputs.response_mask)
    return _total(shaped, reward_kl, reward_rm, rm_score)


# ---------------------------------------------------------------- entry point


def compose_token_rewards(
    config: RewardConfig,
    *,
    response_mask: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    dpo_logprobs: Tensor | None = None,
    rm_scores: Tensor | None = None,
    rm_mean: float | None = None,
    rm_std: float | None = None,
    terminated: Tensor | None = None,
    sentence_ends: Tensor | None = None,
) -> TokenRewards:
    """Per-token rewards of a batch in `config.mode`. All `[B, R]` inputs are response-aligned;
    `rm_scores [B]` are raw scores, normalised with (`rm_mean`, `rm_std`) when `config.rm_normalize`;
    `terminated [B]` (ended with EOS) is needed by `missing_eos: penalty`.
    Tensors a mode does not use may be None; ones it needs raise ValueError when missing."""
    inputs = RewardInputs(
        response_mask=_check_mask(response_mask, logprobs.dtype),
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        dpo_logprobs=dpo_logprobs,
        rm_scores=rm_scores,
        rm_mean=rm_mean,
        rm_std=rm_std,
        terminated=terminated,
        sentence_ends=sentence_ends,
    )
    _validate(config, inputs)
    return REWARD_MODES.get(config.mode)(config, inputs)


def batch_rewards(
    config: RewardConfig,
    *,
    response_mask: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    terminated: Tensor,
    dpo_logprobs: Tensor | None = None,
    rm_scores: Tensor | None = None,
    gt_rewards: Tensor | list[float] | None = None,
    rm_mean: float | None = None,
    rm_std: float | None = None,
    sentence_ends: Tensor | None = None,
) -> TokenRewards:
    """The token rewards of a scored batch, as the PPO step and `rto score` both compute them: the
    sentence-level score is the RM's raw score (`sentence_reward: rm`, normalised as configured) or
    the task's ground truth (`sentence_reward: ground_truth`, used as is); `terminated [B]` tells
    which responses ended with EOS (for `missing_eos`); `sentence_ends [B, R]` where sentences end
    (mode `semi_rto`: `sentence_end_mask`)."""
    sentence = None
    if config.uses_sentence_score:
        if config.sentence_reward == "ground_truth":
            if gt_rewards is None:
                raise ValueError("sentence_reward 'ground_truth' needs the task's ground truth (gt_rewards)")
            sentence = torch.as_tensor(gt_rewards, dtype=torch.float32)
        else:
            sentence = rm_scores
    return compose_token_rewards(
        config,
        response_mask=response_mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        dpo_logprobs=dpo_logprobs if config.needs_dpo else None,
        rm_scores=sentence,
        rm_mean=rm_mean,
        rm_std=rm_std,
        terminated=torch.as_tensor(terminated, dtype=torch.bool),
        sentence_ends=sentence_ends,
    )


def rm_score_column(config: RewardConfig, rewards: TokenRewards) -> Tensor | None:
    """The trace's `rm_score` column: the sentence-level term as added at the last token (RM score
    or ground truth, or the missing-EOS penalty), null in a mode that adds none."""
    return rewards.rm_score if config.uses_sentence_score else None


def separation_by_ground_truth(term: Tensor, response_mask: Tensor, gt_rewards) -> dict[str, float]:
    """How well a per-token reward term, summed over each response, orders the responses the way
    the ground truth does: ``auc`` is the share of pairs with different ground truth in which the
    better response has the larger sum (ties count half; 0.5 is no information), and with a 0/1
    ground truth ``right`` / ``wrong`` are the mean sums of each group. Empty when every response
    has the same ground truth."""
    sums = (term * response_mask).sum(dim=1).double()
    gt = torch.as_tensor(gt_rewards, dtype=torch.float64)
    better = gt[:, None] > gt[None, :]
    if not bool(better.any()):
        return {}
    larger = (sums[:, None] > sums[None, :]).double() + 0.5 * (sums[:, None] == sums[None, :]).double()
    out = {"auc": float(larger[better].mean())}
    if bool(((gt == 0) | (gt == 1)).all()):
        out["right"] = float(sums[gt == 1].mean())
        out["wrong"] = float(sums[gt == 0].mean())
    return out


def _check_mask(response_mask: Tensor, dtype: torch.dtype) -> Tensor:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, R], got shape {tuple(response_mask.shape)}")
    mask = response_mask.to(dtype)
    if not torch.all((mask == 0) | (mask == 1)):
        raise ValueError("response_mask must contain only 0 and 1")
    if torch.any(mask[:, 1:] > mask[:, :-1]):
        raise ValueError("response_mask must be 1…1 then 0…0 in each row (response-aligned, right-padded)")
    return mask


def _validate(config: RewardConfig, inputs: RewardInputs) -> None:
    shape = tuple(inputs.response_mask.shape)
    per_token = {"logprobs": inputs.logprobs, "ref_logprobs": inputs.ref_logprobs}
    if config.needs_dpo:
        per_token["dpo_logprobs"] = inputs.dpo_logprobs
    if config.mode == "semi_rto":
        per_token["sentence_ends"] = inputs.sentence_ends
    for name, tensor in per_token.items():
        if tensor is None:
            raise ValueError(f"reward mode '{config.mode}' needs {name}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} like response_mask")
    if config.uses_sentence_score:
        if inputs.rm_scores is None:
            raise ValueError(f"reward mode '{config.mode}' needs rm_scores (RM or ground-truth scores)")
        if tuple(inputs.rm_scores.shape) != shape[:1]:
            raise ValueError(f"rm_scores has shape {tuple(inputs.rm_scores.shape)}, expected ({shape[0]},)")
        if config.missing_eos == "penalty":
            if inputs.terminated is None or tuple(inputs.terminated.shape) != shape[:1]:
                raise ValueError(
                    f"missing_eos 'penalty' needs terminated [B={shape[0]}] (which responses ended with EOS)"
                )
        if config.rm_normalize and config.sentence_reward == "rm":
            if inputs.rm_mean is None or inputs.rm_std is None:
                raise ValueError(
                    "rm_normalize is set but rm_mean/rm_std were not given (saved by the rm stage)"
                )
            if not inputs.rm_std > 0:
                raise ValueError(f"rm_std must be > 0, got {inputs.rm_std}")
