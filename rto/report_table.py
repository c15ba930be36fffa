"""The table printed at the end of `rto run`."""

from __future__ import annotations

from rich.table import Table

from rto.progress import console


def policy_label(
    name: str, ppo_mode: str | None, sentence_reward: str | None = None, base_path: str | None = None
) -> str:
    """The ppo stage's policy is named by the reward it was trained with, the base policy by its
    source (`policy.path`'s last component; "random init" for a built-in architecture); `X+method`
    is policy X generating with vision-token pruning."""
    if "+" in name:
        policy, method = name.split("+", 1)
        return f"{policy_label(policy, ppo_mode, sentence_reward, base_path)} + {method}"
    base = "random init" if base_path is None else f"start ({base_path.rstrip('/').rsplit('/', 1)[-1]})"
    labels = {"base": base, "sft": "SFT", "dpo": "DPO"}
    if name == "ppo" and sentence_reward == "ground_truth":
        return {"rto": "RTO (ground truth)", "ppo": "PPO (ground truth)"}.get(ppo_mode or "rto", "PPO")
    if name == "ppo":
        return {"rto": "RTO", "ppo": "PPO (sentence)"}.get(ppo_mode or "rto", f"PPO ({ppo_mode} reward)")
    return labels.get(name, name)


def print_summary(summary: dict, stages: list[str]) -> None:
    evals = summary.get("eval", {}).get("policies")
    if evals:
        table = Table(title="Held-out evaluation: mean ground-truth reward and more")
        table.add_column("policy")
        columns = [
            c
            for c in ("gt_reward", "grammatical", "terminated", "rm_score", "length")
            if any(c in v for v in evals.values())
        ]
        if any("gt_se" in v for v in evals.values()):  # the mean's standard error, beside it
            columns.insert(1, "gt_se")
        for c in columns:
            table.add_column("± s.e." if c == "gt_se" else c, justify="right")
        order = {"base": 0, "sft": 1, "dpo": 2, "ppo": 3}
        for name, row in sorted(evals.items(), key=lambda kv: (order.get(kv[0].split("+")[0], 9), kv[0])):
            table.add_row(
                policy_label(
                    name,
                    summary["eval"].get("ppo_reward_mode"),
                    summary.get("ppo", {}).get("sentence_reward"),
                    summary["eval"].get("base_policy"),
                ),
                *(f"{row[c]:.3f}" if isinstance(row.get(c), float | int) else "-" for c in columns),
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
