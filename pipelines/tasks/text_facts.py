"""The `facts` variant of the built-in text task: long prompts whose content decides the answer.

The user's message is a context of facts, one attribute for each of `n_facts` subjects and one
tone instruction (``tone : warm .`` or ``tone : sad .``) somewhere among them, followed by the text
task's request about one subject:

    facts : the cat is gloomy . the river is kind . tone : sad . the dog is brave . ... describe the cat

(5 tokens a fact: 56 facts make a prompt of about 290 tokens). A good answer is what the plain task
asks for (one to four grammatical, non-repetitive sentences about the asked thing, ended with
EOS) in the tone the context asks for, whose first sentence gives the thing the attribute the
context states:

    r(x, y) = r_plain(x, y) with each sentence's sentiment credit 0.25 · tone · Σ sentiment(w)
              + 1.0 · [the first sentence opens with ``DET <attribute> <thing>``]
              − 0.5 · #(times the thing is given another adjective: a made-up attribute)

so the reward is decided by the prompt's content (the same answer to another context scores
differently), and the usual hacks do not pay: copying the context is ungrammatical here (``is`` is
no verb of the grammar), and stacking warm adjectives on the thing is a made-up attribute. The
attribute may be out of tone ("the gloomy cat" in a warm answer): it still pays more than an
invention. Two uses of the context, of two difficulties: the tone is one lookup of a fixed key
anywhere in it (a small model learns it from SFT); the attribute needs the asked noun first, then
the fact about it (a two-step recall the 12-layer recipe does not learn from SFT alone).
Everything is deterministic given a seed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from pipelines.tasks import text as plain
from pipelines.tasks.text import (
    ADJ_NEG,
    ADJ_NEU,
    ADJ_POS,
    DETERMINERS,
    NOUNS,
    PERIOD,
    POS_TAG,
    PROMPT_VERBS,
    TaskSettings,
    is_grammatical,
    make_sentence,
    prompt_topic,
    split_sentences,
    vocabulary,
)

CONTEXT_WORDS = ["facts", ":", "is", "tone"]
TONES = {"warm": 1, "sad": -1}
"""The tone instruction's words and the sign they give the sentiment credit."""
ADJECTIVES = ADJ_POS + ADJ_NEU + ADJ_NEG
ATTRIBUTE_BONUS = 1.0
MADE_UP_PENALTY = 0.5
MAX_FACTS = len(NOUNS)
"""At most one fact per noun: a context names each subject once."""


def facts_vocabulary() -> list[str]:
    """The text task's vocabulary plus the context's words (appended: the plain task's ids stay)."""
    return vocabulary() + [w for w in CONTEXT_WORDS if w not in vocabulary()]


def parse_prompt(prompt: str) -> tuple[dict[str, str], str | None, int]:
    """(the context's attribute of each subject, the asked noun, the tone's sign: 1 warm, -1 sad)."""
    words = prompt.split()
    attributes: dict[str, str] = {}
    tone = 1
    if words[:2] == CONTEXT_WORDS[:2]:
        body = words[2:]
        for i in range(len(body) - 3):
            if body[i] == "tone" and body[i + 1] == ":" and body[i + 3] == PERIOD:
                tone = TONES.get(body[i + 2], 1)
            elif i + 4 < len(body) and body[i] == "the" and body[i + 2] == "is" and body[i + 4] == PERIOD:
                attributes[body[i + 1]] = body[i + 3]
    return attributes, prompt_topic(prompt), tone


@dataclass(frozen=True)
class FactsGroundTruth:
    reward: float
    plain: float  # the plain task's ground truth of the same response, sentiment signed by the tone
    tone: int  # 1: warm, -1: sad
    uses_attribute: bool  # the first sentence opens with DET <attribute> <thing>
    made_up: int  # the thing given another adjective
    terminated: bool


def score(prompt: str, response: str, terminated: bool = True) -> FactsGroundTruth:
    """Ground truth of `response` (words separated by spaces, without EOS) to a facts prompt."""
    attributes, topic, tone = parse_prompt(prompt)
    attribute = attributes.get(topic or "")
    plain_gt = plain.score(prompt, response, terminated)
    # the context's tone decides the sign of the sentiment credit (a sad tone asks for gloom)
    base = plain_gt.reward + (tone - 1) * plain.SENTIMENT_CREDIT * plain_gt.sentiment
    sentences = split_sentences(response.split())
    first = sentences[0] if sentences else []
    uses = bool(
        attribute
        and first[-1:] == [PERIOD]
        and is_grammatical(first[:-1])
        and first[1:3] == [attribute, topic]
        and first[0] in DETERMINERS
    )
    words = response.split()
    made_up = sum(
        1
        for i in range(1, len(words))
        if words[i] == topic and POS_TAG.get(words[i - 1]) == "J" and words[i - 1] != attribute
    )
    reward = base + ATTRIBUTE_BONUS * uses - MADE_UP_PENALTY * made_up
    return FactsGroundTruth(reward, base, tone, uses, made_up, terminated)


