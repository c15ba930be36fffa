"""Views of reward traces: per-sample breakdowns, token colours, and the `rto traces` terminal view.

The same pieces serve the terminal (`rto traces`), the HTML report (`rto report`) and TensorBoard's
text tab (`rto.ppo.logging`). Everything here only reads: a run that is still being written is safe
to inspect (trace files appear atomically; temp files are ignored).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd

from reward.traces import list_trace_steps, read_traces
from rto.errors import UserError

# --color NAME -> per-token trace column
COMPONENTS = {
    "reward": "reward",
    "dpo": "reward_dpo",
    "kl": "reward_kl",
    "value": "value",
    "advantage": "advantage",
    "return": "return",
}
# --sort NAME -> breakdown column (higher is better)
SORT_KEYS = {
    "reward": "total",
    "gt": "gt",
    "rm": "rm",
    "dpo": "dpo",
    "kl": "kl",
    "advantage": "advantage",
    "length": "length",
}
_SPACE_MARKERS = ("Ġ", "▁")  # byte-level BPE / SentencePiece word-start markers


# ---------------------------------------------------------------- loading


def trace_source(path: Path) -> Path:
    """The trace directory of a run (or a single trace file); UserError when there is none."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet":
        return path
    if not path.is_dir():
        raise UserError("no such run directory", source=str(path))
    traces_dir = path / "traces"
    if not list_trace_steps(traces_dir):
        raise UserError(
            "no reward traces (traces/step-*.parquet) yet: the ppo stage writes them, `rto score` writes "
            "a single trace file",
            source=str(path),
        )
    return traces_dir


def load_step(path: Path, step: int | None = None) -> tuple[int, pd.DataFrame]:
    """(step, its trace rows) for a run directory or a trace file; the latest step by default."""
    source = trace_source(path)
    if source.is_file():
        frame = _read(source)
        available = sorted(set(frame["step"].tolist()))
        if not available:
            raise UserError("the trace file has no rows", source=str(source))
        step = available[-1] if step is None else step
        frame = frame[frame["step"] == step].reset_index(drop=True)
    else:
        available = list_trace_steps(source)
        step = available[-1] if step is None else step
        frame = _read(source, step) if step in available else pd.DataFrame()
    if frame.empty:
        raise UserError(
            f"no traces for step {step} (steps with traces: {_ranges(available)})",
            source=str(path),
            field="--step",
        )
    return step, frame


def _read(source: Path, step: int | None = None) -> pd.DataFrame:
    try:
        return read_traces(source, step)
    except FileNotFoundError:  # a resumed run removed the step between listing and reading
        return pd.DataFrame()
    except (ValueError, OSError) as exc:  # not a trace file, another schema version
        raise UserError(f"unreadable trace file: {exc}", source=str(source)) from None


def _ranges(steps: list[int]) -> str:
    if not steps:
        return "none"
    return f"{steps[0]}..{steps[-1]} ({len(steps)} files)" if len(steps) > 1 else str(steps[0])


# ---------------------------------------------------------------- figures


def _sum(values) -> float:
    return float(np.sum(values)) if values is not None else math.nan


def _mean(values) -> float:
    return float(np.mean(values)) if values is not None and len(values) else math.nan


def _scalar(value) -> float:
    return math.nan if value is None or pd.isna(value) else float(value)


