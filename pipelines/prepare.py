"""Everything the stages start from: tokenizer, data files and base models.

For the built-in task this generates the synthetic data and builds random-init models from configs;
for external data it loads TRL-format files (JSONL/Parquet) or Hub data sets and checks their
columns. The result is cached under `RUN_DIR/prepared/<hash>/`, keyed by the sections it depends on
and by the content of every local data file they name (size, modification time, SHA-256), so a file
fixed in place is prepared again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipelines.tasks import image, image_model, task, text
from rto.config import Config, DataSource, ModelSpec
from rto.errors import UserError
from rto.generation import encode_completion
from rto.models import load_tokenizer
from rto.rundir import RunDir, atomic_write_json, replace_dir, unique_suffix

ROLES = ("sft", "pairs", "eval_pairs", "prompts", "eval_prompts")
REQUIRED_COLUMNS = {
    "sft": [("prompt", "completion"), ("messages",), ("text",)],
    "pairs": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "eval_pairs": [("prompt", "chosen", "rejected"), ("chosen", "rejected")],
    "prompts": [("prompt",)],
    "eval_prompts": [("prompt",)],
}


@dataclass
class Prepared:
    root: Path
    data: dict[str, Path]
    models: dict[str, str]
    tokenizer: str | None
    has_task: bool
    task_name: str | None = None

    def model(self, role: str) -> str:
        return self.models[role]

    def records(self, role: str) -> list[dict]:
        if role not in self.data:
            raise UserError(
                f"no '{role}' data: configure data.{role} or use the built-in task", field=f"data.{role}"
            )
        with open(self.data[role]) as f:
            return [json.loads(line) for line in f]

    def ground_truth(self, prompt_only: bool = False) -> Callable[[dict, str, bool], float] | None:
        """`gt(record, response_text, terminated) -> reward` where the task has one; with
        `prompt_only`, only where a record holding just a prompt is enough (the text task's; the
        image task's answer is in its prompt records, not in pairs or external prompts)."""
        if not self.has_task or (prompt_only and not task(self.task_name).prompt_only):
            return None
        return task(self.task_name).record_reward

    @property
    def is_image_task(self) -> bool:
        return self.task_name == "image"


def data_fingerprint(cfg: Config) -> dict[str, list]:
    """(size, mtime, SHA-256) of every local data file the job names, by role."""
    import hashlib

    out = {}
    for role in ROLES:
        source = getattr(cfg.data, role)
        if source is None or not Path(source.path).is_file():
            continue  # a Hub data set (its name and split are in the config hash)
        path = Path(source.path)
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        stat = path.stat()
        out[role] = [stat.st_size, stat.st_mtime_ns, digest.hexdigest()]
    return out


def prepared_key(cfg: Config) -> str:
    import hashlib

    sections = cfg.section_hash("task", "data", "policy", "reward_model", "seed")
    files = json.dumps(data_fingerprint(cfg), sort_keys=True)
    return sections if files == "{}" else hashlib.sha256(f"{sections}|{files}".encode()).hexdigest()[:16]


def prepare(cfg: Config, run: RunDir, log: Callable[[str], None] = print) -> Prepared:
    key = prepared_key(cfg)
    final = run.prepared_dir / key
    if not (final / "prepared.json").is_file():
        log(f"preparing data and base models -> {final}")
        import shutil

        tmp = run.prepared_dir / f".{key}.tmp-{unique_suffix()}"
        tmp.mkdir(parents=True)
        try:
            _build(cfg, tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        replace_dir(tmp, final)
    info = json.loads((final / "prepared.json").read_text())
    return Prepared(
        root=final,
        data={k: final / v for k, v in info["data"].items()},
        models={
            k: (str(final / v[len("local:") :]) if v.startswith("local:") else v)
            for k, v in info["models"].items()
        },
        tokenizer=info["tokenizer"],
        has_task=info["has_task"],
        task_name=info.get("task_name", "text" if info["has_task"] else None),
    )


def _build(cfg: Config, tmp: Path, final: Path) -> None:
    data: dict[str, str] = {}
    models: dict[str, str] = {}
    tokenizer_ref = None
    the_task = task(cfg.task.name) if cfg.task is not None else None
    if the_task is not None:
        generated, tokenizer = the_task.build(cfg.task, tmp)
        for role, records in generated.items():
            _write_jsonl(tmp / f"{role}.jsonl", records)
            data[role] = f"{role}.jsonl"
        tokenizer.save_pretrained(tmp / "tokenizer")
        tokenizer_ref = "local:tokenizer"
    for role in ROLES:
        source: DataSource | None = getattr(cfg.data, role)
        if source is not None:
            records = load_records(source, role)
            if the_task is not None:
                records = the_task.external(records, role, source.path, tmp)
            _write_jsonl(tmp / f"{role}.jsonl", records)
            data[role] = f"{role}.jsonl"
    roles = (("policy", cfg.policy),)
    if the_task is None or the_task.uses_reward_model:
        roles += (("reward_model", cfg.reward_model),)
    for role, spec in roles:
        models[role] = _materialize(spec, role, cfg, tmp)
    if the_task is None or the_task.name == "text":
        check_text_tokenizer(_local(models["policy"], tmp), "policy.path", _conversational(tmp, data))
    atomic_write_json(
        tmp / "prepared.json",
        {
            "data": data,
            "models": models,
            "tokenizer": tokenizer_ref,
            "has_task": cfg.task is not None,
            "task_name": cfg.task.name if cfg.task is not None else None,
        },
    )


def _local(ref: str, tmp: Path) -> str:
    return str(tmp / ref[len("local:") :]) if ref.startswith("local:") else ref


def _conversational(tmp: Path, data: dict[str, str]) -> bool:
    """Whether the prepared data is in TRL's conversational format (first row of any role)."""
    for name in data.values():
        with open(tmp / name) as f:
            row = json.loads(f.readline() or "{}")
        if any(isinstance(row.get(k), list) for k in ("prompt", "completion", "chosen", "messages")):
            return True
    return False


def check_text_tokenizer(path: str, field: str, conversational: bool) -> None:
    """The policy's tokenizer can lay out what PPO needs: a pad token distinct from EOS (added
    if missing) and, for conversational data, a chat template whose assistant turn ends with EOS
    (responses end there, and the reward model is trained and scored at that token)."""

    tokenizer = load_tokenizer(path, field)
    if not conversational:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(
            f"'{path}' has no chat template, and the data is conversational (lists of messages); "
            "give the data as plain strings (prompt/completion, prompt/chosen/rejected) or a model with a template",
            field=field,
        )
    probe = ([{"role": "user", "content": "hello"}], [{"role": "assistant", "content": "hello"}])
    try:
        _, completion = encode_completion(tokenizer, *probe)
    except ValueError as exc:
        raise UserError(f"the chat template of '{path}' cannot be used: {exc}", field=field) from None
    if not completion or completion[-1] != tokenizer.eos_token_id:
        raise UserError(
            f"the chat template of '{path}' never emits the EOS token {tokenizer.eos_token!r} after an "
            "assistant turn, so no response could end",
            field=field,
        )


def _materialize(spec: ModelSpec, role: str, cfg: Config, tmp: Path) -> str:
    if spec.path is not None:
        return spec.path
    if cfg.task is None:
        raise UserError(
            "a built-in model needs the built-in task's tokenizer; set task or give a model path",
            field=f"{role}.builtin",
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if (spec.builtin == "tiny-llava") != (cfg.task.name == "image"):
        raise UserError(
            f"builtin '{spec.builtin}' does not fit task '{cfg.task.name}' "
            "(tiny-llama is for the text task, tiny-llava for the image task)",
            field=f"{role}.builtin",
        )
    if spec.builtin == "tiny-llava":
        return _materialize_vlm(spec, role, cfg, tmp)

    tokenizer = text.task_tokenizer(cfg.task)
    try:
        config = text.llama_config(tokenizer, spec.arch)
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid architecture override: {exc}", field=f"{role}.arch") from None
    torch.manual_seed(cfg.seed + (0 if role == "policy" else 1))
    if role == "reward_model":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    out = tmp / "models" / role
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return f"local:models/{role}"


def _materialize_vlm(spec: ModelSpec, role: str, cfg: Config, tmp: Path) -> str:

    processor = image.build_processor()
    text_arch = {k: v for k, v in spec.arch.items() if k != "vision"}
    try:
        model = image_model.build_model(
            processor.tokenizer, seed=cfg.seed, text=text_arch, vision=spec.arch.get("vision")
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"invalid architecture override: {exc}", field=f"{role}.arch") from None
    out = tmp / "models" / role
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return f"local:models/{role}"


def load_records(source: DataSource, role: str) -> list[dict]:
    """Rows of a TRL-format data set from JSONL/Parquet or the Hub, with the columns checked."""
    path = Path(source.path)
    field = f"data.{role}.path"
    try:
        if path.suffix in (".jsonl", ".json"):
            records = []
            with open(path) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise UserError(
                                f"line {n} is not valid JSON ({exc.msg})", source=str(path)
                            ) from None
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            records = pq.read_table(path).to_pylist()
        else:
            import datasets

            records = datasets.load_dataset(source.path, split=source.split).to_list()
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is bad input here
        raise UserError(
            f"cannot load data: {type(exc).__name__}: {exc}".splitlines()[0], source=source.path, field=field
        ) from None
    if source.limit:
        records = records[: source.limit]
    if not records:
        raise UserError("the data set is empty", source=source.path, field=field)
    if not isinstance(records[0], dict):
        raise UserError(
            f"row 1 is not an object but {_type_name(records[0])}", source=source.path, field=field
        )
    columns = set(records[0])
    if not any(set(option) <= columns for option in REQUIRED_COLUMNS[role]):
        wanted = " or ".join("/".join(o) for o in REQUIRED_COLUMNS[role])
        raise UserError(
            f"missing columns: expected {wanted}, found {sorted(columns)}", source=source.path, field=field
        )
    check_rows(records, role, source.path, field)
    for n, row in enumerate(records, 1):
        for col in ("chosen", "rejected", "completion", "prompt"):
            if (
                col in row
                and _is_empty(row[col])
                and not (col == "prompt" and role in ("pairs", "eval_pairs"))
            ):
                raise UserError(f"row {n} has an empty '{col}'", source=source.path, field=field)
    return records


TEXT_COLUMNS = ("prompt", "completion", "chosen", "rejected", "messages", "text")


def _type_name(value) -> str:
    names = {str: "a string", list: "a list", dict: "an object", bool: "a boolean", type(None): "null",
             int: "an integer", float: "a number"}  # fmt: skip
    return names.get(type(value), f"a {type(value).__name__}")


def _text_kind(value) -> str | None:
    """'a string', 'a conversation' (a list of {role, content} strings), or None for anything else."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list) and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in value
    ):
        return "a conversation"
    return None


def check_rows(records: list[dict], role: str, source: str, field: str) -> None:
    """Every row, not just the first: an object, with the columns row 1 has for this role, and each
    text column of one kind (a string, or a conversation of {role, content} strings) throughout;
    the first row that is not is a `UserError` naming the file, the row and the column."""
    required = next(option for option in REQUIRED_COLUMNS[role] if set(option) <= set(records[0]))
    kinds: dict[str, str] = {}
    for n, row in enumerate(records, 1):
        if not isinstance(row, dict):
            raise UserError(f"row {n} is not an object but {_type_name(row)}", source=source, field=field)
        for column in required:
            if column not in row:
                raise UserError(f"row {n} has no '{column}' (row 1 has)", source=source, field=field)
        for column in TEXT_COLUMNS:
            if column not in row or (
                row[column] is None and column == "prompt" and role in ("pairs", "eval_pairs")
            ):
                continue
            kind = _text_kind(row[column])
            if kind is None:
                raise UserError(
                    f"row {n}: '{column}' must be a string or a list of {{role, content}} messages, "
                    f"got {_type_name(row[column])}",
                    source=source,
                    field=field,
                )
            first = kinds.setdefault(column, kind)
            if kind != first:
                raise UserError(
                    f"row {n}: '{column}' is {kind}, row 1's is {first}", source=source, field=field
                )


def _is_empty(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    if isinstance(value, list):
        return not value or all(_is_empty(m.get("content") if isinstance(m, dict) else m) for m in value)
    return False


def _write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")
