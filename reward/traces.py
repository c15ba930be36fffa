"""Reward traces: one Parquet file per PPO step (`traces/step-NNNNNN.parquet`), one row per rollout.

Readable with plain pyarrow/pandas (`pandas.read_parquet(path)`). Files are written atomically
(temp file in the same directory, fsync, then linked into place), never overwritten unless asked,
so a crash leaves either the complete file or nothing under the final name.

Schema (version `TRACE_SCHEMA_VERSION`, stored in the Parquet schema metadata under
`rto.trace_schema_version`). Per-token lists have one entry per response token (response-aligned,
EOS included, padding excluded), all the same length as `token_ids` within a row.

| column | type | null? | meaning |
|---|---|---|---|
| `step` | int64 | no | PPO step the rollout belongs to |
| `sample_id` | int64 | no | index of the rollout within the step |
| `prompt` | string | no | prompt text |
| `response` | string | no | response text |
| `tokens` | list<string> | no | response tokens as strings |
| `token_ids` | list<int64> | no | response token ids |
| `logprob` | list<float32> | no | log π(y_h) under the policy that generated the update |
| `ref_logprob` | list<float32> | no | log π_ref(y_h) |
| `dpo_logprob` | list<float32> | yes | log π_dpo(y_h); null in mode `ppo` |
| `reward_dpo` | list<float32> | yes | DPO term, scaled and clipped; null in mode `ppo` |
| `reward_kl` | list<float32> | no | −β2·(log π − log π_ref) |
| `reward` | list<float32> | no | total token reward = reward_dpo + reward_kl + rm_score at the last token |
| `value` | list<float32> | yes | critic values; null when no critic ran (e.g. scoring only) |
| `advantage` | list<float32> | yes | GAE advantages before whitening |
| `return` | list<float32> | yes | GAE returns (advantage + value) |
| `rm_score` | float32 | yes | β3·r_RM as added at the last token (normalised, clamped); null in mode `dpo` |
| `gt_reward` | float64 | yes | ground-truth reward of the response; null when the task has none |
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # traces are read without importing torch (fast `rto traces`)
    from torch import Tensor

TRACE_SCHEMA_VERSION = "1"
_VERSION_KEY = b"rto.trace_schema_version"
_STEP_FILE = re.compile(r"^step-(\d{6,})\.parquet$")

_PER_TOKEN_FLOAT = ["logprob", "ref_logprob", "dpo_logprob", "reward_dpo", "reward_kl", "reward"]
_PER_TOKEN_FLOAT += ["value", "advantage", "return"]
_NULLABLE = {"dpo_logprob", "reward_dpo", "value", "advantage", "return", "rm_score", "gt_reward"}

TRACE_SCHEMA = pa.schema(
    [
        pa.field("step", pa.int64(), nullable=False),
        pa.field("sample_id", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("response", pa.string(), nullable=False),
        pa.field("tokens", pa.list_(pa.string()), nullable=False),
        pa.field("token_ids", pa.list_(pa.int64()), nullable=False),
        *[pa.field(name, pa.list_(pa.float32()), nullable=name in _NULLABLE) for name in _PER_TOKEN_FLOAT],
        pa.field("rm_score", pa.float32(), nullable=True),
        pa.field("gt_reward", pa.float64(), nullable=True),
    ],
    metadata={_VERSION_KEY: TRACE_SCHEMA_VERSION.encode()},
)
TRACE_COLUMNS = TRACE_SCHEMA.names


def trace_path(trace_dir: str | os.PathLike, step: int) -> Path:
    """`trace_dir/step-NNNNNN.parquet`."""
    return Path(trace_dir) / f"step-{step:06d}.parquet"


def _plain(value: Any) -> Any:
    """Tensors and numpy arrays → Python lists/scalars."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return value.tolist() if hasattr(value, "tolist") else value


