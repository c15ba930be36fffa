"""`rto report`: one self-contained HTML page for a run directory (finished or still being written).

Curves are drawn with matplotlib and inlined as SVG; the token heatmaps are plain spans whose
`title` shows every component of the token, and a few lines of inline JavaScript switch the
component the colours show. Nothing is fetched when the page opens: no scripts, fonts or images
from elsewhere. The run directory is only read.
"""

from __future__ import annotations

import html
import io
import math
import re
import time
from pathlib import Path

import pandas as pd

from reward.traces import list_trace_steps, read_traces
from reward.views import (
    COMPONENTS,
    best_and_worst,
    color_scale,
    display_tokens,
    diverging_color,
    rank,
    token_components,
    uses_space_markers,
)
from rto.errors import UserError
from rto.rundir import RunDir, atomic_write_text, check_output_file

# (section title, [(panel title, {series label: metrics key})]) for the ppo curves
PPO_FIGURES = [
    ("Reward per step", [
        ("token reward (mean sum per sample)", {"total": "reward_total", "dpo term": "reward_dpo",
                                                "kl term": "reward_kl", "rm score": "rm_score"}),
        ("ground truth", {"gt reward": "gt_reward", "held-out": "heldout_gt"}),
    ]),
    ("Token reward model", [
        ("DPO term vs ground truth (AUC)", {"auc": "dpo_gt_auc"}),
        ("online DPO refresh", {"loss": "dpo_refresh_loss", "pair accuracy": "dpo_refresh_accuracy"}),
    ]),
    ("KL and losses", [
        ("KL to the reference", {"kl (per sample)": "kl"}),
        ("approx. KL of the update", {"approx kl": "approx_kl"}),
        ("policy loss", {"policy loss": "policy_loss"}),
        ("value loss", {"value loss": "value_loss"}),
    ]),
    ("Rollouts", [
        ("response length", {"tokens": "response_length"}),
        ("terminated", {"fraction": "terminated"}),
        ("entropy", {"entropy": "entropy"}),
        ("clip fraction", {"policy": "clip_frac", "value": "value_clip_frac"}),
    ]),
]  # fmt: skip
TRAINER_STAGES = ("sft", "dpo", "rm", "ftp")


# ---------------------------------------------------------------- plots


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, in step order; a step logged twice (a stage rerun after an
    interruption) keeps its latest value."""
    points = {
        r["step"]: r[key]
        for r in rows
        if isinstance(r.get(key), int | float) and isinstance(r.get("step"), int | float)
    }
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def svg_figure(panels: list[tuple[str, dict[str, tuple[list, list]]]], columns: int = 4) -> str:
    """Panels side by side (title, {label: (steps, values)}) as an inline <svg> element. Text stays
    text (no glyph definitions) and element ids are salted per figure, so several figures can share
    one page without id clashes."""
    import matplotlib

    global _figure_count
    _figure_count += 1
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"rto-figure-{_figure_count}"}):
        svg = _draw(panels, columns)
    referenced = set(re.findall(r'(?:href="#|url\(#)([^")]+)', svg))
    return re.sub(
        r'id="([^"]+)"',
        lambda m: m.group(0) if m.group(1) in referenced else f'id="fig{_figure_count}-{m.group(1)}"',
        svg,
    )


_figure_count = 0


def _draw(panels: list[tuple[str, dict[str, tuple[list, list]]]], columns: int) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig = Figure(figsize=(2.9 * columns + 0.6, 2.5 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels, strict=False):
        for label, (xs, ys) in lines.items():
            ax.plot(xs, ys, label=label, linewidth=1.4, marker="o" if len(xs) < 12 else None, markersize=3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return re.sub(r"<metadata>.*?</metadata>\s*", "", text[text.index("<svg") :], flags=re.DOTALL)


def _figures(metrics: list[dict]) -> list[str]:
    parts = []
    ppo = [r for r in metrics if r.get("stage") == "ppo" and not r.get("skipped")]
    for title, panel_specs in PPO_FIGURES:
        panels = []
        for panel_title, keys in panel_specs:
            lines = {label: _series(ppo, key) for label, key in keys.items()}
            lines = {label: xy for label, xy in lines.items() if xy[0]}
            if lines:
                panels.append((panel_title, lines))
        if panels:
            parts.append(f'<h3>{html.escape(title)}</h3><div class="plot">{svg_figure(panels)}</div>')
    trainers = []
    for stage in TRAINER_STAGES:
        xy = _series([r for r in metrics if r.get("stage") == stage], "loss")
        if xy[0]:
            trainers.append((f"{stage} training loss", {"loss": xy}))
    if trainers:
        parts.append(f'<h3>Training stages</h3><div class="plot">{svg_figure(trainers)}</div>')
    if not parts:
        parts.append("<p class='note'>No step metrics yet (metrics.jsonl is empty or missing).</p>")
    return parts


# ---------------------------------------------------------------- tables


def _fmt(value) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return html.escape(str(value))
    if isinstance(value, int) or (math.isfinite(value) and value == int(value) and abs(value) < 1e6):
        return str(int(value))
    return f"{value:.4g}"


def _summary_tables(summary: dict) -> str:
    if not summary:
        return "<p class='note'>No stage has finished yet (no summary.json).</p>"
    parts = []
    for stage, figures in summary.items():
        if not isinstance(figures, dict):
            parts.append(f"<h3>{html.escape(stage)}</h3><p>{_fmt(figures)}</p>")
            continue
        scalars = {k: v for k, v in figures.items() if not isinstance(v, dict)}
        rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in scalars.items())
        parts.append(f'<div class="stage"><h3>{html.escape(stage)}</h3><table>{rows}</table>')
        for name, nested in figures.items():
            if isinstance(nested, dict) and all(isinstance(v, dict) for v in nested.values()):
                parts.append(_matrix(name, nested))
        parts.append("</div>")
    return "".join(parts)


def _matrix(name: str, nested: dict[str, dict]) -> str:
    """{row: {column: value}} as one table (e.g. eval's policies × figures)."""
    columns = list(dict.fromkeys(c for row in nested.values() for c in row))
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        f"<tr><th>{html.escape(row)}</th>"
        + "".join(f"<td>{_fmt(v.get(c, ''))}</td>" for c in columns)
        + "</tr>"
        for row, v in nested.items()
    )
    return f"<h4>{html.escape(name)}</h4><table><tr><th></th>{head}</tr>{body}</table>"


