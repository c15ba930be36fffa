"""The built-in text task: a small synthetic language with a known ground-truth reward.

A user asks about a thing ("describe the cat"); a good answer is two to four grammatical,
non-repetitive sentences about that thing, in a warm tone, ended with EOS. The ground truth is

    r(x, y) = Σ_sentences [ 0.25 + 0.25 · Σ_words sentiment(w) ]      (grammatical, new sentences)
              − 0.5 · #bad sentences (ungrammatical or repeated)
              + 0.5 · [the first sentence is about the asked thing]
              − 1.0 · [no EOS]  − 0.5 · #sentences beyond four

so it is partly a sum over tokens (the sentiment of each word, which a DPO model can learn as
per-token credit) and partly sentence-level (grammar, termination, repetition, topic, length), which
only a sentence-level judgement sees. Repeated content words earn no sentiment, so repetition does
not pay; word salad scores -0.5 per sentence; a response that never ends loses 1.0 and its
unfinished last sentence.

Sentences follow ``DET [ADJ] NOUN [ADV] VERB DET [ADJ] NOUN .`` (5 to 8 words). Everything is
deterministic given a seed.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.tasks import TASKS

# ---------------------------------------------------------------- vocabulary

DETERMINERS = ["the", "a", "every", "this", "that", "my", "our", "some", "your", "one"]

NOUNS = (
    "cat dog bird fish horse river lake forest garden house city village road bridge tree flower "
    "child teacher doctor farmer friend neighbor sister brother mother father king queen baker "
    "painter singer sailor pilot student artist poet robot computer phone book letter song story "
    "movie game ball boat train car bicycle window door table chair lamp clock cup bread apple "
    "cake soup coffee tea rain snow wind sun moon star cloud mountain island beach ocean valley "
    "school market library museum hospital kitchen office team family"
).split()

# sentiment +1 / 0 / -1
ADJ_POS = (
    "kind happy bright gentle warm brave lovely friendly cheerful clever graceful generous "
    "joyful calm honest wonderful delightful charming patient beautiful"
).split()
ADJ_NEU = (
    "old young small large tall short round square green blue red yellow wooden quiet busy "
    "distant local plain ordinary modern"
).split()
ADJ_NEG = (
    "cruel sad dark rude angry nasty lazy gloomy bitter selfish clumsy greedy dull harsh "
    "awful miserable broken dirty grumpy ugly"
).split()

VERB_POS = "loves helps admires protects welcomes hugs praises cherishes comforts inspires".split()
VERB_NEU = "sees finds meets follows watches visits carries passes reaches holds".split()
VERB_NEG = "hates hurts ignores insults scares blames mocks fears breaks annoys".split()

ADV_POS = "warmly kindly happily gladly gently".split()
ADV_NEU = "often slowly quickly today again".split()
ADV_NEG = "rudely coldly badly sadly angrily".split()

PROMPT_VERBS = ["describe", "tell me about", "write about", "talk about", "say something about"]
PROMPT_WORDS = sorted({w for p in PROMPT_VERBS for w in p.split()})

SPECIAL_TOKENS = {
    "pad": "<pad>",
    "unk": "<unk>",
    "bos": "<bos>",
    "eos": "<eos>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
}
PERIOD = "."

SENTIMENT: dict[str, int] = {}
for words, value in [
    (ADJ_POS, 1), (ADJ_NEU, 0), (ADJ_NEG, -1),
    (VERB_POS, 1), (VERB_NEU, 0), (VERB_NEG, -1),
    (ADV_POS, 1), (ADV_NEU, 0), (ADV_NEG, -1),
]:  # fmt: skip
    for w in words:
        SENTIMENT[w] = value

POS_TAG: dict[str, str] = {}
for tag, words in [
    ("D", DETERMINERS), ("N", NOUNS), ("J", ADJ_POS + ADJ_NEU + ADJ_NEG),
    ("V", VERB_POS + VERB_NEU + VERB_NEG), ("R", ADV_POS + ADV_NEU + ADV_NEG),
]:  # fmt: skip
    for w in words:
        POS_TAG[w] = tag


def vocabulary() -> list[str]:
    """All tokens, specials first; ids are positions in this list."""
    words = DETERMINERS + NOUNS + list(SENTIMENT) + PROMPT_WORDS + [PERIOD]
    seen: dict[str, None] = {}
    for w in list(SPECIAL_TOKENS.values()) + words:
        seen.setdefault(w, None)
    return list(seen)


# ---------------------------------------------------------------- grammar and ground truth

MAX_GOOD_SENTENCES = 4
SENTENCE_CREDIT = 0.25
SENTIMENT_CREDIT = 0.25
BAD_SENTENCE_PENALTY = 0.5
TOPIC_BONUS = 0.5
NO_EOS_PENALTY = 1.0
EXTRA_SENTENCE_PENALTY = 0.5


def is_grammatical(words: list[str]) -> bool:
    """``D [J] N [R] V D [J] N`` (the sentence without its period)."""
    tags = "".join(POS_TAG.get(w, "?") for w in words)
    i = 0

    def noun_phrase(i: int) -> int:
        if i < len(tags) and tags[i] == "D":
            i += 1
            if i < len(tags) and tags[i] == "J":
                i += 1
            if i < len(tags) and tags[i] == "N":
                return i + 1
        return -1

    i = noun_phrase(0)
    if i < 0:
        return False
    if i < len(tags) and tags[i] == "R":
        i += 1
    if not (i < len(tags) and tags[i] == "V"):
        return False
    return noun_phrase(i + 1) == len(tags)


def split_sentences(words: list[str]) -> list[list[str]]:
    """Split at periods; a trailing fragment without a period is its own (bad) sentence."""
    sentences, current = [], []
    for w in words:
        if w == PERIOD:
            sentences.append(current + [PERIOD])
            current = []
        else:
            current.append(w)
    if current:
        sentences.append(current)
    return sentences


def prompt_topic(prompt: str) -> str | None:
    """The noun the user asks about: the last noun of the prompt."""
    nouns = [w for w in prompt.split() if POS_TAG.get(w) == "N"]
    return nouns[-1] if nouns else None


@dataclass(frozen=True)
class GroundTruth:
    reward: float
    n_sentences: int
    n_grammatical: int
    sentiment: int
    on_topic: bool
    terminated: bool


def score(prompt: str, response: str, terminated: bool = True) -> GroundTruth:
    """Ground truth of `response` (words separated by spaces, without EOS) to `prompt`.

    `terminated` says whether the response ended with EOS (False when generation hit its length
    limit). Unknown words, special tokens inside the response and fragments are ungrammatical.
    """
    words = response.split()
    sentences = split_sentences(words)
    if not sentences:
        return GroundTruth(
            -BAD_SENTENCE_PENALTY - (0 if terminated else NO_EOS_PENALTY), 0, 0, 0, False, terminated
        )
    reward = 0.0
    used_words: set[str] = set()
    seen_sentences: set[tuple[str, ...]] = set()
    n_good = 0
    total_sentiment = 0
    for k, sentence in enumerate(sentences):
        body = sentence[:-1] if sentence[-1] == PERIOD else None
        key = tuple(sentence)
        if body is None or not is_grammatical(body) or key in seen_sentences:
            reward -= BAD_SENTENCE_PENALTY
            continue
        seen_sentences.add(key)
        if k >= MAX_GOOD_SENTENCES:
            reward -= EXTRA_SENTENCE_PENALTY
            continue
        n_good += 1
        sentiment = 0
        for w in body:
            if w in SENTIMENT and w not in used_words:
                sentiment += SENTIMENT[w]
            if POS_TAG[w] != "D":
                used_words.add(w)
        total_sentiment += sentiment
        reward += SENTENCE_CREDIT + SENTIMENT_CREDIT * sentiment
    first = sentences[0]
    topic = prompt_topic(prompt)
    on_topic = topic is not None and first[-1] == PERIOD and is_grammatical(first[:-1]) and topic in first[:3]
    if on_topic:
        reward += TOPIC_BONUS
    if not terminated:
        reward -= NO_EOS_PENALTY
    return GroundTruth(reward, len(sentences), n_good, total_sentiment, on_topic, terminated)


def reward(prompt: str, response: str, terminated: bool = True) -> float:
    return score(prompt, response, terminated).reward


def grammaticality(response: str) -> float:
    """Fraction of the response's sentences that are grammatical (0 for an empty response)."""
    sentences = split_sentences(response.split())
    if not sentences:
        return 0.0
    good = sum(1 for s in sentences if s[-1] == PERIOD and is_grammatical(s[:-1]))
    return good / len(sentences)


