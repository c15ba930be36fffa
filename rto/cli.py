"""The `rto` command line. Bad input exits with code 2 and a one-line message; anything else 1."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from rto import jobs
from rto.config import check_stage_inputs, load_config
from rto.errors import ClusterError, UserError
from rto.progress import quiet_libraries
from rto.report_table import print_summary
from rto.rundir import RunDir

app = typer.Typer(
    name="rto",
    help="Reinforced Token Optimization: DPO-derived token rewards + distributed PPO on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

SetOption = typer.Option(None, "--set", help="Override a config field: --set ppo.steps=10 (repeatable)")
VerboseOption = typer.Option(
    False, "--verbose", "-v", help="Show the libraries' output too (by default it goes to RUN_DIR/rto.log)"
)


def default_run_dir(config: Path) -> Path:
    return Path("runs") / config.stem


def run_dir_path(value: str | None, config: Path) -> Path:
    """`--run-dir` as a path (default runs/<config name>); an empty value is an error, not '.'."""
    if value is None:
        return default_run_dir(config)
    if not value.strip():
        raise UserError("is empty; give a run directory", field="--run-dir")
    return Path(value)


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Job file (YAML)"),
    overrides: list[str] = SetOption,
    run_dir: str = typer.Option(
        None, "--run-dir", help="Run directory whose finished stages may provide the stages' inputs"
    ),
) -> None:
    """Check a job file (and overrides) without running anything: every setting, and that each
    stage's inputs come from a listed stage (or, with --run-dir, one already finished there)."""

    cfg = load_config(config, overrides or [])
    finished = RunDir(run_dir_path(run_dir, config)).finished_stages() if run_dir is not None else set()
    check_stage_inputs(cfg, finished, str(config))
    typer.echo(f"{config}: ok (stages: {', '.join(cfg.stages)})")


@app.command()
def run(
    config: Path = typer.Argument(..., help="Job file (YAML)"),
    overrides: list[str] = SetOption,
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory (default: runs/<config name>)"),
    resume: bool = typer.Option(
        False, "--resume", help="Continue an interrupted ppo stage from its last checkpoint"
    ),
    secret_files: list[str] = typer.Option(
        None, "--secret-file", help="NAME=PATH: read the file PATH into the environment variable NAME first"
    ),
    verbose: bool = VerboseOption,
) -> None:
    """Run a job's stages; finished stages with the same settings are skipped."""
    read_secret_files(secret_files or [], os.environ)
    from pipelines.runner import run_job  # deferred: torch, transformers, ray (start-up time of the CLI)

    cfg = load_config(config, overrides or [])
    run_dir = run_dir_path(run_dir, config)
    RunDir(run_dir).check_usable()
    check_stage_inputs(cfg, RunDir(run_dir).finished_stages(), str(config))
    summary = run_job(cfg, run_dir, resume=resume, verbose=verbose)
    print_summary(summary, cfg.stages)


def read_secret_files(pairs: list[str], environ) -> None:
    """`--secret-file NAME=PATH`: the file's content (stripped) becomes the variable NAME; a
    secret passed by reference never appears in a command line, a job's metadata or a config."""
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            raise UserError(f"expected NAME=PATH, got '{name}=…'", field="--secret-file")
        try:
            environ[name] = Path(path).expanduser().read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(
                f"cannot read the secret file for {name}: {type(exc).__name__}",
                source=path,
                field="--secret-file",
            ) from None


@app.command()
def score(
    config: Path = typer.Argument(..., help="Job file (YAML) whose reward settings to use"),
    overrides: list[str] = SetOption,
    run_dir: str = typer.Option(None, "--run-dir", help="Run directory with finished sft/dpo/rm stages"),
    responses: Path = typer.Option(
        None, "--responses", help="JSONL/Parquet with prompt + response columns (default: sample the policy)"
    ),
    output: Path = typer.Option(
        None, "-o", "--output", help="Trace file to write (default: RUN_DIR/scores/scored-<mode>.parquet)"
    ),
    samples: int = typer.Option(
        64, "--samples", min=1, help="Responses to sample when --responses is not given"
    ),
    verbose: bool = VerboseOption,
) -> None:
    """Score responses with the configured token reward and write one trace file (before any PPO)."""
    from pipelines.score import score_responses  # deferred: torch, transformers (start-up time)

    cfg = load_config(config, overrides or [])
    path = score_responses(cfg, run_dir_path(run_dir, config), responses, output, samples, verbose)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------- cluster jobs

