"""The image task inside the staged pipeline: records on disk, prompt encoding, the SFT collator.

Records are TRL-style rows with one picture each; the picture is a PNG beside the JSONL files (its
path relative to the prepared folder) or, for external data, a path or the bytes of any format PIL
reads (a Hugging Face `Image` column arrives as ``{"bytes": ..., "path": ...}``):

* ``sft``:          ``{"prompt": question, "completion": answer, "image": ...}``
* ``prompts`` and ``eval_prompts``: ``{"prompt": question, "image": ..., "answer": answer}``
* ``pairs`` and ``eval_pairs``: ``{"prompt": question, "chosen": answer, "rejected": a wrong
  answer of the same kind, "image": ...}`` (the built-in task's preference data for `dpo`; the
  wrong answer is one the picture suggests unless ``task.negatives: random``)

The ground truth of the built-in task needs the answer, which the question alone does not give, so
it is read from the record (:func:`record_reward`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipelines.tasks import TASKS
from pipelines.tasks import image as task
from rto.errors import UserError
from rto.generation import left_pad


def build_records(settings, root: Path) -> dict[str, list[dict]]:
    """Generate the task's examples, write their pictures under ``root/images`` and return the
    records of every role (the SFT set includes the description examples)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    splits = {
        "sft": task.careless(
            task.make_examples(settings.n_sft, settings.seed + 1, settings.describe_fraction),
            settings.sft_careless,
            settings.seed + 6,
        ),
        "prompts": task.make_examples(settings.n_prompts, settings.seed + 2),
        "eval_prompts": task.make_examples(settings.n_eval, settings.seed + 3),
        "pairs": task.make_examples(settings.n_pairs, settings.seed + 4),
        "eval_pairs": task.make_examples(settings.n_eval_pairs, settings.seed + 5),
    }
    out: dict[str, list[dict]] = {}
    for role, examples in splits.items():
        records = []
        for n, example in enumerate(examples):
            name = f"images/{role}-{n:06d}.png"
            task.render(example.items, example.seed).save(root / name)
            if role == "sft":
                records.append({"prompt": example.question, "completion": example.answer, "image": name})
            elif role in ("pairs", "eval_pairs"):
                rejected = task.NEGATIVES[settings.negatives](example)
                records.append(
                    {
                        "prompt": example.question,
                        "chosen": example.answer,
                        "rejected": rejected,
                        "image": name,
                    }
                )
            else:
                records.append({"prompt": example.question, "image": name, "answer": example.answer})
        out[role] = records
    return out


def load_image(value, base: Path | None = None, source: str = "image"):
    """The RGB picture of a record's ``image`` field (a path, bytes or ``{"bytes", "path"}``);
    a relative path is looked up under ``base`` first. Undecodable input is a `UserError`."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str | Path):
        path = Path(value)
        if not path.is_absolute() and base is not None and (base / path).exists():
            path = base / path
        if not path.exists():
            raise UserError(f"image file '{value}' does not exist", source=source)
        value = path
    if not isinstance(value, bytes | bytearray | Path):
        raise UserError(f"expected an image path or bytes, got {type(value).__name__}", source=source)
    try:
        return task.decode_image(value, source=source)
    except UserError as error:
        what = f"'{value}'" if isinstance(value, Path) else "bytes"
        raise UserError(
            f"cannot decode image {what} ({str(error).rsplit('(', 1)[-1]}", source=source
        ) from None


def pin_images(records: list[dict], data_dir: Path, root: Path, role: str) -> list[dict]:
    """External records, made independent of where the run starts: a relative image path becomes
    absolute (relative to the data file's folder when the picture is there, else to the working
    directory), and image bytes (a Hugging Face `Image` column) are written under ``root/images``
    and referred to by that relative path (JSONL cannot hold bytes)."""
    out = []
    for n, record in enumerate(records):
        image = record.get("image")
        if isinstance(image, dict) and image.get("bytes"):
            image = image["bytes"]
        elif isinstance(image, dict):
            image = image.get("path")
        if isinstance(image, bytes | bytearray):
            name = f"images/{role}-{n:06d}.img"
            (root / "images").mkdir(parents=True, exist_ok=True)
            (root / name).write_bytes(image)
            image = name
        elif isinstance(image, str) and not Path(image).is_absolute():
            beside = data_dir / image
            image = str((beside if beside.exists() else Path(image)).resolve())
        out.append({**record, "image": image} if "image" in record else record)
    return out


def check_images(records: list[dict], base: Path, source: str) -> None:
    """Every record has a decodable ``image`` (bad input fails at prepare time, not mid-PPO)."""
    for n, record in enumerate(records, 1):
        if "image" not in record:
            raise UserError(
                f"row {n} has no 'image' column (the image task needs one per row)", source=source
            )
        load_image(record["image"], base, source=f"{source}: row {n} 'image'")


def question_of(record: dict) -> str:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return prompt
    return " ".join(m["content"] for m in prompt if m.get("role") == "user")


def prompt_label(record: dict) -> str:
    """How a record reads in traces and reports: its picture's name, then the question."""
    image = record.get("image")
    name = Path(image).name if isinstance(image, str) else "image"
    return f"[{name}] {question_of(record)}"