# ---------------------------------------------------------------- token heatmaps


def _token_span(row: pd.Series, index: int, text: str, colors: dict[str, tuple[str, str]]) -> str:
    c = token_components(row, index)
    tip = f"#{index} {row['tokens'][index]!r}\n" + "\n".join(
        f"{name.replace('reward_', '')}: {value:+.4f}" for name, value in c.items() if math.isfinite(value)
    )
    data = " ".join(f'data-{name}="{bg}|{fg}"' for name, (bg, fg) in colors.items())
    bg, fg = colors["reward"]
    lead = text[: len(text) - len(text.lstrip(" "))]
    return (
        f'{lead}<span class="tok" style="background:{bg};color:{fg}" {data} '
        f'title="{html.escape(tip)}">{html.escape(text.lstrip(" "))}</span>'
    )


def _heatmap(step: int, frame: pd.DataFrame, samples: int) -> str:
    components = {name: col for name, col in COMPONENTS.items() if frame[col].notna().any()}
    scales = {name: color_scale(frame, col) for name, col in components.items()}
    markers = uses_space_markers(frame)
    best, worst = best_and_worst(rank(frame, "reward"), samples)
    legend = " ".join(f'data-{name}="{scales[name]:.3g}"' for name in components)
    parts = [
        f'<div class="step"><h3>step {step} <span class="note">({len(frame)} samples; colour range '
        f'<span class="scale" {legend}>±{scales["reward"]:.3g}</span>)</span></h3>'
    ]
    for title, part in (("best by total reward", best), ("worst by total reward", worst)):
        parts.append(f"<h4>{title}</h4>")
        for index, figures in part.iterrows():
            row = frame.loc[index]
            spans = []
            for i, text in enumerate(display_tokens(row["tokens"], markers)):
                colors = {
                    name: diverging_color(float(row[col][i]), scales[name])
                    for name, col in components.items()
                }
                spans.append(_token_span(row, i, text, colors))
            head = " · ".join(
                f"{name} {figures[key]:+.3f}"
                for name, key in (
                    ("total", "total"),
                    ("dpo", "dpo"),
                    ("kl", "kl"),
                    ("rm", "rm"),
                    ("gt", "gt"),
                )
                if math.isfinite(figures[key])
            )
            parts.append(
                f'<div class="sample"><div class="meta">#{int(row["sample_id"])} · {head} · '
                f'<span class="prompt">{html.escape(str(row["prompt"]))}</span></div>'
                f'<div class="tokens">{"".join(spans)}</div></div>'
            )
    parts.append("</div>")
    return "".join(parts)