AddressOption = typer.Option(
    None,
    "--address",
    help="Ray dashboard of the cluster, http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, an http "
    "$RAY_ADDRESS, or http://127.0.0.1:8265)",
)
JobIdArgument = typer.Argument(..., help="Job id, as printed by `rto submit` / `rto jobs list`")


@app.command()
def submit(
    config: Path = typer.Argument(..., help="Job file (YAML); validated here before submitting"),
    address: str = AddressOption,
    overrides: list[str] = SetOption,
    run_dir: str = typer.Option(
        None,
        "--run-dir",
        help="Run directory on the cluster: an absolute path on the node running the job (the head) "
        "or shared storage (default: ~/rto-runs/<job id> there)",
    ),
    env: list[str] = typer.Option(
        None, "--env", help="Environment variable for the job: KEY=VALUE (repeatable)"
    ),
    resume: bool = typer.Option(False, "--resume", help="Pass --resume to `rto run` (continue a ppo stage)"),
    job_id: str = typer.Option(
        None, "--job-id", help="Submission id, [A-Za-z0-9._-] (default: rto-<config>-<time>-<random>)"
    ),
    secret_files: list[str] = typer.Option(
        None,
        "--secret-file",
        help="NAME=PATH: the job reads the file PATH on the cluster into the environment variable NAME "
        "(only the path is sent; repeatable)",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="List exactly what would be sent (files, entrypoint, environment) and stop"
    ),
    follow: bool = typer.Option(
        False,
        "--follow",
        "-f",
        help="Stream the job's output until it ends; exit 0 if it succeeded, 1 if it failed or was stopped",
    ),
) -> None:
    """Submit a job to a Ray cluster: the project's code and the resolved job file travel with it."""

    plan = jobs.prepare_submission(
        config, overrides or [], run_dir, env or [], resume, job_id, secret_files or []
    )
    addr = jobs.resolve_address(address)
    if dry_run:
        size = sum(source.stat().st_size for source, _ in plan.files) + len(plan.config_text)
        typer.echo(
            f"would submit {plan.job_id} to {addr}: {len(plan.files) + 1} files, {size / 1024:.0f} KiB"
        )
        for _, relative in plan.files:
            typer.echo(f"  {relative}")
        typer.echo(f"  {plan.config_rel}")
        typer.echo(f"entrypoint: {plan.entrypoint}")
        typer.echo("environment: " + " ".join(sorted(plan.env_vars)))
        for path in plan.read_on_cluster:
            typer.echo(f"read on the cluster (not sent): {path}")
        typer.echo("nothing was sent (--dry-run)")
        return
    submitted = jobs.submit(plan, address)
    typer.echo(f"submitted {submitted} to {addr}")
    typer.echo(f"run directory on the cluster: {plan.run_dir_shown}")
    if not follow:
        typer.echo(f"watch: rto jobs status {submitted} --wait --address {addr}")
        typer.echo(f"logs:  rto jobs logs {submitted} --follow --address {addr}")
        return
    jobs.follow_logs(address, submitted, lambda chunk: typer.echo(chunk, nl=False))
    info = jobs.wait_for(address, submitted, None)
    typer.echo(f"{submitted}: {info.status}")
    if str(info.status) != "SUCCEEDED":
        raise SystemExit(1)  # (typer.Exit's code is swallowed by standalone_mode=False in main())


cluster_app = typer.Typer(
    help="Ray nodes on this machine, started and stopped by rto: up (a head), join (a node), status, down.",
    no_args_is_help=True,
)
app.add_typer(cluster_app, name="cluster")
CpusOption = typer.Option(None, "--num-cpus", help="CPUs the node offers Ray (default: this machine's)")
NodeResourcesOption = typer.Option(
    None, "--resources", help="""Custom resources, JSON: '{"trainer": 4}' (groups pin to them)"""
)
HostOption = typer.Option(
    "127.0.0.1", "--host", help="This machine's address the cluster uses (default loopback)"
)