def encode_prompt(processor, record: dict, base: Path | None = None) -> tuple[list[int], torch.Tensor]:
    """(prompt token ids with the image tokens expanded, pixel_values [3, H, W]) of one record."""
    image = load_image(record["image"], base, source="prompt image")
    batch = processor(images=[image], text=[task.prompt_text(question_of(record))], return_tensors="pt")
    return batch["input_ids"][0].tolist(), batch["pixel_values"][0]


def encode_prompts(processor, records: list[dict], base: Path | None = None) -> dict:
    """A generation batch of records: left-padded ``input_ids`` / ``attention_mask`` (whatever side
    the processor's tokenizer pads) and ``pixel_values [B, 3, H, W]``."""

    encoded = [encode_prompt(processor, r, base) for r in records]
    input_ids, attention_mask = left_pad([e[0] for e in encoded], processor.tokenizer.pad_token_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([e[1] for e in encoded]),
    }


def record_reward(record: dict, response: str, terminated: bool = True) -> float:
    """Ground truth of the built-in task: 1 for exactly the answer word (then EOS), else 0."""
    del terminated  # the answer is one word; `task.reward` already rejects anything after it
    return task.reward(response, record["answer"])


class SFTCollator:
    """Batches ``sft`` records for TRL's `SFTTrainer` (custom collator, as TRL documents for VLMs):
    pictures through the processor, the answer and EOS after the prompt, loss on those only."""

    def __init__(self, processor, base: Path | None = None):
        self.processor = processor
        self.base = base

    def __call__(self, rows: list[dict]) -> dict:
        images = [load_image(r["image"], self.base, source="sft image") for r in rows]
        eos = task.SPECIAL["eos"]
        prompts = [task.prompt_text(question_of(r)) for r in rows]
        texts = [f"{p} {r['completion']} {eos}" for p, r in zip(prompts, rows, strict=True)]
        batch = dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True))
        labels = batch["input_ids"].clone()
        n_answer = torch.tensor(
            [len(self.processor.tokenizer(f"{r['completion']} {eos}")["input_ids"]) for r in rows]
        )
        width = labels.shape[1]
        labels[torch.arange(width)[None, :] < width - n_answer[:, None]] = -100  # left padding
        batch["labels"] = labels
        return batch


class ImagePrompts:
    """Prompt records of a vision-language policy: one picture each, encoded by the processor when a
    step draws them (pixel tensors of a whole prompt set would not fit in memory at real sizes).
    The pictures were checked when the data was prepared (`pipelines.prepare`)."""

    def __init__(self, processor, records: list[dict], image_root: Path | None):
        self.processor, self.records, self.root = processor, records, image_root
        self.labels = [prompt_label(r) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def batch(self, indices: list[int]) -> dict:
        return encode_prompts(self.processor, [self.records[i] for i in indices], self.root)


IMAGE_REQUIRED = {
    "prompts": ("answer", "the image task's ground truth compares the response with it"),
    "eval_prompts": ("answer", "the image task's ground truth compares the response with it"),
    "pairs": ("prompt", "the image task's pairs answer a question about the picture"),
    "eval_pairs": ("prompt", "the image task's pairs answer a question about the picture"),
}
"""Image-task data roles -> (column every row must fill, why)."""


def check_column(records: list[dict], source: str, field: str, column: str, why: str) -> None:
    """Every row has a non-empty `column`; the first that does not is a `UserError`."""
    for n, record in enumerate(records, 1):
        if not str(record.get(column) or "").strip():
            raise UserError(f"row {n} has no '{column}' ({why})", source=source, field=field)


class ImageTask:
    """The built-in image task (the `task` section with `name: image`): generated pictures and
    questions; no reward-model stage (its sentence-level reward is the ground truth)."""

    name = "image"
    uses_reward_model = False
    prompt_only = False  # the answer is in the record (and the picture), not in the prompt

    def build(self, settings, folder: Path):
        from pipelines.tasks import image  # the task's pictures and processor

        return build_records(settings, folder), image.build_processor()

    def external(self, records: list[dict], role: str, source: str, folder: Path) -> list[dict]:
        records = pin_images(records, Path(source).parent, folder, role)
        check_images(records, folder, source)
        if role in IMAGE_REQUIRED:
            check_column(records, source, f"data.{role}.path", *IMAGE_REQUIRED[role])
        return records

    def record_reward(self, record: dict, response: str, terminated: bool) -> float:
        return record_reward(record, response, terminated)


TASKS.register("image")(ImageTask())
