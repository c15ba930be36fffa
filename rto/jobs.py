"""Jobs on a Ray cluster: `rto submit` and `rto jobs list|status|logs|stop`.

A job is `python -m rto.cli run <config> --run-dir <dir>` started by Ray's job-submission API on the
cluster whose dashboard answers at `--address` (http://HEAD:8265). What travels with the job:

* an allow-list of files (`job_files`; `rto submit --dry-run` prints it): the four packages' code
  (`rto`, `reward`, `prune`, `pipelines`), `configs/`, and the data files the job names that lie
  inside the checkout; never a dotfile or a dot-folder, never key material (`.env`, tokens, `*.pem`,
  `*.key`, SSH keys, credentials), never a file over `MAX_FILE_BYTES`. When rto is installed without
  a checkout, the four packages travel as `py_modules`;
* the job file, resolved (with the `--set` overrides) and with `resources.ray_address: auto`, so the
  job's Ray actors join the cluster the job runs on instead of starting a private Ray;
* environment variables (`--env KEY=VALUE`, plus `PYTHONUNBUFFERED=1` so logs stream). Ray keeps them
  in the job's runtime env, which its job API returns to anyone who can list jobs, so a secret-looking
  name is refused: pass secrets by reference instead, `--secret-file NAME=PATH` (a file on the
  cluster, read there into the job's environment) or an environment variable set where the cluster
  was started (the job inherits it).

The job id (`--job-id`, and the id given to `rto jobs ...`) is a plain name, `[A-Za-z0-9._-]`
starting with a letter or digit: it becomes part of a path and of a URL. Every word of the
entrypoint (a shell command on the head) is quoted. The cluster's token (`~/.ray/auth_token`) is
sent only to an address that answers as a Ray dashboard in token mode.

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
import re
import secrets
import shlex
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from rto.config import check_stage_inputs, dump_config, load_config
from rto.errors import UserError

if TYPE_CHECKING:
    from ray.job_submission import JobDetails, JobSubmissionClient

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PACKAGES = ("rto", "reward", "prune", "pipelines")
MAX_FILE_BYTES = 20 * 2**20
JOB_CONFIG_DIR = ".rto-job"
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
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
    except ValueError:
        raise UserError(f"'{address}' has a port outside 1-65535", field="--address") from None
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise UserError(
            f"no Ray cluster answers at {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` or pass the head's dashboard address",
            field="--address",
        ) from None


def connect(address: str | None) -> JobSubmissionClient:
    """A job-submission client for the cluster at `address` (bad address: UserError). The cluster's
    auth token is sent only if the address answers as a Ray dashboard that asks for one."""
    address = resolve_address(address)
    _check_reachable(address)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    if dashboard_auth_mode(address) == "token":
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


def dashboard_auth_mode(address: str, timeout_s: float = 10.0) -> str:
    """Ask the dashboard's public endpoint which authentication it uses ("token" or "disabled"),
    sending nothing secret; anything that does not answer like a Ray dashboard is a `UserError`."""
    import json
    import urllib.error
    import urllib.request

    url = address.rstrip("/") + "/api/authentication_mode"
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout_s) as response:
            mode = json.loads(response.read(4096).decode())["authentication_mode"]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "code", None) or type(exc).__name__
        raise UserError(
            f"{address} does not answer as a Ray dashboard ({reason}); no token was sent", field="--address"
        ) from None
    if not isinstance(mode, str):
        raise UserError(f"{address} does not answer as a Ray dashboard; no token was sent", field="--address")
    return mode


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


JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SECRET_ENV = re.compile(
    r"TOKEN|SECRET|PASSW|PASSWD|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.IGNORECASE
)
_KEY_MATERIAL = re.compile(
    r"^(\.env.*|.*\.(pem|key|p12|pfx|keystore|jks|kdbx|gpg|asc)|id_(rsa|dsa|ecdsa|ed25519).*|"
    r".*credential.*|.*secret.*|(.*[_.-])?token|auth_token|\.netrc|\.pgpass|known_hosts|authorized_keys)$",
    re.IGNORECASE,
)
CODE_SUFFIXES = {".py", ".typed"}
CONFIG_SUFFIXES = {".yaml", ".yml", ".json"}


def check_job_id(job_id: str, field: str = "job id") -> str:
    """A job id is a plain name: it becomes a path component and part of a URL on the cluster."""
    if not JOB_ID.fullmatch(job_id or "") or ".." in job_id:
        raise UserError(
            f"'{job_id}' is not a job id: use 1-128 of [A-Za-z0-9._-], starting with a letter or digit, "
            "without '..'",
            field=field,
        )
    return job_id


def looks_secret(name: str) -> bool:
    """A file name that is key material or credentials (never sent to a cluster)."""
    return bool(_KEY_MATERIAL.match(name))


def check_env(env_vars: dict[str, str]) -> None:
    for key in env_vars:
        if SECRET_ENV.search(key):
            raise UserError(
                f"'{key}' looks like a secret, and Ray stores --env values in the job's runtime env, which "
                f"its job API returns to anyone who can list jobs; pass it by reference: --secret-file "
                f"{key}=/path/on/the/cluster, or set it in the environment where the cluster was started",
                field="--env",
            )


def entrypoint(
    config_rel: str,
    run_dir: str | None,
    job_id: str,
    resume: bool,
    secret_files: dict[str, str] | None = None,
) -> str:
    """The shell command the head runs for the job; every word is quoted (the job id is checked,
    and only the default run directory's `$HOME` is left to the shell)."""
    words = ["python", "-m", "rto.cli", "run", config_rel]
    for name, path in (secret_files or {}).items():
        words += ["--secret-file", f"{name}={path}"]
    command = shlex.join(words) + " --run-dir " + make_run_dir_arg(run_dir, check_job_id(job_id))[0]
    return command + (" --resume" if resume else "")


def _sendable(path: Path, relative: Path) -> bool:
    return (
        path.is_file()
        and not path.is_symlink()
        and not any(part.startswith(".") or part == "__pycache__" for part in relative.parts)
        and not looks_secret(path.name)
        and path.stat().st_size <= MAX_FILE_BYTES
    )


def job_files(root: Path, cfg) -> list[tuple[Path, Path]]:
    """What a submission from the checkout at `root` sends, as (file, path in the job's folder):
    the packages' code, `configs/`, and the data files the job names that lie inside `root`.
    A named data file that looks like key material is refused (`UserError`)."""
    root = root.resolve()
    files: list[tuple[Path, Path]] = []
    for folder, suffixes in [*((p, CODE_SUFFIXES) for p in PACKAGES), ("configs", CONFIG_SUFFIXES)]:
        for path in sorted((root / folder).rglob("*")):
            relative = path.relative_to(root)
            if path.suffix in suffixes and _sendable(path, relative):
                files.append((path, relative))
    named = {str(relative) for _, relative in files}
    for path, field in named_data_files(cfg):
        resolved = path.resolve()
        if not resolved.is_relative_to(root):
            continue  # outside the checkout: read on the cluster (shared storage)
        relative = resolved.relative_to(root)
        if str(relative) in named:
            continue
        if looks_secret(resolved.name) or any(part.startswith(".") for part in relative.parts):
            raise UserError(
                f"refusing to send '{relative}': a dotfile or key material is never sent to a cluster",
                field=field,
            )
        if resolved.stat().st_size > MAX_FILE_BYTES:
            raise UserError(
                f"'{relative}' is over {MAX_FILE_BYTES // 2**20} MiB: put it on storage the cluster reads "
                "and name it by an absolute path",
                field=field,
            )
        files.append((resolved, relative))
        named.add(str(relative))
    return files


def named_data_files(cfg) -> list[tuple[Path, str]]:
    """(local file, field) for every data file the job names (Hub data set names are not files)."""
    out = []
    for role in ("sft", "pairs", "eval_pairs", "prompts", "eval_prompts"):
        source = getattr(cfg.data, role)
        if source is not None and Path(source.path).expanduser().is_file():
            out.append((Path(source.path).expanduser(), f"data.{role}.path"))
    return out


def project_root() -> Path | None:
    """The source checkout rto runs from (it holds pyproject.toml and the packages), if any."""
    root = Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and all((root / p).is_dir() for p in PACKAGES):
        return root
    return None


def stage_files(files: list[tuple[Path, Path]], target: Path) -> None:
    """Copy `job_files` into the job's folder `target`."""
    for source, relative in files:
        (target / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target / relative)


def make_run_dir_arg(run_dir: str | None, job_id: str) -> tuple[str, str]:
    """(shell word for the entrypoint, path as shown to the user) for the run directory."""
    if run_dir is None:
        return f'"$HOME"/rto-runs/{shlex.quote(check_job_id(job_id))}', f"~/rto-runs/{job_id}"
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
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in config.stem)[:40]
    return f"rto-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclass
class Submission:
    """What `rto submit` would send: the entrypoint, the files (source, path in the job's folder),
    the environment, and the data the job names outside the checkout (read on the cluster)."""

    job_id: str
    entrypoint: str
    config_label: str
    run_dir_shown: str
    config_rel: str
    config_text: str
    files: list[tuple[Path, Path]]
    env_vars: dict[str, str]
    read_on_cluster: list[str]
    root: Path | None


def prepare_submission(
    config: Path,
    overrides: list[str],
    run_dir: str | None = None,
    env: list[str] | None = None,
    resume: bool = False,
    job_id: str | None = None,
    secret_files: list[str] | None = None,
) -> Submission:
    """Validate the job file and everything on the command line here, before anything connects."""

    job_id = check_job_id(job_id, "--job-id") if job_id is not None else new_job_id(config)
    env_vars = parse_env(env or [])
    check_env(env_vars)
    env_vars = {"PYTHONUNBUFFERED": "1", **env_vars}
    secrets_by_name = parse_secret_files(secret_files or [])
    cfg = load_config(config, [*overrides, "resources.ray_address=auto"])
    if run_dir is None and not resume:  # a fresh run directory on the cluster: no finished stages
        check_stage_inputs(cfg, set(), str(config))
    run_dir_shown = make_run_dir_arg(run_dir, job_id)[1]
    config_rel = f"{JOB_CONFIG_DIR}/{config.stem}.yaml"
    root = project_root()
    files = job_files(root, cfg) if root is not None else []
    inside = {str(source) for source, _ in files}
    outside = [str(path) for path, _ in named_data_files(cfg) if str(path.resolve()) not in inside]
    return Submission(
        job_id=job_id,
        entrypoint=entrypoint(config_rel, run_dir, job_id, resume, secrets_by_name),
        config_label=str(config),
        run_dir_shown=run_dir_shown,
        config_rel=config_rel,
        config_text=dump_config(cfg),
        files=files,
        env_vars=env_vars,
        read_on_cluster=outside,
        root=root,
    )