@cluster_app.command("up")
def cluster_up(
    port: int = typer.Option(6379, "--port", help="The head's GCS port"),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="The dashboard (job API) port"),
    num_cpus: float = CpusOption,
    resources: str = NodeResourcesOption,
    host: str = HostOption,
    dashboard_host: str = typer.Option(
        "127.0.0.1", "--dashboard-host", help="Where the dashboard listens (0.0.0.0: every interface)"
    ),
) -> None:
    """Start a Ray head on this machine (in the background) and say how to add nodes and submit."""
    from rto import cluster  # deferred: start-up time of every other command

    head = cluster.cluster_up(
        port=port, dashboard_port=dashboard_port, num_cpus=_cpus(num_cpus),
        resources=cluster.parse_resources(resources), host=host, dashboard_host=dashboard_host,
    )  # fmt: skip
    auth = "on" if cluster.ray_env().get("RAY_AUTH_MODE") == "token" else "off"
    typer.echo(
        f"head {head.gcs_address} (pid {head.pid}, dashboard {head.dashboard}, token authentication {auth})"
    )
    typer.echo(f"add a node:  rto cluster join {head.gcs_address}")
    typer.echo(f"submit:      rto submit JOB --address {head.dashboard}")
    typer.echo("stop:        rto cluster down")


@cluster_app.command("join")
def cluster_join(
    address: str = typer.Argument(..., help="HOST:PORT of the head's GCS (what `rto cluster up` printed)"),
    num_cpus: float = CpusOption,
    resources: str = NodeResourcesOption,
    host: str = HostOption,
) -> None:
    """Start a Ray node on this machine that joins the head at ADDRESS (token mode set as the head's)."""
    from rto import cluster  # deferred: start-up time of every other command

    node = cluster.cluster_join(
        address, num_cpus=_cpus(num_cpus), resources=cluster.parse_resources(resources), host=host
    )
    typer.echo(f"node joined {node.gcs_address} (pid {node.pid}, {_number(node.num_cpus)} CPUs)")


@cluster_app.command("status")
def cluster_status() -> None:
    """The nodes rto started on this machine: role, process, alive, address."""
    from rto import cluster  # deferred: start-up time of every other command

    nodes = cluster.recorded_nodes()
    if not nodes:
        typer.echo(f"no nodes started by rto ({cluster.state_file()})")
    for node in nodes:
        state = "alive" if node.alive() else "gone"
        extra = f" {node.resources}" if node.resources else ""
        typer.echo(
            f"{node.role:<7}pid {node.pid:<8}{state:<6}{node.gcs_address}  {_number(node.num_cpus)} CPUs{extra}"
        )


@cluster_app.command("down")
def cluster_down() -> None:
    """Stop every node rto started on this machine (by their process sessions; no `ray stop`)."""
    from rto import cluster  # deferred: start-up time of every other command

    for node in cluster.cluster_down():
        typer.echo(f"stopped the {node.role} node (pid {node.pid})")


def _cpus(value: float | None) -> float:
    if value is None:
        return float(os.cpu_count() or 1)
    if value < 0:
        raise UserError(f"expected a number >= 0, got {value:g}", field="--num-cpus")
    return value


def _number(value: float | None) -> str:
    return "-" if value is None else (str(int(value)) if float(value).is_integer() else str(value))


