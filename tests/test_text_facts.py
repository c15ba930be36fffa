"""The facts variant of the text task: long contexts whose content decides the good answer."""

from __future__ import annotations

import random
import statistics

import pytest

from pipelines.tasks import text_facts as facts
from pipelines.tasks.text import TaskSettings, TextTask, build_tokenizer
from rto.config import TextTaskConfig

CONTEXT = (
    "facts : the cat loves a river . my dog hates the cat . a kind cat sees some tea . "
    "the dog finds a lamp . describe the cat"
)


def test_ground_truth_on_hand_made_answers():
    both = "the cat loves a river . a kind cat sees some tea ."
    assert facts.score(CONTEXT, both).reward == pytest.approx(2 * 0.5 + 0.5)
    reordered = "a kind cat sees some tea . the cat loves a river ."
    assert facts.reward(CONTEXT, reordered) == facts.reward(CONTEXT, both)
    assert facts.reward(CONTEXT, "the cat loves a river .") == pytest.approx(0.5)  # incomplete
    gt = facts.score(CONTEXT, both + " the cat hates the moon .")
    assert gt.made_up == 1 and gt.reward == pytest.approx(1.5 - 0.5)
    # "my dog hates the cat" is a fact about the dog
    gt = facts.score(CONTEXT, both + " my dog hates the cat .")
    assert gt.off_topic == 1 and gt.reward == pytest.approx(1.5 - 0.25)
    assert facts.reward(CONTEXT, both, terminated=False) == pytest.approx(1.5 - 1.0)
    assert facts.reward(CONTEXT, "") == pytest.approx(-0.5)


def test_the_prompt_decides_the_answer():
    """The same answer scores by the context it answers: right in one, made up in another."""
    other = CONTEXT.replace("the cat loves a river", "the cat hates a river")
    answer = "the cat loves a river . a kind cat sees some tea ."
    assert facts.reward(CONTEXT, answer) > 1.0
    assert facts.reward(other, answer) < 0.5
    assert facts.reward(CONTEXT.replace("describe the cat", "describe the dog"), answer) < 0


def test_ground_truth_resists_hacks():
    answer = "the cat loves a river . a kind cat sees some tea ."
    whole_context = CONTEXT.split(" : ", 1)[1].rsplit(" . ", 1)[0] + " ."
    repeated = answer + " the cat loves a river ."
    salad = "river a loves cat the . a kind cat sees some tea ."
    for hack in (whole_context, repeated, salad):
        assert facts.reward(CONTEXT, hack) < facts.reward(CONTEXT, answer), hack
    assert facts.reward(CONTEXT, whole_context) <= 1.0


def test_contexts_are_long_deterministic_and_answerable():
    settings = TaskSettings(seed=3, n_sft=64, n_pairs=64)
    records = facts.sft_records(settings, 40)
    assert records == facts.sft_records(settings, 40)
    tokenizer = build_tokenizer(2048, facts.facts_vocabulary())
    lengths = [len(tokenizer(r["prompt"][0]["content"]).input_ids) for r in records]
    assert 256 <= statistics.fmean(lengths) <= 320 and min(lengths) >= 240
    for r in records:
        prompt, answer = r["prompt"][0]["content"], r["completion"][0]["content"]
        gt = facts.score(prompt, answer)
        assert tokenizer.unk_token_id not in tokenizer(prompt + " " + answer).input_ids
        assert 2 <= gt.topic_facts <= 4 and gt.stated == gt.topic_facts and gt.made_up == gt.off_topic == 0
    flawed = [
        facts.flawed_answer(random.Random(i), facts.make_context(random.Random(i), 40)) for i in range(64)
    ]
    best = [facts.reward(facts.make_context(random.Random(i), 40).prompt, a) for i, a in enumerate(flawed)]
    assert statistics.fmean(best) < statistics.fmean(
        facts.reward(r["prompt"][0]["content"], r["completion"][0]["content"]) for r in records
    )


def test_preference_labels_mostly_prefer_the_better_answer():
    pairs = facts.preference_records(TaskSettings(seed=0, n_pairs=300), 40)
    agree = [
        facts.reward(r["prompt"][0]["content"], r["chosen"][0]["content"])
        >= facts.reward(r["prompt"][0]["content"], r["rejected"][0]["content"])
        for r in pairs
    ]
    assert 0.65 < statistics.fmean(agree) < 0.95  # noisy labels, as the plain task's


def test_the_task_builds_the_variant_and_scores_its_prompts(tmp_path):
    settings = TextTaskConfig(
        variant="facts", n_facts=12, n_sft=8, n_pairs=8, n_eval_pairs=4, n_prompts=4, n_eval=4
    )
    records, tokenizer = TextTask().build(settings, tmp_path)
    assert set(records) == {"sft", "pairs", "eval_pairs", "prompts", "eval_prompts"}
    assert "facts" in tokenizer.get_vocab() and tokenizer.model_max_length >= 1024
    record = records["sft"][0]
    answer = record["completion"][0]["content"]
    assert TextTask().record_reward(record, answer, True) == facts.reward(
        record["prompt"][0]["content"], answer
    )
    plain = {"prompt": [{"role": "user", "content": "describe the cat"}]}
    assert TextTask().record_reward(plain, "the cat loves a river .", True) != facts.reward(
        "describe the cat", "the cat loves a river ."
    )
