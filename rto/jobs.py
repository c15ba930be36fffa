"""Jobs on a Ray cluster: `rto submit` and `rto jobs list|status|logs|stop`.

A job is `python -m rto.cli run <config> --run-dir <dir>` started by Ray's job-submission API on the
cluster whose dashboard answers at `--address` (http://HEAD:8265). What travels with the job:

* the project's code: a copy of the source checkout (`rto`, `reward`, `prune`, `pipelines`, configs,
  small data files), without virtual environments, `.git`, `runs/`, caches and files over
  `MAX_FILE_BYTES`; when rto is installed without a checkout, the four packages as `py_modules`;
* the job file, resolved (with the `--set` overrides) and with `resources.ray_address: auto`, so the
  job's Ray actors join the cluster the job runs on instead of starting a private Ray;
* environment variables (`--env KEY=VALUE`, plus `PYTHONUNBUFFERED=1` so logs stream).

The job runs with the cluster's Python (`python` on the PATH of the process that ran `ray start`):
its dependencies (torch, transformers, trl, deepspeed, ...) must be installed there; the submitted
code shadows any installed copy of rto. Results land in the run directory on the node that runs the
job driver (the head node, as Ray places drivers there): `--run-dir` (an absolute path on the
cluster, e.g. shared storage), by default `~/rto-runs/<job id>` in the home of the user who started
the cluster. The run directory is stored in the job's metadata and shown by `rto jobs status`.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from rto.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PACKAGES = ("rto", "reward", "prune", "pipelines")
MAX_FILE_BYTES = 20 * 2**20
JOB_CONFIG_DIR = ".rto-job"
SKIPPED_NAMES = {
    ".git", ".venv", "venv", "runs", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache",
    "build", "dist", "node_modules", ".ipynb_checkpoints", JOB_CONFIG_DIR,
}  # fmt: skip
META_RUN_DIR = "rto_run_dir"
META_CONFIG = "rto_config"


# ---------------------------------------------------------------- connecting


def resolve_address(address: str | None) -> str:
    """`address`, else `RAY_API_SERVER_ADDRESS` or an http `RAY_ADDRESS`, else the local default."""
    if address:
        return address
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):
            return value
    return DEFAULT_ADDRESS


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast (one line) when nothing listens at the address; Ray's client would wait minutes."""
    parsed = urlparse(address if "://" in address else f"http://{address}")
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(f"expected http://HOST:PORT (the dashboard), got '{address}'", field="--address")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` or pass the head's dashboard address",
            field="--address",
        ) from None


def connect(address: str | None) -> JobSubmissionClient:
    """A job-submission client for the cluster at `address` (bad address: UserError)."""
    address = resolve_address(address)
    _check_reachable(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _use_auth_token_if_available()
    try:
        return JobSubmissionClient(address)
    except ConnectionError:
        raise UserError(f"no Ray cluster answers at {address}", field="--address") from None
    except AuthenticationError:
        raise UserError(
            f"the cluster at {address} requires its auth token: copy the head's ~/.ray/auth_token to "
            "this machine or set RAY_AUTH_TOKEN",
            field="--address",
        ) from None
    except RuntimeError as exc:  # an HTTP server that is not a Ray dashboard
        raise UserError(f"{address} is not a Ray dashboard ({_first_line(exc)})", field="--address") from None


def _use_auth_token_if_available() -> None:
    """Clusters started by Ray >= 2.5x use token authentication when a token exists; the job client
    sends the token only in token mode, which `ray.init` (not the client) switches on. Do the same."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return
    import logging

    setup_logger = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = setup_logger.level
    setup_logger.setLevel(logging.ERROR)  # its notice would break our one-line errors
    try:
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    finally:
        setup_logger.setLevel(level)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _job_errors(job_id: str, address: str) -> Iterator[None]:
    """Ray reports an unknown job as RuntimeError('... status code 404 ...'); make it bad input."""
    try:
        yield
    except RuntimeError as exc:
        text = str(exc)
        if "404" in text or "does not exist" in text:
            raise UserError(f"no job '{job_id}' on the cluster at {address}", field="job id") from None
        raise


# ---------------------------------------------------------------- what a job carries


def project_root() -> Path | None:
    """The source checkout rto runs from (it holds pyproject.toml and the packages), if any."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and all((root / p).is_dir() for p in PACKAGES):
        return root
    return None


def _skip(directory: str, names: list[str]) -> set[str]:
    skipped = set()
    for name in names:
        path = Path(directory, name)
        if name in SKIPPED_NAMES or name.endswith((".egg-info", ".pyc")):
            skipped.add(name)
        elif path.is_dir() and (path / "pyvenv.cfg").is_file():  # a virtual environment, any name
            skipped.add(name)
        elif path.is_symlink() or (path.is_file() and path.stat().st_size > MAX_FILE_BYTES):
            skipped.add(name)
    return skipped


def stage_code(root: Path, target: Path) -> None:
    """Copy the checkout at `root` into `target`, leaving out virtual environments, `.git`, `runs/`,
    caches, build outputs, symlinks and files over `MAX_FILE_BYTES`."""
    shutil.copytree(root, target, ignore=_skip, dirs_exist_ok=True)


def make_run_dir_arg(run_dir: str | None, job_id: str) -> tuple[str, str]:
    """(shell word for the entrypoint, path as shown to the user) for the run directory."""
    if run_dir is None:
        return f'"$HOME/rto-runs/{job_id}"', f"~/rto-runs/{job_id}"
    if run_dir.startswith("~/"):
        return f'"$HOME"/{shlex.quote(run_dir[2:])}', run_dir
    if not os.path.isabs(run_dir):
        raise UserError(
            "must be an absolute path on the cluster (a job's working directory is temporary)",
            source=run_dir,
            field="--run-dir",
        )
    return shlex.quote(run_dir), run_dir


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"expected KEY=VALUE, got '{pair}'", field="--env")
        env[key] = value
    return env


def new_job_id(config: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in config.stem)[:40]
    return f"rto-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    config: Path,
    address: str | None,
    overrides: list[str],
    run_dir: str | None = None,
    env: list[str] | None = None,
    resume: bool = False,
    job_id: str | None = None,
) -> tuple[str, str]:
    """Validate the job file here, then submit it. Returns (job id, run directory on the cluster)."""
    from rto.config import check_stage_inputs, dump_config, load_config

    cfg = load_config(config, [*overrides, "resources.ray_address=auto"])
    if run_dir is None and not resume:  # a fresh run directory on the cluster: no finished stages
        check_stage_inputs(cfg, set(), str(config))
    env_vars = {"PYTHONUNBUFFERED": "1", **parse_env(env or [])}
    job_id = job_id or new_job_id(config)
    run_dir_word, run_dir_shown = make_run_dir_arg(run_dir, job_id)
    config_rel = f"{JOB_CONFIG_DIR}/{config.stem}.yaml"
    entrypoint = f"python -m rto.cli run {shlex.quote(config_rel)} --run-dir {run_dir_word}"
    if resume:
        entrypoint += " --resume"

    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="rto-submit-") as staging:
        working_dir = Path(staging) / "job"
        root = project_root()
        runtime_env: dict = {"working_dir": str(working_dir), "env_vars": env_vars}
        if root is not None:
            stage_code(root, working_dir)
        else:  # installed without a checkout: ship the packages themselves
            import importlib

            runtime_env["py_modules"] = [
                str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES
            ]
        (working_dir / JOB_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        (working_dir / config_rel).write_text(dump_config(cfg))
        submitted = client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={META_CONFIG: str(config), META_RUN_DIR: run_dir_shown},
        )
    return submitted, run_dir_shown


# ---------------------------------------------------------------- watching


def job_id_of(job: JobDetails) -> str:
    return job.submission_id or job.job_id or "?"


def list_jobs(address: str | None) -> list[JobDetails]:
    jobs = connect(address).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_info(address: str | None, job_id: str) -> JobDetails:
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        return client.get_job_info(job_id)


def wait_for(
    address: str | None,
    job_id: str,
    timeout_s: float | None = None,
    poll_s: float = 2.0,
    on_change: Callable[[JobDetails], None] | None = None,
) -> JobDetails:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED (or `timeout_s` passes)."""
    client = connect(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    last = None
    with _job_errors(job_id, resolve_address(address)):
        while True:
            info = client.get_job_info(job_id)
            if info.status != last and on_change is not None:
                on_change(info)
            last = info.status
            if info.status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
                return info
            time.sleep(poll_s)


def logs(address: str | None, job_id: str) -> str:
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        return client.get_job_logs(job_id)


def follow_logs(address: str | None, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs until it ends (from the beginning)."""
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        client.get_job_info(job_id)  # an unknown id fails here, not inside the websocket

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; False when it was not running."""
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        return client.stop_job(job_id)


def describe(job: JobDetails) -> dict[str, str]:
    """The figures `rto jobs status` prints, in order."""
    meta = job.metadata or {}

    def stamp(ms: int | None) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"

    end = job.end_time or (time.time() * 1000 if job.start_time else None)
    duration = f"{(end - job.start_time) / 1000:.0f} s" if job.start_time and end else "-"
    return {
        "job": job_id_of(job),
        "status": str(job.status),
        "message": (job.message or "").strip(),
        "config": meta.get(META_CONFIG, "-"),
        "run dir": meta.get(META_RUN_DIR, "-"),
        "started": stamp(job.start_time),
        "ended": stamp(job.end_time),
        "duration": duration,
        "entrypoint": job.entrypoint,
    }