def _heatmaps(traces_dir: Path, steps: list[int] | None, samples: int) -> str:
    available = list_trace_steps(traces_dir)
    if not available:
        return "<p class='note'>No reward traces yet (the ppo stage writes traces/step-*.parquet).</p>"
    if steps:
        missing = sorted(set(steps) - set(available))
        if missing:
            raise UserError(
                f"no traces for step(s) {missing} (available: {available[0]}..{available[-1]})",
                source=str(traces_dir),
                field="--step",
            )
    else:
        steps = sorted({available[0], available[len(available) // 2], available[-1]})
    parts = []
    for step in steps:
        try:
            frame = read_traces(traces_dir, step)
        except FileNotFoundError:  # removed by a resuming writer after we listed it
            continue
        except ValueError as exc:  # another schema version, missing columns, not Parquet
            raise UserError(f"unreadable trace file: {exc}", source=str(traces_dir)) from None
        if not frame.empty:
            parts.append(_heatmap(step, frame, samples))
    options = "".join(f'<option value="{n}">{n}</option>' for n in COMPONENTS)
    selector = (
        f'<p>Colour tokens by <select id="component">{options}</select> — red below zero, blue above; '
        "hover a token for all its components.</p>"
    )
    return selector + "".join(parts)


# ---------------------------------------------------------------- the page


STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1280px; }
h1 { font-size: 22px; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 32px; }
table { border-collapse: collapse; font-size: 13px; margin: 4px 16px 12px 0; }
th, td { padding: 2px 8px; text-align: right; border-bottom: 1px solid #eee; }
th:first-child { text-align: left; } .stage { display: inline-block; vertical-align: top; }
.note { color: #777; font-weight: normal; font-size: 13px; }
.plot svg { max-width: 100%; height: auto; }
.sample { margin: 6px 0 12px; } .meta { font-size: 12px; color: #555; } .prompt { font-style: italic; }
.tokens { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.tok { padding: 1px 2px; border-radius: 3px; cursor: default; }
pre { background: #f6f6f6; padding: 8px; font-size: 12px; overflow-x: auto; }
"""

SCRIPT = """
function showComponent(name) {
  document.querySelectorAll('span.tok').forEach(function (span) {
    var pair = span.dataset[name];
    if (pair) { var c = pair.split('|'); span.style.background = c[0]; span.style.color = c[1]; }
    else { span.style.background = '#bdbdbd'; span.style.color = '#000'; }
  });
  document.querySelectorAll('span.scale').forEach(function (span) {
    span.textContent = span.dataset[name] ? '\\u00b1' + span.dataset[name] : 'n/a';
  });
}
var select = document.getElementById('component');
if (select) {
  select.addEventListener('change', function (event) { showComponent(event.target.value); });
  var linked = /color=(\\w+)/.exec(window.location.hash);  // report.html#color=kl
  if (linked && select.querySelector('option[value="' + linked[1] + '"]')) {
    select.value = linked[1];
    showComponent(linked[1]);
  }
}
"""


def build_report(run_dir: Path, steps: list[int] | None = None, samples: int = 3) -> str:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError("no such run directory", source=str(run_dir))
    run = RunDir(run_dir)
    if not any(p.exists() for p in (run.config_path, run.metrics_path, run.summary_path, run.traces_dir)):
        raise UserError("not a run directory (no config.yaml, metrics.jsonl, summary.json or traces/)",
                        source=str(run_dir))  # fmt: skip
    metrics = run.read_metrics()
    summary = run.read_summary()  # a corrupt one is rebuilt from the stages' records
    config = run.config_path.read_text(errors="replace") if run.config_path.is_file() else ""
    done = (
        [p.name for p in sorted(run.stages_dir.glob("*")) if run.is_done(p.name)]
        if run.stages_dir.is_dir()
        else []
    )
    trace_steps = list_trace_steps(run.traces_dir)
    state = f"finished stages: {', '.join(done) or 'none'}"
    if trace_steps and "ppo" not in done:
        state += f" · ppo in progress (traces up to step {trace_steps[-1]})"
    title = f"rto report — {run_dir.resolve().name}"
    body = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='note'>{html.escape(str(run_dir.resolve()))} · {html.escape(state)} · "
        f"{len(metrics)} metric records · {len(trace_steps)} trace files · generated "
        f"{time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        "<h2>Curves</h2>",
        *_figures(metrics),
        "<h2>Stage summary</h2>",
        _summary_tables(summary),
        "<h2>Token rewards</h2>",
        _heatmaps(run.traces_dir, steps, samples),
    ]
    if config:
        body.append(
            f"<h2>Configuration</h2><details><summary>config.yaml</summary><pre>{html.escape(config)}</pre></details>"
        )
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>"
        + "\n".join(body)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(run_dir: Path, output: Path, steps: list[int] | None = None, samples: int = 3) -> Path:

    output = check_output_file(output, "-o")  # before the work: a bad target wastes nothing
    page = build_report(run_dir, steps, samples)
    atomic_write_text(output, page)
    return output
