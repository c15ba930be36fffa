"""Settings of the token reward (docs/design.md, "The token reward (RTO)"): which mode, and the coefficients of each term."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rto.errors import FieldError
from rto.schema import Section

RewardMode = Literal["rto", "ppo", "dpo", "semi_rto", "delayed", "rs_ppo"]
WITH_DPO = ("rto", "dpo", "semi_rto", "delayed", "rs_ppo")  # modes that use the DPO term
WITH_SENTENCE = ("rto", "ppo", "semi_rto", "delayed", "rs_ppo")  # modes that add a sentence-level score


class RewardConfig(Section):
    """How each response token is rewarded.

    r_h = β1·clip(log π_dpo − log π_ref) − β2·(log π − log π_ref) + [h = last]·β3·r_RM

    * `rto`: all three terms (needs π_dpo and an RM).
    * `ppo`: sentence-level baseline, RM score at the last token + KL (no DPO term, β1 must stay 0).
    * `dpo`: DPO term + KL, no RM.
    * `semi_rto`: `rto` with each sentence's DPO terms summed at the token that ends the sentence.
    * `delayed`: `rto` with the DPO term's sum over the response at its last token.
    * `rs_ppo`: `rto` minus the DPO term's sum at the last token (the DPO term only shapes).
    """

    mode: RewardMode = Field(
        "rto",
        description="Reward mode: 'rto' (DPO + KL + RM), 'ppo' (RM + KL), 'dpo' (DPO + KL), "
        "'semi_rto' (rto with each sentence's DPO terms summed at its delimiter), "
        "'delayed' (rto with the DPO term summed at the last token), 'rs_ppo' (rto minus the DPO "
        "term's sum at the last token: shaping only).",
    )
    beta1: float = Field(
        0.05,
        description="β1, scale of the DPO token term log π_dpo − log π_ref. Used by 'rto' and 'dpo'; must be 0 for 'ppo'.",
    )
    clip: float = Field(
        0.05,
        description="c > 0, the DPO token term is clipped to [−c, c]. See `clip_scaled` for what is clipped.",
    )
    clip_scaled: bool = Field(
        True,
        description=(
            "True (default, as the authors' released script): clip the *scaled* term, "
            "clip(β1·(log π_dpo − log π_ref), −c, c). False (the paper's formula): β1·clip(log π_dpo − log π_ref, −c, c)."
        ),
    )
    beta2: float = Field(0.01, description="β2 ≥ 0, the KL coefficient on log π − log π_ref at every token.")
    beta3: float = Field(
        1.0, description="β3, scale of the reward-model score added at the last token ('rto', 'ppo')."
    )
    sentence_reward: Literal["rm", "ground_truth"] = Field(
        "rm",
        description="Source of the sentence-level score at the last token: 'rm' (the trained reward "
        "model) or 'ground_truth' (the built-in task's rule reward; no RM stage needed).",
    )
    rm_normalize: bool = Field(
        True, description="Normalise the RM score as (s − mean)/std with the mean/std saved by the RM stage."
    )
    rm_clamp: float = Field(
        10.0, description="The (normalised) RM score is clamped to [−rm_clamp, rm_clamp]; > 0."
    )
    sentence_delimiters: list[str] = Field(
        default_factory=lambda: [".", "!", "?"],
        min_length=1,
        description="Mode 'semi_rto': a response token ends a sentence when its text, stripped of "
        "spaces, ends with one of these",
    )
    missing_eos: Literal["score", "penalty"] = Field(
        "score",
        description="A response cut at max_new_tokens without EOS: 'score' gives it the sentence-level "
        "score at its last token like a finished one; 'penalty' gives it `missing_eos_penalty` there "
        "instead. Either way GAE treats the cut as the end of the episode (no bootstrap from the critic).",
    )
    missing_eos_penalty: float = Field(
        -1.0,
        allow_inf_nan=False,
        description="Added at the last token of a cut response when missing_eos is 'penalty', as is "
        "(not normalised, scaled by beta3 or clamped); must be finite.",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_beta1_for_ppo(cls, data: object) -> object:
        # `ppo` has no DPO term: β1 is 0 there whatever the file says, so that switching a job from
        # `rto` to the sentence-level baseline is one `--set reward.mode=ppo` (the resolved config
        # then shows beta1: 0, which is what runs).
        if isinstance(data, dict) and data.get("mode") == "ppo":
            data = {**data, "beta1": 0.0}
        return data

    @model_validator(mode="after")
    def _check_combination(self) -> RewardConfig:
        if self.mode in WITH_DPO and self.beta1 <= 0:
            raise FieldError(
                "beta1",
                f"beta1 must be > 0 in mode '{self.mode}' (got {self.beta1}); use mode 'ppo' for no DPO term",
            )
        if self.mode in WITH_SENTENCE and self.beta3 <= 0:
            raise FieldError(
                "beta3",
                f"beta3 must be > 0 in mode '{self.mode}' (got {self.beta3}); use mode 'dpo' for no RM term",
            )
        if self.beta2 < 0:
            raise FieldError("beta2", f"must be >= 0 (got {self.beta2})")
        if self.clip <= 0:
            raise FieldError("clip", f"must be > 0 (got {self.clip})")
        if self.rm_clamp <= 0:
            raise FieldError("rm_clamp", f"must be > 0 (got {self.rm_clamp})")
        if self.missing_eos == "penalty" and not self.uses_sentence_score:
            raise FieldError(
                "missing_eos",
                f"'penalty' replaces the sentence-level score of a cut response, and mode '{self.mode}' adds no "
                "sentence-level score; use mode 'rto' or 'ppo'",
            )
        return self

    @property
    def needs_rm(self) -> bool:
        """Whether this mode uses a reward model score."""
        return self.mode in WITH_SENTENCE and self.sentence_reward == "rm"

    @property
    def uses_sentence_score(self) -> bool:
        """Whether a sentence-level score (RM or ground truth) is added at the last token."""
        return self.mode in WITH_SENTENCE

    @property
    def needs_dpo(self) -> bool:
        """Whether this mode uses π_dpo log-probs."""
        return self.mode in WITH_DPO