def reward(prompt: str, response: str, terminated: bool = True) -> float:
    return score(prompt, response, terminated).reward


# ---------------------------------------------------------------- generators


@dataclass(frozen=True)
class Context:
    prompt: str
    question: str
    topic: str
    attribute: str
    attributes: dict[str, str]
    tone: int


def make_context(rng: random.Random, n_facts: int) -> Context:
    """`n_facts` subjects, each with one attribute, and the tone instruction among them, shuffled;
    then a request about one subject."""
    subjects = rng.sample(NOUNS, min(n_facts, MAX_FACTS))
    attributes = {s: rng.choice(ADJECTIVES) for s in subjects}
    topic = rng.choice(subjects)
    tone = rng.choice(list(TONES))
    facts = [f"the {s} is {attributes[s]} ." for s in subjects]
    facts.insert(rng.randint(0, len(facts)), f"tone : {tone} .")
    question = f"{rng.choice(PROMPT_VERBS)} {rng.choice(DETERMINERS[:2])} {topic}"
    return Context(
        f"facts : {' '.join(facts)} {question}", question, topic, attributes[topic], attributes, TONES[tone]
    )


def _opening(rng: random.Random, context: Context, adjective: str | None, tone: float) -> list[str]:
    """A first sentence about the thing, with `adjective` before it (or none)."""
    while True:
        words = make_sentence(rng, context.topic, tone)
        rest = words[words.index(context.topic) + 1 :]
        if not _describes(rest, context.topic):
            break
    return [rng.choice(DETERMINERS)] + ([adjective] if adjective else []) + [context.topic] + rest


def _describes(words: list[str], topic: str) -> bool:
    """Whether `words` give `topic` an adjective."""
    return any(b == topic and POS_TAG.get(a) == "J" for a, b in zip(words, words[1:], strict=False))


def _more(rng: random.Random, context: Context, max_sentences: int, tone: float) -> list[str]:
    """0 to max_sentences - 1 further sentences of `tone` that give the thing no adjective."""
    words: list[str] = []
    for _ in range(rng.randint(0, max_sentences - 1)):
        while True:
            sentence = make_sentence(rng, None, tone)
            if not _describes(sentence, context.topic):
                break
        words += sentence
    return words


def _tone(rng: random.Random, sign: int) -> float:
    return sign * rng.uniform(0.3, 1.0)


def good_answer(rng: random.Random, context: Context, max_sentences: int = 4) -> str:
    """The attribute in the first sentence, every sentence in the context's tone."""
    tone = _tone(rng, context.tone)
    return " ".join(
        _opening(rng, context, context.attribute, tone) + _more(rng, context, max_sentences, tone)
    )


def flawed_answer(rng: random.Random, context: Context, max_sentences: int = 4) -> str:
    """A plausible mistake: another subject's attribute, an invented one, none, the other tone, or a
    bad response."""
    kind = rng.choice(["other", "invented", "none", "tone", "corrupt"])
    if kind == "corrupt":
        return plain.corrupt(rng, good_answer(rng, context, max_sentences))
    tone = _tone(rng, -context.tone if kind == "tone" else context.tone)
    adjective = context.attribute if kind == "tone" else None
    if kind == "other":
        others = [a for s, a in context.attributes.items() if s != context.topic and a != context.attribute]
        adjective = rng.choice(others) if others else None
    elif kind == "invented":
        adjective = rng.choice([a for a in ADJ_POS if a != context.attribute])
    return " ".join(_opening(rng, context, adjective, tone) + _more(rng, context, max_sentences, tone))


def user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def sft_records(settings: TaskSettings, n_facts: int) -> list[dict]:
    rng = random.Random(f"facts-sft-{settings.seed}")
    records = []
    for _ in range(settings.n_sft):
        context = make_context(rng, n_facts)
        answer = good_answer(rng, context, settings.max_sentences)
        records.append({"prompt": user(context.prompt), "completion": assistant(answer)})
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
        a = (good_answer if rng.random() < 0.5 else flawed_answer)(rng, context, settings.max_sentences)
        b = flawed_answer(rng, context, settings.max_sentences)
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