jobs_app = typer.Typer(help="Jobs on a Ray cluster: list, status, logs, stop.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


@jobs_app.command("list")
def jobs_list(address: str = AddressOption) -> None:
    """Every job the cluster knows, oldest first."""

    columns = ["job", "status", "started", "duration", "config", "run dir"]
    rows = [[jobs.describe(job)[c] for c in columns] for job in jobs.list_jobs(address)]
    widths = [max(len(str(v)) for v in column) for column in zip(columns, *rows, strict=True)]
    for row in [columns, *rows]:  # plain columns: ids are never cut, and the output greps well
        typer.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@jobs_app.command("status")
def jobs_status(
    job_id: str = JobIdArgument,
    address: str = AddressOption,
    wait: bool = typer.Option(
        False, "--wait", help="Wait until the job ends; exit 0 if it succeeded, 1 if it failed or was stopped"
    ),
    timeout: float = typer.Option(None, "--timeout", help="With --wait: give up after this many seconds"),
) -> None:
    """A job's status, run directory and timing."""

    if wait:
        info = jobs.wait_for(
            address, job_id, timeout, on_change=lambda j: typer.echo(f"{jobs.job_id_of(j)}: {j.status}")
        )
    else:
        info = jobs.job_info(address, job_id)
    for key, value in jobs.describe(info).items():
        typer.echo(f"{key + ':':<12}{value}")
    placement = jobs.group_placement(address, info)
    if placement:
        typer.echo("groups:" if str(info.status) == "RUNNING" else "groups (last placement):")
        for group, where in placement.items():
            typer.echo(f"  {group:<10}{where}")
    if wait and str(info.status) != "SUCCEEDED":
        raise SystemExit(1)  # (typer.Exit's code is swallowed by standalone_mode=False in main())


@jobs_app.command("logs")
def jobs_logs(
    job_id: str = JobIdArgument,
    address: str = AddressOption,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep streaming until the job ends"),
) -> None:
    """A job's output (driver stdout and stderr)."""

    if follow:
        jobs.follow_logs(address, job_id, lambda chunk: typer.echo(chunk, nl=False))
    else:
        typer.echo(jobs.logs(address, job_id), nl=False)


@jobs_app.command("stop")
def jobs_stop(job_id: str = JobIdArgument, address: str = AddressOption) -> None:
    """Ask a running job to stop (SIGTERM to its driver, then SIGKILL)."""

    if jobs.stop(address, job_id):
        typer.echo(f"stopping {job_id}")
    else:
        typer.echo(f"{job_id} is not running ({jobs.job_info(address, job_id).status})")


# ---------------------------------------------------------------- inspecting runs


@app.command()
def traces(
    run_dir: Path = typer.Argument(..., help="Run directory (or one trace .parquet file)"),
    step: int = typer.Option(None, "--step", help="PPO step (default: the latest)"),
    sample: int = typer.Option(None, "--sample", help="Show one sample (its sample_id) token by token"),
    sort: str = typer.Option(
        "reward", "--sort", help="Rank samples by: reward, gt, rm, dpo, kl, advantage, length"
    ),
    color: str = typer.Option(
        "reward", "--color", help="Colour tokens by: reward, dpo, kl, value, advantage, return"
    ),
    top: int = typer.Option(3, "--top", min=1, help="Best and worst samples to show"),
) -> None:
    """Reward traces of a step: coloured tokens, per-sample breakdown, best and worst samples."""
    from reward.views import show_traces  # deferred: pandas, pyarrow (start-up time of the CLI)

    show_traces(run_dir, step=step, sample=sample, sort=sort, color=color, top=top)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="Run directory (finished or still running)"),
    output: Path = typer.Option(Path("report.html"), "-o", "--output", help="HTML file to write"),
    steps: list[int] = typer.Option(
        None, "--step", help="Steps whose tokens to show (default: first, middle, last)"
    ),
    samples: int = typer.Option(
        3, "--samples", min=1, help="Best and worst samples per step in the heatmaps"
    ),
) -> None:
    """One self-contained HTML page: curves, stage summary and token heatmaps (opens offline)."""
    from rto.report import write_report  # deferred: pandas, pyarrow, matplotlib (start-up time)

    path = write_report(run_dir, output, steps=steps or None, samples=samples)
    typer.echo(f"wrote {path}")


def main() -> None:

    quiet_libraries()
    try:
        code = app(standalone_mode=False)  # returns a typer.Exit's code instead of raising it
    except (UserError, ClusterError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", None) if isinstance(exc, typer.Exit) else exc.code
        sys.exit(code or 0)
    except Exception as exc:
        # usage errors from (typer's vendored) click: print them like click does, exit 2
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
