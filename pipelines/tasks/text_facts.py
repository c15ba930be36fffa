"""The `facts` variant of the built-in text task: long prompts whose content decides the answer.

The user's message is a context of facts, sentences of the text task's grammar about a handful of
subjects, shuffled, followed by a question about one of them:

    facts : the cat sees a river . the dog hates the cat . the cat kindly loves some tea . ...
    describe the cat

(`n_facts` facts, about 7 tokens each: 40 facts make a prompt of about 290 tokens). A good
answer states the facts whose *subject* is the asked thing, each once, and nothing else:

    r(x, y) = Σ_sentences [ +0.5 · (a context fact about the topic, not said before)
                            − 0.5 · (a grammatical sentence about the topic that the context does
                                     not state: a made-up fact)
                            − 0.25 · (a sentence about another subject, stated or not)
                            − 0.5 · (ungrammatical, or repeated) ]
              + 0.5 · [every fact about the topic stated]
              − 1.0 · [no EOS]  − 0.5 · #sentences beyond `MAX_ANSWER_SENTENCES`

so the reward is decided by the prompt's content (the same answer to another context scores
differently), and the usual hacks do not pay: copying the whole context costs 0.25 per other
fact, repeating a fact costs 0.5, a plausible made-up fact costs as much as a right one earns.
"The dog hates the cat" is a fact about the dog. Every fact names its subject as ``the <noun>``,
so an answer can be copied from the context (an induction pattern a small model can learn). Everything is deterministic given a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pipelines.tasks.text import (
    DETERMINERS,
    NOUNS,
    PERIOD,
    PROMPT_VERBS,
    TaskSettings,
    is_grammatical,
    make_sentence,
    prompt_topic,
    split_sentences,
    vocabulary,
)

CONTEXT_WORDS = ["facts", ":"]
FACT_CREDIT = 0.5
MADE_UP_PENALTY = 0.5
OFF_TOPIC_PENALTY = 0.25
BAD_SENTENCE_PENALTY = 0.5
COMPLETE_BONUS = 0.5
NO_EOS_PENALTY = 1.0
EXTRA_SENTENCE_PENALTY = 0.5
MAX_ANSWER_SENTENCES = 5
SUBJECTS = 8
"""Subjects per context: the topic and seven distractors."""
TOPIC_FACTS = (2, 4)
"""Facts about the topic per context (inclusive range)."""


def facts_vocabulary() -> list[str]:
    """The text task's vocabulary plus the context marker (appended: the plain task's ids stay)."""
    return vocabulary() + [w for w in CONTEXT_WORDS if w not in vocabulary()]


def subject(sentence: list[str]) -> str | None:
    """The subject noun of a grammatical sentence (``D [J] N ...``)."""
    for word in sentence[:3]:
        if word in NOUNS:
            return word
    return None


def parse_prompt(prompt: str) -> tuple[list[tuple[str, ...]], str | None]:
    """(the context's fact sentences as word tuples with their period, the asked noun)."""
    words = prompt.split()
    if words[:2] != CONTEXT_WORDS:
        return [], prompt_topic(prompt)
    body = words[2:]
    cut = max((i for i, w in enumerate(body) if w == PERIOD), default=-1) + 1
    facts = [tuple(s) for s in split_sentences(body[:cut])]
    return facts, prompt_topic(" ".join(body[cut:]))


@dataclass(frozen=True)
class FactsGroundTruth:
    reward: float
    n_sentences: int
    stated: int  # context facts about the topic stated (once each)
    topic_facts: int  # facts about the topic in the context
    made_up: int
    off_topic: int
    terminated: bool


def score(prompt: str, response: str, terminated: bool = True) -> FactsGroundTruth:
    """Ground truth of `response` (words separated by spaces, without EOS) to a facts prompt."""
    facts, topic = parse_prompt(prompt)
    wanted = {f for f in facts if subject(list(f)) == topic}
    sentences = split_sentences(response.split())
    reward = 0.0 if sentences else -BAD_SENTENCE_PENALTY
    said: set[tuple[str, ...]] = set()
    stated = made_up = off_topic = 0
    for k, sentence in enumerate(sentences):
        key = tuple(sentence)
        if sentence[-1] != PERIOD or not is_grammatical(sentence[:-1]) or key in said:
            reward -= BAD_SENTENCE_PENALTY
            continue
        said.add(key)
        if k >= MAX_ANSWER_SENTENCES:
            reward -= EXTRA_SENTENCE_PENALTY
        elif key in wanted:
            stated += 1
            reward += FACT_CREDIT
        elif subject(sentence) == topic:
            made_up += 1
            reward -= MADE_UP_PENALTY
        else:
            off_topic += 1
            reward -= OFF_TOPIC_PENALTY
    if wanted and stated == len(wanted):
        reward += COMPLETE_BONUS
    if not terminated:
        reward -= NO_EOS_PENALTY
    return FactsGroundTruth(reward, len(sentences), stated, len(wanted), made_up, off_topic, terminated)


def reward(prompt: str, response: str, terminated: bool = True) -> float:
    return score(prompt, response, terminated).reward


# ---------------------------------------------------------------- generators


@dataclass(frozen=True)
class Context:
    prompt: str
    topic_facts: list[str]  # in context order
    other_facts: list[str]
    topic: str


def fact_sentence(rng: random.Random, owner: str) -> list[str]:
    """A grammatical sentence whose subject is ``the <owner>`` (``the cat often sees a river .``)."""
    words = make_sentence(rng, owner, tone=rng.uniform(-1, 1))
    return ["the", owner] + words[words.index(owner) + 1 :]


def make_context(rng: random.Random, n_facts: int) -> Context:
    """`n_facts` distinct facts about `SUBJECTS` subjects (2 to 4 about the asked one), shuffled."""
    subjects = rng.sample(NOUNS, SUBJECTS)
    topic = subjects[0]
    n_topic = min(rng.randint(*TOPIC_FACTS), n_facts)
    owners = [topic] * n_topic + [rng.choice(subjects[1:]) for _ in range(n_facts - n_topic)]
    facts: list[tuple[str, str]] = []
    seen: set[str] = set()
    for owner in owners:
        while True:
            sentence = " ".join(fact_sentence(rng, owner))
            if sentence not in seen:
                break
        seen.add(sentence)
        facts.append((owner, sentence))
    rng.shuffle(facts)
    question = f"{rng.choice(PROMPT_VERBS)} {rng.choice(DETERMINERS[:2])} {topic}"
    prompt = " ".join(["facts", ":", *(s for _, s in facts), question])
    return Context(
        prompt,
        [s for o, s in facts if o == topic],
        [s for o, s in facts if o != topic],
        topic,
    )


def good_answer(context: Context) -> str:
    return " ".join(context.topic_facts)


def flawed_answer(rng: random.Random, context: Context) -> str:
    """A plausible mistake: a fact dropped, made up, about another subject, repeated, or cut off."""
    facts = list(context.topic_facts)
    kind = rng.choice(["drop", "made_up", "off_topic", "repeat", "cut", "order"])
    if kind == "drop" and len(facts) > 1:
        facts.pop(rng.randrange(len(facts)))
    elif kind == "made_up":
        fake = " ".join(fact_sentence(rng, context.topic))
        facts[rng.randrange(len(facts))] = fake
    elif kind == "off_topic":
        facts.insert(rng.randrange(len(facts) + 1), rng.choice(context.other_facts))
    elif kind == "repeat":
        facts.insert(rng.randrange(len(facts) + 1), rng.choice(facts))
    elif kind == "cut":
        words = " ".join(facts).split()
        return " ".join(words[: max(1, rng.randrange(len(words)))])
    else:
        rng.shuffle(facts)  # the same facts in another order: as good
    return " ".join(facts)


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def sft_records(settings: TaskSettings, n_facts: int) -> list[dict]:
    rng = random.Random(f"facts-sft-{settings.seed}")
    records = []
    for _ in range(settings.n_sft):
        context = make_context(rng, n_facts)
        records.append({"prompt": user(context.prompt), "completion": assistant(good_answer(context))})
    return records


def preference_records(
    settings: TaskSettings, n_facts: int, n: int | None = None, split: str = "train"
) -> list[dict]:
    """Pairs of answers to one context (good or flawed), labelled by a noisy Bradley-Terry annotator."""
    rng = random.Random(f"facts-pairs-{split}-{settings.seed}")
    records = []
    n = settings.n_pairs if n is None else n
    while len(records) < n:
        context = make_context(rng, n_facts)
        a = good_answer(context) if rng.random() < 0.5 else flawed_answer(rng, context)
        b = flawed_answer(rng, context)
        if a == b:
            continue
        ra, rb = reward(context.prompt, a), reward(context.prompt, b)
        p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / settings.label_temperature))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        records.append(
            {"prompt": user(context.prompt), "chosen": assistant(chosen), "rejected": assistant(rejected)}
        )
    return records


def prompt_records(settings: TaskSettings, n_facts: int, n: int, split: str) -> list[dict]:
    rng = random.Random(f"facts-prompts-{split}-{settings.seed}")
    return [{"prompt": user(make_context(rng, n_facts).prompt)} for _ in range(n)]
