"""The `rto` command line. Bad input exits with code 2 and a one-line message; anything else 1."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from rto.errors import UserError

app = typer.Typer(
    name="rto",
    help="Reinforced Token Optimization: DPO-derived token rewards + distributed PPO on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = typer.Option(None, "--set", help="Override a config field: --set ppo.steps=10 (repeatable)")


def default_run_dir(config: Path) -> Path:
    return Path("runs") / config.stem


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Job file (YAML)"),
    overrides: list[str] = SetOption,
) -> None:
    """Check a job file (and overrides) without running anything."""
    from rto.config import load_config

    cfg = load_config(config, overrides or [])
    typer.echo(f"{config}: ok (stages: {', '.join(cfg.stages)})")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Job file (YAML)"),
    overrides: list[str] = SetOption,
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory (default: runs/<config name>)"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted ppo stage from its last checkpoint"
    ),
) -> None:
    """Run a job's stages; finished stages with the same settings are skipped."""
    from rto.config import load_config
    from rto.runner import run_job

    cfg = load_config(config, overrides or [])
    run_dir = run_dir or default_run_dir(config)
    summary = run_job(cfg, run_dir, resume=resume)
    from rto.report_table import print_summary

    print_summary(summary, cfg.stages)


@app.command()
def score(
    config: Path = typer.Argument(..., help="Job file (YAML) whose reward settings to use"),
    overrides: list[str] = SetOption,
    run_dir: Path = typer.Option(None, "--run-dir", help="Run directory with finished sft/dpo/rm stages"),
    responses: Path = typer.Option(
        None, "--responses", help="JSONL/Parquet with prompt + response columns (default: sample the policy)"
    ),
    output: Path = typer.Option(
        None, "-o", "--output", help="Trace file to write (default: RUN_DIR/scores/scored-<mode>.parquet)"
    ),
    samples: int = typer.Option(
        64, "--samples", min=1, help="Responses to sample when --responses is not given"
    ),
) -> None:
    """Score responses with the configured token reward and write one trace file (before any PPO)."""
    from reward.score import score_responses
    from rto.config import load_config

    cfg = load_config(config, overrides or [])
    path = score_responses(cfg, run_dir or default_run_dir(config), responses, output, samples)
    typer.echo(f"wrote {path}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except UserError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None) if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code or 0)
    except Exception as exc:
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