def _to_rows(rows_or_columns: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict[str, Any]]:
    if isinstance(rows_or_columns, Mapping):
        columns = {name: _plain(values) for name, values in rows_or_columns.items()}
        lengths = {name: len(values) for name, values in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"trace columns have different lengths: {lengths}")
        count = next(iter(lengths.values()), 0)
        return [{name: _plain(values[i]) for name, values in columns.items()} for i in range(count)]
    return [{name: _plain(value) for name, value in row.items()} for row in rows_or_columns]


def _check_rows(rows: list[dict[str, Any]]) -> None:
    for i, row in enumerate(rows):
        unknown = set(row) - set(TRACE_COLUMNS)
        if unknown:
            raise ValueError(f"trace row {i}: unknown columns {sorted(unknown)}; expected {TRACE_COLUMNS}")
        for name in TRACE_COLUMNS:
            if name not in _NULLABLE and row.get(name) is None:
                raise ValueError(f"trace row {i}: column '{name}' is required")
        length = len(row["token_ids"])
        for name in ["tokens", *_PER_TOKEN_FLOAT]:
            values = row.get(name)
            if values is not None and len(values) != length:
                raise ValueError(f"trace row {i}: '{name}' has {len(values)} entries, token_ids has {length}")


def trace_columns(
    *,
    step: int,
    prompts: Sequence[str],
    responses: Sequence[str],
    tokens: Sequence[Sequence[str]],
    token_ids: Tensor,
    response_mask: Tensor,
    rm_score: Tensor | None = None,
    gt_reward: Sequence[float | None] | None = None,
    sample_ids: Sequence[int] | None = None,
    **per_token: Tensor | None,
) -> dict[str, list]:
    """Trace columns from a response-aligned batch: every `[B, R]` tensor (`token_ids` and the
    per-token columns passed by name, e.g. `logprob=`, `reward_dpo=`, `return=` via `**{"return": …}`)
    is cut to each row's `response_mask` length. A None per-token tensor gives a null column."""
    unknown = set(per_token) - set(_PER_TOKEN_FLOAT)
    if unknown:
        raise ValueError(
            f"unknown per-token trace columns {sorted(unknown)}; expected some of {_PER_TOKEN_FLOAT}"
        )
    lengths = (response_mask > 0).sum(dim=1).tolist()
    batch_size = len(lengths)

    def cut(tensor: Tensor) -> list[list]:
        return [row[:n] for row, n in zip(tensor.detach().cpu().tolist(), lengths, strict=True)]

    columns: dict[str, list] = {
        "step": [step] * batch_size,
        "sample_id": list(sample_ids) if sample_ids is not None else list(range(batch_size)),
        "prompt": list(prompts),
        "response": list(responses),
        "tokens": [list(t) for t in tokens],
        "token_ids": cut(token_ids),
    }
    for name, tensor in per_token.items():
        columns[name] = [None] * batch_size if tensor is None else cut(tensor)
    if rm_score is not None:
        columns["rm_score"] = rm_score.detach().cpu().tolist()
    if gt_reward is not None:
        columns["gt_reward"] = list(gt_reward)
    return columns


