"""Our DPO token term agrees with TRL: β·Σ_h (log π − log π_ref) over the chosen response equals
TRL 1.16 DPOTrainer's `rewards/chosen` on the same model pair and preference pair.

TRL's token layout (non-conversational data): it appends the EOS *string* to chosen/rejected,
tokenizes prompt and prompt+completion separately (the completion starts where they diverge), adds
no BOS unless the tokenizer's own post-processor does, and sums log-probs over completion tokens
including that EOS. We build the same layout from plain tokenizer calls and check it against TRL's.
"""

from __future__ import annotations

import pytest
import torch
from _reward_fixtures import perturbed, save, tiny_lm, tiny_tokenizer
from datasets import Dataset
from transformers import AutoModelForCausalLM

from reward.scoring import FrozenLM

BETA = 0.1
PAIR = {"prompt": "the cat", "chosen": " sat on the red mat", "rejected": " ran home fast"}


def left_prompt_right_response(prompt_ids: list[int], responses: list[list[int]], pad_id: int):
    """sequences [B, P + R], attention_mask: one prompt, left-padded (trivially), responses right-padded."""
    width = max(len(r) for r in responses)
    rows = [prompt_ids + r + [pad_id] * (width - len(r)) for r in responses]
    masks = [[1] * len(prompt_ids) + [1] * len(r) + [0] * (width - len(r)) for r in responses]
    return torch.tensor(rows), torch.tensor(masks)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpo_term_matches_trl_rewards(tmp_path):
    trl = pytest.importorskip("trl")
    tokenizer = tiny_tokenizer()
    ref_dir = save(tiny_lm(0, vocab_size=len(tokenizer)), tmp_path / "ref", tokenizer)
    policy_dir = save(
        perturbed(tiny_lm(0, vocab_size=len(tokenizer)), scale=3.0), tmp_path / "policy", tokenizer
    )

    dataset = Dataset.from_list([PAIR])
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "out"),
        report_to="none",
        use_cpu=True,
        per_device_eval_batch_size=2,
        beta=BETA,
    )
    trainer = trl.DPOTrainer(
        model=str(policy_dir),
        ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
    )
    metrics = trainer.evaluate()

    # Our layout: prompt tokens, then the response tokens + EOS (no BOS: this tokenizer adds none).
    prompt_ids = tokenizer(PAIR["prompt"])["input_ids"]
    chosen_ids = tokenizer(PAIR["chosen"])["input_ids"] + [tokenizer.eos_token_id]
    rejected_ids = tokenizer(PAIR["rejected"])["input_ids"] + [tokenizer.eos_token_id]
    trl_row = trainer.eval_dataset[0]
    assert (trl_row["prompt_ids"], trl_row["chosen_ids"], trl_row["rejected_ids"]) == (
        prompt_ids,
        chosen_ids,
        rejected_ids,
    )

    sequences, attention_mask = left_prompt_right_response(
        prompt_ids, [chosen_ids, rejected_ids], tokenizer.pad_token_id
    )
    policy_logprobs = FrozenLM(policy_dir).logprobs(sequences, attention_mask, prompt_len=len(prompt_ids))
    ref_logprobs = FrozenLM(ref_dir).logprobs(sequences, attention_mask, prompt_len=len(prompt_ids))
    rewards = BETA * (policy_logprobs - ref_logprobs).sum(dim=1)  # padding is already 0

    assert abs(metrics["eval_rewards/chosen"]) > 1e-2  # the pair of models really differs
    assert rewards[0].item() == pytest.approx(metrics["eval_rewards/chosen"], abs=1e-4)
    assert rewards[1].item() == pytest.approx(metrics["eval_rewards/rejected"], abs=1e-4)
    assert policy_logprobs[0].sum().item() == pytest.approx(metrics["eval_logps/chosen"], abs=1e-4)
