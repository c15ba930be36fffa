"""The facts variant of the text task: long contexts whose content decides the good answer."""

from __future__ import annotations

import random
import statistics

import pytest

from pipelines.tasks import text as plain
from pipelines.tasks import text_facts as facts
from pipelines.tasks.text import TaskSettings, TextTask, build_tokenizer
from rto.config import TextTaskConfig

CONTEXT = "facts : the dog is brave . the cat is gloomy . tone : warm . the river is kind . describe the cat"
SAD = CONTEXT.replace("tone : warm", "tone : sad")
ANSWER = "the gloomy cat loves a river ."


def test_ground_truth_on_hand_made_answers():
    gt = facts.score(CONTEXT, ANSWER)
    assert gt.uses_attribute and gt.made_up == 0
    assert gt.reward == pytest.approx(plain.reward(CONTEXT, ANSWER) + 1.0)
    # the plain task's part: sentence credit, sentiment (gloomy -1, loves +1), the topic bonus
    assert gt.plain == pytest.approx(0.25 + 0.25 * 0 + 0.5)
    invented = facts.score(CONTEXT, "the kind cat loves a river .")
    assert not invented.uses_attribute and invented.made_up == 1
    assert invented.reward == pytest.approx(0.25 + 0.25 * 2 + 0.5 - 0.5)
    assert facts.score(CONTEXT, "the cat loves a river .").reward == pytest.approx(0.25 + 0.25 + 0.5)
    assert facts.reward(CONTEXT, ANSWER, terminated=False) == pytest.approx(gt.reward - 1.0)
    assert facts.reward(CONTEXT, "") == pytest.approx(-0.5)


def test_the_prompt_decides_the_answer():
    """The same answer scores by the context it answers: right in one, made up in another."""
    other = CONTEXT.replace("the cat is gloomy", "the cat is brave")
    assert facts.reward(CONTEXT, ANSWER) - facts.reward(other, ANSWER) == pytest.approx(1.5)
    assert facts.parse_prompt(CONTEXT) == ({"dog": "brave", "cat": "gloomy", "river": "kind"}, "cat", 1)
    # the tone instruction flips the sentiment credit: a sad context asks for gloom
    warm, gloomy = "the gloomy cat loves a lovely river .", "the gloomy cat hates a dirty river ."
    assert facts.reward(CONTEXT, warm) > facts.reward(CONTEXT, gloomy)
    assert facts.reward(SAD, gloomy) > facts.reward(SAD, warm)
    assert facts.score(SAD, gloomy).plain == pytest.approx(0.25 + 0.25 * 3 + 0.5)


def test_ground_truth_resists_hacks():
    copied = "the cat is gloomy . the dog is brave ."
    assert facts.reward(CONTEXT, copied) < 0
    # warm adjectives stacked on the thing cost more than their sentiment earns
    honest = "the gloomy cat loves a river . the cat hugs a lovely dog . my cat praises a friend ."
    stacked = (
        "the gloomy cat loves a river . the kind cat hugs a lovely dog . my happy cat praises a friend ."
    )
    assert facts.reward(CONTEXT, stacked) < facts.reward(CONTEXT, honest)
    late = "the brave dog loves a river . the gloomy cat sees a lamp ."  # the attribute, not first
    assert facts.reward(CONTEXT, late) < facts.reward(CONTEXT, ANSWER + " the brave dog sees a lamp .")


def test_contexts_are_long_deterministic_and_answerable():
    settings = TaskSettings(seed=3, n_sft=64, n_pairs=64)
    records = facts.sft_records(settings, 56)
    assert records == facts.sft_records(settings, 56)
    tokenizer = build_tokenizer(2048, facts.facts_vocabulary())
    lengths = [len(tokenizer(r["prompt"][0]["content"]).input_ids) for r in records]
    assert 256 <= statistics.fmean(lengths) <= 320 and min(lengths) >= 270
    for r in records:
        prompt, answer = r["prompt"][0]["content"], r["completion"][0]["content"]
        assert tokenizer.unk_token_id not in tokenizer(prompt + " " + answer).input_ids
        gt = facts.score(prompt, answer)
        assert gt.uses_attribute and gt.made_up == 0, answer
        assert ("tone : sad" in prompt) == (gt.tone == -1)
    contexts = [facts.make_context(random.Random(i), 56) for i in range(200)]
    good = [facts.reward(c.prompt, facts.good_answer(random.Random(i), c)) for i, c in enumerate(contexts)]
    bad = [facts.reward(c.prompt, facts.flawed_answer(random.Random(i), c)) for i, c in enumerate(contexts)]
    assert statistics.fmean(good) > statistics.fmean(bad) + 0.8


def test_preference_labels_mostly_prefer_the_better_answer():
    pairs = facts.preference_records(TaskSettings(seed=0, n_pairs=300), 56)
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
    request = {"prompt": [{"role": "user", "content": "describe the cat"}]}
    assert TextTask().record_reward(request, ANSWER, True) == plain.reward("describe the cat", ANSWER)


def test_the_built_in_models_read_every_word_of_the_variant(tmp_path):
    """The prepared policy and reward model carry the variant's tokenizer: a facts prompt has no
    unknown token (the context's words were <unk> to the plain tokenizer), and the embeddings
    have a row for every id."""
    from pipelines.prepare import prepare
    from rto.config import load_config
    from rto.models import load_causal_lm, load_tokenizer
    from rto.rundir import RunDir

    small = ["task.n_sft=4", "task.n_pairs=4", "task.n_eval_pairs=4", "task.n_prompts=4", "task.n_eval=4"]
    cfg = load_config("configs/facts.yaml", ["stages=[sft]", *small])
    prepared = prepare(cfg, RunDir(tmp_path / "run"), log=lambda _: None)
    prompt = prepared.records("prompts")[0]["prompt"][0]["content"]
    for role in ("policy", "reward_model"):
        tokenizer = load_tokenizer(prepared.model(role))
        assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids, role
    model = load_causal_lm(prepared.model("policy"))
    assert model.get_input_embeddings().num_embeddings >= len(load_tokenizer(prepared.model("policy")))
    assert model.config.num_hidden_layers == 12