def traces_table(rows_or_columns: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> pa.Table:
    """Validated Arrow table with `TRACE_SCHEMA` from rows (dicts) or columns (dict of lists).
    Values may be lists, numpy arrays or tensors; optional columns left out are null."""
    rows = _to_rows(rows_or_columns)
    _check_rows(rows)
    return pa.Table.from_pylist(rows, schema=TRACE_SCHEMA)


def write_traces(
    path: str | os.PathLike,
    rows_or_columns: Sequence[Mapping[str, Any]] | Mapping[str, Any] | pa.Table,
    *,
    overwrite: bool = False,
) -> Path:
    """Write one trace file atomically. FileExistsError if `path` exists and not `overwrite`."""
    path = Path(path)
    table = rows_or_columns if isinstance(rows_or_columns, pa.Table) else traces_table(rows_or_columns)
    if not overwrite and path.exists():
        raise FileExistsError(f"trace file already exists: {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(temp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if overwrite:
            os.replace(temp, path)
        else:
            _link_without_clobbering(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _link_without_clobbering(temp: Path, path: Path) -> None:
    try:
        os.link(temp, path)  # fails if `path` appeared meanwhile: never clobbers a concurrent writer
    except FileExistsError:
        raise FileExistsError(f"trace file already exists: {path}") from None
    except OSError:  # no hard links on this filesystem: check, then rename
        if path.exists():
            raise FileExistsError(f"trace file already exists: {path}") from None
        os.replace(temp, path)
        return
    os.unlink(temp)


def remove_stale_temp_files(trace_dir: str | os.PathLike) -> int:
    """Delete temp files left by writers that were killed (call on resume, with no writer running)."""
    directory = Path(trace_dir)
    if not directory.is_dir():
        return 0
    stale = [p for p in directory.iterdir() if p.name.startswith(".") and ".parquet.tmp-" in p.name]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on this platform / filesystem
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def list_trace_steps(trace_dir: str | os.PathLike) -> list[int]:
    """Sorted steps that have a complete trace file in `trace_dir` (temp files are ignored)."""
    directory = Path(trace_dir)
    if not directory.is_dir():
        return []
    steps = [int(m.group(1)) for p in directory.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(steps)


def _read_file(path: Path) -> pa.Table:
    """One trace file, checked: readable Parquet, our schema version, every column of the schema
    with its type (ValueError otherwise; `FileNotFoundError` passes through)."""
    try:
        table = pq.read_table(path)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    version = (table.schema.metadata or {}).get(_VERSION_KEY, b"").decode(errors="replace")
    if version != TRACE_SCHEMA_VERSION:
        raise ValueError(
            f"{path}: trace schema version {version or 'missing'}, expected {TRACE_SCHEMA_VERSION} "
            "(written by another version of rto)"
        )
    missing = [name for name in TRACE_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"{path}: trace file of schema {version} lacks the columns {missing}")
    for field in TRACE_SCHEMA:
        actual = table.schema.field(field.name).type
        if not _same_kind(actual, field.type):
            raise ValueError(f"{path}: column '{field.name}' is {actual}, expected {field.type}")
    return table.select(TRACE_COLUMNS).cast(TRACE_SCHEMA)


def _same_kind(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Whether a column written by another Parquet writer holds what the schema means (lists of
    numbers of any width, strings of either size, nulls where nothing was written)."""
    if pa.types.is_null(actual):
        return True
    if pa.types.is_list(expected) or pa.types.is_large_list(expected):
        return (pa.types.is_list(actual) or pa.types.is_large_list(actual)) and _same_kind(
            actual.value_type, expected.value_type
        )
    if pa.types.is_floating(expected):
        return pa.types.is_floating(actual) or pa.types.is_integer(actual)
    if pa.types.is_integer(expected):
        return pa.types.is_integer(actual)
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    return actual.equals(expected)


def read_traces(path_or_dir: str | os.PathLike, step: int | None = None) -> pd.DataFrame:
    """Trace rows as a DataFrame, from one file or from every `step-*.parquet` in a directory
    (in step order), optionally only one step. Per-token columns come back as numpy arrays."""
    path = Path(path_or_dir)
    if path.is_dir():
        steps = list_trace_steps(path) if step is None else [step]
        files: Iterable[Path] = [trace_path(path, s) for s in steps]
    else:
        files = [path]
    tables = []
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"no trace file {file}")
        tables.append(_read_file(file))
    table = pa.concat_tables(tables) if tables else TRACE_SCHEMA.empty_table()
    frame = table.to_pandas()
    if step is not None and not path.is_dir():
        frame = frame[frame["step"] == step].reset_index(drop=True)
    frame.attrs["trace_schema_version"] = TRACE_SCHEMA_VERSION
    return frame