# ---------------------------------------------------------------- generators


@dataclass(frozen=True)
class TaskSettings:
    """Knobs of the data generator (mirrors `rto.config.TextTaskConfig`)."""

    seed: int = 0
    n_sft: int = 4000
    n_pairs: int = 3000
    n_prompts: int = 1024
    n_eval: int = 128
    label_temperature: float = 0.5
    """Bradley-Terry annotator: P(a preferred) = sigmoid((r_a - r_b) / temperature)."""
    max_sentences: int = 4


def make_prompt(rng: random.Random) -> str:
    return f"{rng.choice(PROMPT_VERBS)} {rng.choice(DETERMINERS[:2])} {rng.choice(NOUNS)}"


def make_sentence(rng: random.Random, subject: str | None = None, tone: float = 0.0) -> list[str]:
    """One grammatical sentence. `tone` in [-1, 1] tilts the choice of sentiment words."""

    def pick(pos: list[str], neu: list[str], neg: list[str]) -> str:
        weights = [max(0.0, 1 + tone), 1.0, max(0.0, 1 - tone)]
        return rng.choice(rng.choices([pos, neu, neg], weights)[0])

    def noun_phrase(noun: str | None) -> list[str]:
        words = [rng.choice(DETERMINERS)]
        if rng.random() < 0.6:
            words.append(pick(ADJ_POS, ADJ_NEU, ADJ_NEG))
        words.append(noun or rng.choice(NOUNS))
        return words

    words = noun_phrase(subject)
    if rng.random() < 0.3:
        words.append(pick(ADV_POS, ADV_NEU, ADV_NEG))
    words.append(pick(VERB_POS, VERB_NEU, VERB_NEG))
    words += noun_phrase(None)
    return words + [PERIOD]


