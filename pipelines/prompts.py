"""The prompt sets a PPO run draws from (`rto.ppo.trainer.PromptSet`): text prompts tokenised
once; a vision-language task's prompts live with its data (`pipelines.tasks.image_data.ImagePrompts`)."""

from __future__ import annotations

from rto.generation import encode_prompt, left_pad, prompt_text


class TextPrompts:
    """Prompt records of a text policy, tokenised once."""

    def __init__(self, tokenizer, records: list[dict]):
        self.records = records
        self.pad_token_id = tokenizer.pad_token_id
        self.ids = [encode_prompt(tokenizer, r["prompt"]) for r in records]
        self.labels = [prompt_text(r["prompt"]) for r in records]

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, indices: list[int]) -> dict:
        input_ids, attention_mask = left_pad([self.ids[i] for i in indices], self.pad_token_id)
        return {"input_ids": input_ids, "attention_mask": attention_mask}
