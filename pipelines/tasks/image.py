"""The built-in image task: small generated pictures with questions whose answers are known.

A 32x32 picture (8x8 patches of 4x4 pixels) holds two or three shapes (circle, square, triangle;
each type at most once) in four colours, each in its own quadrant, each drawn as a 4x4 glyph in one
patch cell — so every object is exactly one of the 64 vision tokens. Three kinds of question, single-word answers:

* ``what color is the circle ?``          -> ``red`` (the asked shape is always present)
* ``what shape is at the top left ?``     -> ``square`` or ``nothing`` (empty quadrant)
* ``how many red shapes ?``               -> ``zero`` .. ``three``

The ground-truth reward is 1 when the first word of the response is the answer and the response
ends there (EOS or nothing after it), else 0. Chance is about 0.25-0.33 per question kind. The
answer depends on a few vision tokens (the object), which is what text-guided pruning must find.

The tokenizer is word-level (`tokenizers` WordLevel saved as a PreTrainedTokenizerFast); the
processor is a transformers `LlavaProcessor` over a `CLIPImageProcessorPil`, so both save and load
as ordinary HF files. The model and the SFT loop live in `image_model.py`.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rto.errors import UserError

IMAGE_SIZE = 32
PATCH_SIZE = 4
N_VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64; the CLS token is dropped ("default" strategy)

SHAPES = ["circle", "square", "triangle"]
COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
POSITIONS = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
COUNTS = ["zero", "one", "two", "three"]
BACKGROUND = (24, 24, 24)

SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}
QUESTION_WORDS = (
    "USER: ASSISTANT: what color is the shape at how many shapes ? nothing top bottom left right".split()
)


@dataclass(frozen=True)
class Item:
    """One shape in a picture: its type, colour name and quadrant name."""

    shape: str
    color: str
    position: str


@dataclass(frozen=True)
class Example:
    items: tuple[Item, ...]
    question: str
    answer: str
    seed: int


# ---------------------------------------------------------------- pictures


GLYPHS = {  # one shape fills exactly one 4x4 patch: every object is a single vision token
    "circle": ("0110", "1111", "1111", "0110"),
    "square": ("1111", "1001", "1001", "1111"),
    "triangle": ("0001", "0011", "0111", "1111"),
}


def object_cells(items: tuple[Item, ...], seed: int) -> list[tuple[int, int]]:
    """(column, row) patch cell of each item as `render` draws it (a random cell of its quadrant)."""
    rng = random.Random(seed)
    cells = IMAGE_SIZE // PATCH_SIZE // 2  # patch cells per quadrant side
    out = []
    for item in items:
        col, row = POSITIONS[item.position]
        x = col * cells + rng.randrange(cells)
        out.append((x, row * cells + rng.randrange(cells)))
    return out


def object_tokens_of(example: Example) -> dict[int, Item]:
    """Vision-token ordinal (row-major patch index) -> the item drawn in that patch."""
    grid = IMAGE_SIZE // PATCH_SIZE
    cells = object_cells(example.items, example.seed)
    return {row * grid + col: item for (col, row), item in zip(cells, example.items, strict=True)}


def question_kind(question: str) -> str:
    """``color`` (what color is the SHAPE ?), ``shape`` (what shape is at the PLACE ?), ``count``
    (how many COLOR shapes ?) or ``describe``."""
    words = question.split()
    return {("what", "color"): "color", ("what", "shape"): "shape", ("how", "many"): "count"}.get(
        tuple(words[:2]), "describe"
    )


def asked_tokens(example: Example) -> set[int]:
    """Ordinals of the vision tokens a question is about: the asked shape (colour questions), the
    object in the asked quadrant (shape questions, none if it is empty), the objects of the asked
    colour (counts). Empty for descriptions."""
    words = example.question.split()
    objects = object_tokens_of(example).items()
    kind = question_kind(example.question)
    if kind == "color":
        return {i for i, item in objects if item.shape == words[4]}
    if kind == "shape":
        return {i for i, item in objects if item.position == " ".join(words[5:7])}
    if kind == "count":
        return {i for i, item in objects if item.color == words[2]}
    return set()


def render(items: tuple[Item, ...], seed: int):
    """Draw `items` on a dark background, each as a 4x4 glyph in a random patch cell of its quadrant."""
    from PIL import Image

    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    for item, (col, row) in zip(items, object_cells(items, seed), strict=True):
        x0, y0 = col * PATCH_SIZE, row * PATCH_SIZE
        for dy, line in enumerate(GLYPHS[item.shape]):
            for dx, bit in enumerate(line):
                if bit == "1":
                    image.putpixel((x0 + dx, y0 + dy), COLORS[item.color])
    return image


def decode_image(data: bytes | str | Path, source: str = "image"):
    """Open an image from bytes or a path as RGB; an undecodable one is a `UserError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        stream = io.BytesIO(data) if isinstance(data, bytes | bytearray) else open(data, "rb")  # noqa: SIM115
        with stream:
            image = Image.open(stream)
            image.load()
    except (UnidentifiedImageError, OSError, ValueError) as error:
        name = source if isinstance(data, bytes | bytearray) else str(data)
        raise UserError(f"cannot decode image ({type(error).__name__})", source=name) from None
    return image.convert("RGB")


# ---------------------------------------------------------------- questions and ground truth


def sample_items(rng: random.Random) -> tuple[Item, ...]:
    n = rng.choice([2, 3])
    shapes = rng.sample(SHAPES, n)
    positions = rng.sample(list(POSITIONS), n)
    return tuple(Item(s, rng.choice(list(COLORS)), p) for s, p in zip(shapes, positions, strict=True))


def ask(rng: random.Random, items: tuple[Item, ...]) -> tuple[str, str]:
    """A question about `items` and its answer."""
    kind = rng.randrange(3)
    if kind == 0:
        item = rng.choice(items)
        return f"what color is the {item.shape} ?", item.color
    if kind == 1:
        position = rng.choice(list(POSITIONS))
        found = [i.shape for i in items if i.position == position]
        return f"what shape is at the {position} ?", found[0] if found else "nothing"
    color = rng.choice(list(COLORS))
    return f"how many {color} shapes ?", COUNTS[sum(i.color == color for i in items)]


def answer_choices(question: str) -> list[str]:
    """Every answer a question of this kind can have (descriptions have no fixed set: ValueError)."""
    choices = {"color": list(COLORS), "shape": [*SHAPES, "nothing"], "count": list(COUNTS)}
    kind = question_kind(question)
    if kind not in choices:
        raise ValueError(f"not a question with a fixed set of answers: {question!r}")
    return choices[kind]


def wrong_answer(example: Example) -> str:
    """A wrong answer of the right kind (a preference pair's rejected response), drawn from the
    example's own seed so that the same example always gets the same one."""
    choices = [a for a in answer_choices(example.question) if a != example.answer]
    return random.Random(example.seed).choice(choices)


def confusable_answer(example: Example) -> str:
    """A wrong answer the picture itself suggests (a hard negative for a preference pair): the
    colour of another object (colour questions), a shape drawn elsewhere or "nothing" (shape
    questions), the count of another colour present or one off (counts). Falls back to
    `wrong_answer` when the picture suggests none. Drawn from the example's seed."""
    words = example.question.split()
    kind = question_kind(example.question)
    if kind == "color":
        candidates = [i.color for i in example.items if i.shape != words[4]]
    elif kind == "shape":
        position = " ".join(words[5:7])
        candidates = [i.shape for i in example.items if i.position != position]
        if example.answer != "nothing":
            candidates.append("nothing")
    elif kind == "count":
        n = COUNTS.index(example.answer)
        present = {i.color for i in example.items if i.color != words[2]}
        candidates = [COUNTS[sum(i.color == c for i in example.items)] for c in sorted(present)]
        candidates += [COUNTS[k] for k in (n - 1, n + 1) if 0 <= k < len(COUNTS)]
    else:
        raise ValueError(f"not a question with a fixed set of answers: {example.question!r}")
    candidates = sorted({c for c in candidates if c != example.answer})
    if not candidates:
        return wrong_answer(example)
    return random.Random(example.seed).choice(candidates)


NEGATIVES = {"random": wrong_answer, "confusable": confusable_answer}
"""How a built-in preference pair's rejected answer is chosen (`task.negatives`)."""


def describe(items: tuple[Item, ...]) -> str:
    """Every object, in reading order of the quadrants: ``red circle top left green square ...``."""
    order = list(POSITIONS)
    return " ".join(
        f"{i.color} {i.shape} {i.position}" for i in sorted(items, key=lambda i: order.index(i.position))
    )


def make_examples(n: int, seed: int, describe_fraction: float = 0.0) -> list[Example]:
    """`n` examples; a `describe_fraction` of them ask for a full description (SFT only: dense
    supervision of what is where, which makes the tiny model learn to read the image much sooner)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        items = sample_items(rng)
        if rng.random() < describe_fraction:
            question, answer = "describe the picture .", describe(items)
        else:
            question, answer = ask(rng, items)
        out.append(Example(items, question, answer, rng.randrange(2**31)))
    return out


CARELESS_ANSWERS = {"color": "red", "shape": "nothing", "count": "zero"}
"""What a careless annotator answers without looking at the picture: the kind's most frequent answer
for shapes and counts ("nothing" is right 37.5 % of the time, "zero" 54 %), and the first colour that
comes to mind for colours ("red": right a quarter of the time, as any single colour is)."""


def careless(examples: list[Example], share: float, seed: int) -> list[Example]:
    """`examples` as a careless annotator labels them: a `share` of the colour, shape and count
    questions get the answer of not looking (`CARELESS_ANSWERS`) whatever the picture shows;
    descriptions keep their answers. Demonstrations that are wrong in a way the ground truth sees,
    as real SFT data is (`task.sft_careless`).

    Only the colour default is worse than a guess from what the picture shows: a policy that can
    tell the colours apart but learned to say "red" has a mistake PPO can fix, while "nothing" and
    "zero" are the reward-optimal answers of a policy that cannot see shapes or count."""
    if share <= 0:
        return list(examples)
    rng = random.Random(seed)
    out = []
    for example in examples:
        kind = question_kind(example.question)
        if kind in CARELESS_ANSWERS and rng.random() < share:
            example = replace(example, answer=CARELESS_ANSWERS[kind])
        out.append(example)
    return out


def answer_of(response: str) -> str:
    words = response.replace(SPECIAL["eos"], " ").split()
    return words[0] if len(words) == 1 else ""


def reward(response: str, answer: str) -> float:
    """Ground truth: 1.0 for exactly the answer word (EOS optional), else 0.0."""
    return float(answer_of(response) == answer)


def prompt_text(question: str, n_image_tokens: int | None = None) -> str:
    """The chat-formatted prompt; the processor expands the single ``<image>`` itself."""
    image = SPECIAL["image"] if n_image_tokens is None else " ".join([SPECIAL["image"]] * n_image_tokens)
    return f"{SPECIAL['bos']} USER: {image} {question} ASSISTANT:"


# ---------------------------------------------------------------- tokenizer and processor


def vocabulary() -> list[str]:
    words = list(SPECIAL.values()) + QUESTION_WORDS + SHAPES + list(COLORS) + COUNTS
    return list(dict.fromkeys(words))


def build_tokenizer():
    """Word-level tokenizer over `vocabulary()`, an ordinary `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(
        models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary())}, unk_token=SPECIAL["unk"])
    )
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        extra_special_tokens={"image_token": SPECIAL["image"]},
        model_max_length=4096,
        padding_side="left",
    )
    return tokenizer


def build_processor():
    """`LlavaProcessor` (CLIP-normalised 32x32 pictures, 64 image tokens per picture)."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(),
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=SPECIAL["image"],
    )


def encode(processor, examples: list[Example], with_answer: bool = False) -> dict:
    """Batch tensors for `examples`: input_ids, attention_mask, pixel_values (+ labels).

    Prompts are left-padded for generation; with `with_answer` the answer and EOS follow the prompt
    and `labels` masks everything but them (-100), as an SFT loss needs.
    """
    images = [render(e.items, e.seed) for e in examples]
    texts = [prompt_text(e.question) for e in examples]
    if with_answer:
        texts = [f"{t} {e.answer} {SPECIAL['eos']}" for t, e in zip(texts, examples, strict=True)]
    batch = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    if with_answer:
        labels = batch["input_ids"].clone()
        n_answer = torch.tensor([len(e.answer.split()) + 1 for e in examples])  # answer words + EOS
        labels[torch.arange(labels.shape[1])[None, :] < labels.shape[1] - n_answer[:, None]] = -100
        batch["labels"] = labels  # left padding: the answer and EOS are the last tokens
    return batch
