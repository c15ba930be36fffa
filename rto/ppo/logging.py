"""Where each PPO step's figures go: metrics.jsonl, TensorBoard (default) and W&B (optional)."""

from __future__ import annotations

import os
import shutil
import time

from reward.traces import read_traces, trace_path
from reward.views import best_and_worst, markdown_sample, rank
from rto.errors import UserError
from rto.ppo.config import PPOJob
from rto.rundir import RunDir, atomic_write_text


class StepLogger:
    def __init__(self, run: RunDir, tensorboard: bool, wandb: bool, cfg: PPOJob):
        self.run = run
        self.mode = cfg.reward.mode if cfg is not None else None
        self.sentence_reward = cfg.reward.sentence_reward if cfg is not None else "rm"
        self.records: list[dict] = []
        self.tb = None
        self.wandb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run.root / "tensorboard" / "ppo"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise UserError("W&B logging needs `pip install wandb`", field="ppo.wandb") from None
            self.wandb = wandb_module.init(
                project=os.environ.get("WANDB_PROJECT", "rto"),
                dir=str(run.root),
                config=cfg.model_dump(mode="json"),
            )

    def continue_after(self, step: int) -> None:
        """The run continues after ``step`` (0: from the start): TensorBoard drops every event an
        earlier attempt (killed, or rewound to a checkpoint) logged past it, as metrics.jsonl and
        the traces do, so no step is shown twice."""
        self.records = [r for r in self.records if r["step"] <= step]
        if self.tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb.close()
            self.tb = SummaryWriter(log_dir=self.tb.log_dir, purge_step=step + 1)

    def archive_previous(self) -> None:
        """A fresh ppo run in a directory that has older traces moves them aside instead of mixing."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if self.run.traces_dir.is_dir() and any(self.run.traces_dir.iterdir()):
            target = self.run.root / "archive" / f"traces-{stamp}"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.run.traces_dir), str(target))
        old = self.run.read_metrics("ppo")
        if old:
            import json

            atomic_write_text(
                self.run.root / "archive" / f"ppo-metrics-{stamp}.jsonl",
                "".join(json.dumps(r) + "\n" for r in old),
            )
            self.run.truncate_metrics("ppo", 0)

    def log(self, step: int, record: dict) -> None:
        record = {"step": step, **record}
        self.records.append(record)
        self.run.append_metrics({"stage": "ppo", **record})
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self.tb.add_scalar(f"ppo/{key}", value, step)
            self._log_trace_text(step)
        if self.wandb is not None:
            self.wandb.log({f"ppo/{k}": v for k, v in record.items()}, step=step)

    def _log_trace_text(self, step: int) -> None:
        """The step's best and worst samples (by total reward) with their per-token rewards, as
        Markdown in TensorBoard's text tab. A step without a trace file (skipped batch) has none."""

        path = trace_path(self.run.traces_dir, step)
        if not path.is_file():
            return
        frame = read_traces(path)
        if frame.empty:
            return
        best, worst = best_and_worst(rank(frame, "reward"), 1)
        for tag, part in (("best", best), ("worst", worst)):
            if len(part):
                row = frame.loc[part.index[0]]
                self.tb.add_text(f"traces/{tag}", markdown_sample(row, f"step {step}, {tag} sample"), step)

    def summary(self, state: dict) -> dict:
        rows = self.run.read_metrics("ppo")
        done = [r for r in rows if not r.get("skipped")]
        out = {"steps": state["step"], "skipped_batches": state["skipped_batches"], "reward_mode": self.mode}
        if self.sentence_reward != "rm":
            out["sentence_reward"] = self.sentence_reward
        for key in ("gt_reward", "rm_score", "kl", "reward_total"):
            values = [r[key] for r in done if key in r]
            if values:
                out[f"first_{key}"] = values[0]
                tail = values[-3:]
                out[f"final_{key}"] = sum(tail) / len(tail)
        times = [r["time_step"] for r in done if "time_step" in r]
        if times:
            out["mean_step_seconds"] = sum(times) / len(times)
        return out

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