def breakdown(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per sample: `dpo` and `kl` (summed token terms), `rm` (the RM term at the last token),
    `gt` (ground truth), `total` (sum of token rewards = dpo + kl + rm), `advantage` (mean over
    tokens), `value` (the critic's value of the first token) and `length` (tokens)."""
    return pd.DataFrame(
        {
            "sample_id": frame["sample_id"].astype(int),
            "length": frame["tokens"].map(len),
            "dpo": frame["reward_dpo"].map(_sum),
            "kl": frame["reward_kl"].map(_sum),
            "rm": frame["rm_score"].map(_scalar),
            "gt": frame["gt_reward"].map(_scalar),
            "total": frame["reward"].map(_sum),
            "advantage": frame["advantage"].map(_mean),
            "value": frame["value"].map(lambda v: float(v[0]) if v is not None and len(v) else math.nan),
        },
        index=frame.index,
    )


def rank(frame: pd.DataFrame, sort: str) -> pd.DataFrame:
    """The breakdown sorted best first by `sort` (a SORT_KEYS name); samples without it go last."""
    if sort not in SORT_KEYS:
        raise UserError(f"unknown sort key '{sort}'; expected one of {', '.join(SORT_KEYS)}", field="--sort")
    table = breakdown(frame)
    key = SORT_KEYS[sort]
    if table[key].isna().all():
        raise UserError(f"these traces have no '{sort}' figures", field="--sort")
    return table.sort_values(key, ascending=False, na_position="last", kind="stable")


def best_and_worst(table: pd.DataFrame, count: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The `count` first and `count` last rows of a ranked table, not overlapping."""
    count = min(count, math.ceil(len(table) / 2))
    best = table.head(count)
    worst = table.drop(best.index).tail(count)
    return best, worst.iloc[::-1]


def component_column(color: str) -> str:
    if color not in COMPONENTS:
        raise UserError(
            f"unknown component '{color}'; expected one of {', '.join(COMPONENTS)}", field="--color"
        )
    return COMPONENTS[color]


def color_scale(frame: pd.DataFrame, column: str) -> float:
    """Half-width of the colour range: the 98th percentile of |value| over the step's tokens. For the
    total reward the last tokens are left out: they carry the RM score, which would wash out the
    per-token terms (the last token then saturates; its figures are in the breakdown)."""
    values = [np.asarray(v, dtype=np.float64) for v in frame[column] if v is not None]
    if column == "reward":
        values = [v[:-1] for v in values]
    if not values:
        return 1.0
    flat = np.abs(np.concatenate(values))
    flat = flat[np.isfinite(flat)]
    scale = float(np.percentile(flat, 98)) if flat.size else 0.0
    return scale if scale > 0 else 1.0


def diverging_color(value: float, scale: float) -> tuple[str, str]:
    """(background, text) hex colours: red below zero, white at zero, blue above (ColorBrewer RdBu),
    saturating at ±scale; NaN is grey."""
    if value is None or not math.isfinite(value):
        return "#bdbdbd", "#000000"
    t = max(-1.0, min(1.0, value / scale))
    r, g, b, _ = _red_blue()(0.5 + 0.5 * t)
    text = "#ffffff" if abs(t) > 0.65 else "#000000"
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}", text


@functools.cache
def _red_blue():
    from matplotlib import colormaps

    return colormaps["RdBu"]  # (the registry hands out a copy per lookup)


def uses_space_markers(frame: pd.DataFrame) -> bool:
    return any(str(t).startswith(_SPACE_MARKERS) for tokens in frame["tokens"] for t in tokens)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text) -> str:
    """A trace string as it may reach a terminal: control characters (ANSI/OSC escape sequences
    start with ESC or CSI, OSC ends with BEL) become visible escapes such as ``\x1b``. Rich markup
    is not interpreted as long as the string goes into a `Text` (see `_cell`)."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def _cell(text):
    """A table cell holding `text` literally (a plain string cell would be parsed as rich markup)."""
    from rich.text import Text

    return Text(printable(text))


def display_tokens(tokens, space_markers: bool) -> list[str]:
    """Token strings as they read: word-start markers become spaces; without markers (a word-level
    tokenizer) tokens are separated by spaces."""
    out = []
    for i, token in enumerate(tokens):
        token = printable(token)
        if space_markers:
            if token.startswith(_SPACE_MARKERS):
                token = " " + token[1:]
            out.append(token.replace("Ċ", "\n"))
        else:
            out.append(token if i == 0 else " " + token)
    return out


def token_components(row: pd.Series, index: int) -> dict[str, float]:
    """Every per-token figure of token `index` (NaN for null columns)."""
    names = ["reward", "reward_dpo", "reward_kl", "value", "advantage", "return", "logprob", "ref_logprob"]
    names += ["dpo_logprob"]
    return {name: float(row[name][index]) if row[name] is not None else math.nan for name in names}


def markdown_sample(row: pd.Series, title: str) -> str:
    """A sample as Markdown (TensorBoard's text tab): its breakdown and a per-token table."""
    figures = breakdown(row.to_frame().T).iloc[0]
    lines = [
        f"**{title}** — sample {int(row['sample_id'])}: total {figures['total']:+.4f} = dpo "
        f"{figures['dpo']:+.4f} + kl {figures['kl']:+.4f} + rm {figures['rm']:+.4f}; gt {figures['gt']:+.3f}",
        "",
        f"prompt: {_md_escape(row['prompt'])}",
        "",
        "| # | token | reward | dpo | kl | value | advantage |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for i, token in enumerate(row["tokens"]):
        c = token_components(row, i)
        lines.append(
            f"| {i} | `{_md_escape(str(token))}` | {c['reward']:+.4f} | {c['reward_dpo']:+.4f} | "
            f"{c['reward_kl']:+.4f} | {c['value']:+.3f} | {c['advantage']:+.4f} |"
        )
    return "\n".join(lines)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("`", "'").replace("\n", " ")


# ---------------------------------------------------------------- the terminal view


def show_traces(
    path: Path,
    step: int | None = None,
    sample: int | None = None,
    sort: str = "reward",
    color: str = "reward",
    top: int = 3,
    console=None,
) -> None:
    """`rto traces`: the step's figures, the best and worst samples with coloured tokens, or one
    sample token by token (`sample`)."""
    from rich.console import Console

    console = console or Console(highlight=False)
    column = component_column(color)
    step, frame = load_step(path, step)
    if frame[column].isna().all():
        raise UserError(f"these traces have no '{color}' values (column {column} is null)", field="--color")
    scale = color_scale(frame, column)
    markers = uses_space_markers(frame)
    table = rank(frame, sort)
    _print_header(console, path, step, frame, color, scale)
    if sample is not None:
        matches = frame.index[frame["sample_id"] == sample]
        if len(matches) == 0:
            raise UserError(
                f"step {step} has no sample {sample} (sample ids {int(frame['sample_id'].min())}.."
                f"{int(frame['sample_id'].max())})",
                field="--sample",
            )
        row = frame.loc[matches[0]]
        _print_table(console, table.loc[[matches[0]]], f"sample {sample}", sort)
        _print_sample(console, row, column, scale, markers)
        _print_token_table(console, row)
        return
    best, worst = best_and_worst(table, top)
    for title, part in ((f"best {len(best)} by {sort}", best), (f"worst {len(worst)} by {sort}", worst)):
        _print_table(console, part, title, sort)
        for index in part.index:
            _print_sample(console, frame.loc[index], column, scale, markers)


def _print_header(console, path, step, frame, color, scale) -> None:
    from rich.text import Text

    figures = breakdown(frame)
    means = " · ".join(
        f"{name} {figures[name].mean():+.3f}"
        for name in ("total", "dpo", "kl", "rm", "gt")
        if figures[name].notna().any()
    )
    header = Text(f"step {step} · {len(frame)} samples", style="bold")
    header.append(f" · mean length {figures['length'].mean():.1f} · {printable(path)}")
    console.print(header)
    console.print(f"step means: {means}")
    legend = Text(f"colour = {color}: ")
    for value in np.linspace(-scale, scale, 5):
        background, text = diverging_color(value, scale)
        legend.append(f" {value:+.2g} ", style=f"{text} on {background}")
    legend.append(" (saturated beyond)")
    console.print(legend)


def _print_table(console, part: pd.DataFrame, title: str, sort: str) -> None:
    from rich.table import Table

    table = Table(title=title, title_justify="left", box=None, pad_edge=False)
    for name in ("sample", "tokens", "dpo", "kl", "rm", "total", "gt", "adv"):
        table.add_column(name, justify="right")
    for _, r in part.iterrows():
        table.add_row(
            str(int(r["sample_id"])), str(int(r["length"])), _fmt(r["dpo"]), _fmt(r["kl"]), _fmt(r["rm"]),
            _fmt(r["total"]), _fmt(r["gt"], 3), _fmt(r["advantage"]),
        )  # fmt: skip
    console.print()
    console.print(table)


def _fmt(value: float, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:+.{digits}f}"


def _print_sample(console, row: pd.Series, column: str, scale: float, markers: bool) -> None:
    from rich.text import Text

    text = Text()
    text.append(f"  #{int(row['sample_id'])} ", style="bold")
    text.append(f"{printable(row['prompt'])}\n  → ", style="dim")
    values = row[column]
    for token, value in zip(display_tokens(row["tokens"], markers), values, strict=True):
        stripped = token.lstrip(" ")
        text.append(token[: len(token) - len(stripped)])
        background, fg = diverging_color(float(value), scale)
        text.append(stripped, style=f"{fg} on {background}")
    console.print(text)


def _print_token_table(console, row: pd.Series) -> None:
    from rich.table import Table

    table = Table(box=None, pad_edge=False, collapse_padding=True)
    headers = {"reward": "reward", "reward_dpo": "dpo", "reward_kl": "kl", "value": "value",
               "advantage": "adv", "return": "return", "logprob": "logp", "ref_logprob": "ref logp"}  # fmt: skip
    names = list(headers)
    table.add_column("#", justify="right")
    table.add_column("token")
    for name in names:
        table.add_column(headers[name], justify="right")
    for i, token in enumerate(row["tokens"]):
        c = token_components(row, i)
        table.add_row(str(i), _cell(token), *[_fmt(c[name]) for name in names])
    console.print(table)
