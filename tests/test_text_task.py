"""The built-in text task: tokenizer round trip, ground truth on hand-made answers, generators."""

from __future__ import annotations

import math

from transformers import AutoTokenizer

from pipelines.tasks import text as task

PROMPT = "describe the cat"


def test_tokenizer_round_trip_through_files(tmp_path):
    tokenizer = task.build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    sentence = "the kind cat warmly loves a happy dog ."
    ids = loaded(sentence)["input_ids"]
    assert len(ids) == len(sentence.split())  # one token per word, no extra specials
    assert loaded.decode(ids) == sentence
    assert loaded.eos_token == "<eos>" and loaded.pad_token == "<pad>"
    assert len(loaded) == len(task.vocabulary())
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": sentence}]
    rendered = loaded.apply_chat_template(conversation, tokenize=False)
    assert rendered.split() == ["<|user|>", *PROMPT.split(), "<|assistant|>", *sentence.split(), "<eos>"]
    prompt_ids = loaded.apply_chat_template(conversation[:1], add_generation_prompt=True)["input_ids"]
    assert loaded.convert_ids_to_tokens(prompt_ids)[-1] == "<|assistant|>"
    assert loaded.decode(loaded("the zebra")["input_ids"]) == "the <unk>"


def test_grammar():
    assert task.is_grammatical("the cat loves a dog".split())
    assert task.is_grammatical("my kind cat warmly loves the happy dog".split())
    assert not task.is_grammatical("cat the loves a dog".split())
    assert not task.is_grammatical("the cat loves".split())
    assert not task.is_grammatical("the kind kind cat loves a dog".split())


def test_ground_truth_on_hand_made_answers():
    # one neutral sentence on topic: 0.25 credit + 0.5 topic
    assert task.reward(PROMPT, "the cat sees a dog .") == 0.75
    # warm words earn 0.25 each: kind, warmly, loves, happy
    assert task.reward(PROMPT, "the kind cat warmly loves a happy dog .") == 0.75 + 4 * 0.25
    # nasty words cost as much
    assert task.reward(PROMPT, "the cruel cat hates a sad dog .") == 0.75 - 3 * 0.25
    # off topic: no bonus
    assert task.reward(PROMPT, "the dog sees a cat .") == 0.25


def test_ground_truth_resists_hacks():
    good = "the kind cat loves a happy dog . a gentle bird helps our brave child ."
    assert task.reward(PROMPT, good) > 2.0
    salad = "kind happy loves gentle brave warmly bright lovely ."
    assert task.reward(PROMPT, salad) < 0  # sentiment words outside a sentence earn nothing
    repeated = "the kind cat loves a happy dog . the kind cat loves a happy dog ."
    assert task.reward(PROMPT, repeated) < task.reward(PROMPT, "the kind cat loves a happy dog .")
    same_words = "the kind cat loves a happy dog . a kind dog loves the happy cat ."
    assert task.reward(PROMPT, same_words) < task.reward(PROMPT, good)  # repeated words earn no sentiment
    sentences = ["the kind cat loves a happy dog .", "a gentle bird helps our brave child .",
                 "my warm friend praises the clever king .", "some joyful baker hugs a calm queen .",
                 "the lovely sun comforts a cheerful boat ."]  # fmt: skip
    rambling, four = " ".join(sentences), " ".join(sentences[:4])
    assert task.reward(PROMPT, rambling) < task.reward(PROMPT, four)  # past four sentences costs
    assert task.reward(PROMPT, good, terminated=False) == task.reward(PROMPT, good) - 1.0
    assert task.reward(PROMPT, "the kind cat loves a") < 0  # cut off mid-sentence
    assert task.reward(PROMPT, "") < 0


def test_grammaticality():
    assert task.grammaticality("the cat sees a dog . cat the sees .") == 0.5
    assert task.grammaticality("") == 0.0


def test_generators_are_deterministic_and_fluent():
    settings = task.TaskSettings(seed=3, n_sft=50, n_pairs=50)
    assert task.sft_records(settings) == task.sft_records(settings)
    assert task.sft_records(settings) != task.sft_records(task.TaskSettings(seed=4, n_sft=50))
    for record in task.sft_records(settings):
        assert task.grammaticality(record["completion"][0]["content"]) == 1.0
    assert task.preference_records(settings) == task.preference_records(settings)


def test_preference_labels_follow_a_noisy_bradley_terry_annotator():
    settings = task.TaskSettings(seed=0, n_pairs=1500, label_temperature=0.5)
    pairs = task.preference_records(settings)
    agree, expected = 0, 0.0
    for p in pairs:
        prompt = p["prompt"][0]["content"]
        rc, rr = (
            task.reward(prompt, p["chosen"][0]["content"]),
            task.reward(prompt, p["rejected"][0]["content"]),
        )
        agree += rc > rr
        hi = max(rc, rr) - min(rc, rr)
        expected += 1 / (1 + math.exp(-hi / 0.5)) if rc != rr else 0.5
    # labels agree with the ground truth about as often as the annotator model says, not always
    assert 0.6 < agree / len(pairs) < 0.95
    assert abs(agree / len(pairs) - expected / len(pairs)) < 0.08