def make_response(rng: random.Random, prompt: str, max_sentences: int = 4) -> str:
    """A fluent response of 1..max_sentences sentences with a random overall tone."""
    topic = prompt_topic(prompt)
    tone = rng.uniform(-1, 1)
    n = rng.randint(1, max_sentences)
    words: list[str] = []
    for k in range(n):
        subject = topic if (k == 0 and rng.random() < 0.7) else None
        words += make_sentence(rng, subject, tone)
    return " ".join(words)


def corrupt(rng: random.Random, response: str) -> str:
    """A plausible bad response: word salad, a repeated sentence, a cut-off, or rambling."""
    words = response.split()
    sentences = split_sentences(words)
    kind = rng.choice(["salad", "repeat", "cut", "ramble"])
    if kind == "salad":
        victim = rng.randrange(len(sentences))
        body = sentences[victim][:-1]
        rng.shuffle(body)
        sentences[victim] = body + [PERIOD]
    elif kind == "repeat":
        sentences.insert(rng.randrange(len(sentences)) + 1, list(rng.choice(sentences)))
    elif kind == "cut":
        flat = [w for s in sentences for w in s]
        return " ".join(flat[: max(1, rng.randrange(len(flat)))])
    else:
        sentences += [make_sentence(rng) for _ in range(rng.randint(2, 4))]
    return " ".join(w for s in sentences for w in s)


def sft_records(settings: TaskSettings) -> list[dict]:
    """TRL prompt-completion records (conversational) of fluent responses with random tone."""
    rng = random.Random(f"sft-{settings.seed}")
    records = []
    for _ in range(settings.n_sft):
        prompt = make_prompt(rng)
        records.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "completion": [
                    {"role": "assistant", "content": make_response(rng, prompt, settings.max_sentences)}
                ],
            }
        )
    return records