def submit(plan: Submission, address: str | None) -> str:
    """Send a prepared submission to the cluster; returns the job id."""
    client = connect(address)
    with tempfile.TemporaryDirectory(prefix="rto-submit-") as staging:
        working_dir = Path(staging) / "job"
        working_dir.mkdir()
        runtime_env: dict = {"working_dir": str(working_dir), "env_vars": plan.env_vars}
        if plan.root is not None:
            stage_files(plan.files, working_dir)
        else:  # installed without a checkout: ship the packages themselves
            import importlib

            runtime_env["py_modules"] = [
                str(Path(importlib.import_module(p).__file__).parent) for p in PACKAGES
            ]
        (working_dir / JOB_CONFIG_DIR).mkdir(parents=True, exist_ok=True)
        (working_dir / plan.config_rel).write_text(plan.config_text)
        return client.submit_job(
            entrypoint=plan.entrypoint,
            submission_id=plan.job_id,
            runtime_env=runtime_env,
            metadata={META_CONFIG: plan.config_label, META_RUN_DIR: plan.run_dir_shown},
        )


def parse_secret_files(pairs: list[str]) -> dict[str, str]:
    """`NAME=PATH` pairs of --secret-file: PATH is a file on the cluster (absolute), read there."""
    out = {}
    for pair in pairs:
        name, sep, path = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or not path:
            raise UserError(f"expected NAME=PATH, got '{pair.split('=')[0]}=…'", field="--secret-file")
        if not (os.path.isabs(path) or path.startswith("~/")):
            raise UserError(f"'{path}' must be an absolute path on the cluster", field="--secret-file")
        out[name] = path
    return out


# ---------------------------------------------------------------- watching


def job_id_of(job: JobDetails) -> str:
    return job.submission_id or job.job_id or "?"


def list_jobs(address: str | None) -> list[JobDetails]:
    jobs = connect(address).list_jobs()
    return sorted(jobs, key=lambda j: j.start_time or 0)


def job_info(address: str | None, job_id: str) -> JobDetails:
    check_job_id(job_id)
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
    check_job_id(job_id)
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
    check_job_id(job_id)
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        return client.get_job_logs(job_id)


def follow_logs(address: str | None, job_id: str, write: Callable[[str], None]) -> None:
    """Stream the job's logs until it ends (from the beginning)."""
    check_job_id(job_id)
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        client.get_job_info(job_id)  # an unknown id fails here, not inside the websocket

        async def tail() -> None:
            async for chunk in client.tail_job_logs(job_id):
                write(chunk)

        asyncio.run(tail())


def stop(address: str | None, job_id: str) -> bool:
    """Ask the job to stop; False when it was not running."""
    check_job_id(job_id)
    client = connect(address)
    with _job_errors(job_id, resolve_address(address)):
        return client.stop_job(job_id)


PLACEMENT_LINE = re.compile(r"^placement (policy|critic|ref|dpo|rm|rollout): (.+)$")


def group_placement(address: str | None, job: JobDetails) -> dict[str, str]:
    """Where each actor group of the job runs (ran, once it ended), from the ``placement GROUP: ...``
    lines its PPO stage writes whenever it (re)builds groups; empty before the PPO stage."""
    try:
        text = connect(address).get_job_logs(job_id_of(job))
    except Exception:  # noqa: BLE001 - placement is a convenience; status must not fail on it
        return {}
    where: dict[str, str] = {}
    for line in text.splitlines():
        match = PLACEMENT_LINE.match(line.strip())
        if match:
            where[match.group(1)] = match.group(2)
    return where


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
