"""The table printed at the end of `rto run`."""

from __future__ import annotations

from rich.table import Table

from rto.progress import console


def print_summary(summary: dict, stages: list[str]) -> None:
    evals = summary.get("eval", {}).get("policies")
    if evals:
        table = Table(title="Held-out evaluation")
        table.add_column("policy")
        columns = [
            c
            for c in ("gt_reward", "grammatical", "terminated", "rm_score", "length")
            if any(c in v for v in evals.values())
        ]
        for c in columns:
            table.add_column(c, justify="right")
        for name, row in evals.items():
            table.add_row(
                name, *(f"{row[c]:.3f}" if isinstance(row.get(c), float | int) else "-" for c in columns)
            )
        console.print(table)
    table = Table(title="Stages")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("figures")
    for stage in stages:
        info = summary.get(stage, {})
        figures = ", ".join(
            f"{k}={v:.4g}" for k, v in info.items() if isinstance(v, float | int) and k != "seconds"
        )
        table.add_row(stage, str(info.get("seconds", "-")), figures[:120])
    console.print(table)