def preference_records(settings: TaskSettings, n: int | None = None, split: str = "train") -> list[dict]:
    """TRL preference records labelled by a noisy Bradley-Terry annotator on the ground truth."""
    rng = random.Random(f"pairs-{split}-{settings.seed}")
    records = []
    n = settings.n_pairs if n is None else n
    while len(records) < n:
        prompt = make_prompt(rng)
        a = make_response(rng, prompt, settings.max_sentences)
        b = make_response(rng, prompt, settings.max_sentences)
        if rng.random() < 0.25:
            b = corrupt(rng, b)
        if a == b:
            continue
        ra, rb = reward(prompt, a), reward(prompt, b)
        p_a = 1.0 / (1.0 + math.exp(-(ra - rb) / settings.label_temperature))
        chosen, rejected = (a, b) if rng.random() < p_a else (b, a)
        records.append(
            {
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return records


def prompt_records(settings: TaskSettings, n: int, split: str) -> list[dict]:
    rng = random.Random(f"prompts-{split}-{settings.seed}")
    return [{"prompt": [{"role": "user", "content": make_prompt(rng)}]} for _ in range(n)]


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


# ---------------------------------------------------------------- tokenizer and model

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|> ' }}{% generation %}"
    "{{ message['content'] + ' <eos>' }}{% endgeneration %}{{ ' ' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def build_tokenizer(max_length: int = 128, words: list[str] | None = None):
    """A word-level tokenizer over `words` (default `vocabulary()`), as an ordinary HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(words or vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        additional_special_tokens=[SPECIAL_TOKENS["user"], SPECIAL_TOKENS["assistant"]],
        model_max_length=max_length,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
"""Default shape of the built-in policy (about 0.8 M parameters)."""

TINY_RM = dict(
    TINY_LLAMA,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
)
"""Default shape of the built-in reward model: smaller than the policy, as in the RTO recipe."""


def llama_config(tokenizer, overrides: dict | None = None, **extra):
    from transformers import LlamaConfig

    fields = dict(TINY_LLAMA)
    fields.update(overrides or {})
    fields.update(extra)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **fields,
    )


FACTS_PREFIX = "facts : "
FACTS_MAX_LENGTH = 2048
"""The facts variant's tokenizer limit (its prompts are long; `task.n_facts` sets their length)."""


def task_tokenizer(settings=None):
    """The tokenizer of the text task's variant (`settings`: the job's `task` section): the built-in
    models are made with it, so every word of the variant's prompts has its own id."""
    if getattr(settings, "variant", "plain") == "facts":
        from pipelines.tasks.text_facts import facts_vocabulary  # deferred: text_facts imports this module

        return build_tokenizer(max_length=FACTS_MAX_LENGTH, words=facts_vocabulary())
    return build_tokenizer()


class TextTask:
    """The built-in synthetic text task (the `task` section with `name: text`)."""

    name = "text"
    uses_reward_model = True
    prompt_only = True

    def build(self, settings, folder: Path) -> tuple[dict[str, list[dict]], Any]:
        task = TaskSettings(
            seed=settings.seed, n_sft=settings.n_sft, n_pairs=settings.n_pairs, n_prompts=settings.n_prompts,
            n_eval=settings.n_eval, label_temperature=settings.label_temperature,
            max_sentences=settings.max_sentences,
        )  # fmt: skip
        if settings.variant == "facts":
            return self._build_facts(task, settings)
        records = {
            "sft": sft_records(task),
            "pairs": preference_records(task, split="train"),
            "eval_pairs": preference_records(task, settings.n_eval_pairs, split="eval"),
            "prompts": prompt_records(task, task.n_prompts, "train"),
            "eval_prompts": prompt_records(task, task.n_eval, "eval"),
        }
        return records, build_tokenizer()

    @staticmethod
    def _build_facts(task: TaskSettings, settings) -> tuple[dict[str, list[dict]], Any]:
        from pipelines.tasks import text_facts as facts  # deferred: text_facts imports this module

        n = settings.n_facts
        records = {
            "sft": facts.sft_records(task, n),
            "pairs": facts.preference_records(task, n, split="train"),
            "eval_pairs": facts.preference_records(task, n, settings.n_eval_pairs, split="eval"),
            "prompts": facts.prompt_records(task, n, task.n_prompts, "train"),
            "eval_prompts": facts.prompt_records(task, n, task.n_eval, "eval"),
        }
        return records, task_tokenizer(settings)

    def external(self, records: list[dict], role: str, source: str, folder: Path) -> list[dict]:
        return records

    def record_reward(self, record: dict, response: str, terminated: bool) -> float:
        """The plain task's ground truth, or the facts variant's for a prompt that opens with a
        context of facts (``facts : ...``; the plain task's prompts never do)."""
        from rto.generation import prompt_text  # deferred: torch (the task registry loads light)

        prompt = prompt_text(record["prompt"])
        if prompt.startswith(FACTS_PREFIX):
            # deferred: text_facts imports this module
            from pipelines.tasks.text_facts import reward as facts_reward

            return facts_reward(prompt, response, terminated)
        return reward(prompt, response, terminated)


TASKS.register("text")(TextTask())
