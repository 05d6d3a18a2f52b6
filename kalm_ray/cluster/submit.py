"""kalm_ray as Ray jobs: ``kalm submit|status|logs|stop`` and the job-side entry point.

    kalm submit CONFIG --address URL [--stage S] [--run-dir DIR] [--no-follow]
    kalm status|logs|stop JOB --address URL

Submitting reads top to bottom in :func:`cli_submit`: load the config, refuse what cannot fit
or run (:func:`kalm_ray.plan.check`, the checks of ``kalm plan``), reach the job server
(:func:`connect`: unreachable, missing token and rejected token are one-line errors), decide
whether the run directory is usable from every node (:func:`resolve_run_dir`), submit
``python jobs/<stage>.py`` with the runtime_env YAML named by ``ray.runtime_env``
(:func:`build_runtime_env`), print the job id and follow its logs until it ends.

The job receives the resolved config (after ``--run-dir``) as YAML in ``$KALM_CONFIG_YAML``,
so a config file outside the shipped working_dir works too; the scripts in ``jobs/`` call
:func:`job_main`, which runs the same code as ``kalm <stage>`` / ``kalm run``.

Token auth (Ray >= 2.5x; shared notes §6.1): a server that answers 401 gets a bearer token
read from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``
(Ray's own order). The token is sent only to servers that ask for it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from kalm_ray.config import ExperimentConfig, dump_config, load_config
from kalm_ray.errors import ConfigError, KalmError, RunDirError

log = logging.getLogger("kalm_ray")
T = TypeVar("T")

CONFIG_ENV = "KALM_CONFIG_YAML"
"""Environment variable that carries the resolved config YAML into the job."""
PROBE_TIMEOUT_S = 10.0
"""Seconds to wait for the job server before calling it unreachable."""


class JobFailed(KalmError):
    """A submitted job that ended FAILED or STOPPED."""

    exit_code = 1


# ---- reaching the job server --------------------------------------------------------------


@dataclass(frozen=True)
class Cluster:
    """A reachable Ray job server and what it says about its cluster."""

    address: str
    """Normalised job server URL (``http(s)://host:port``, no trailing slash)."""
    ray_version: str
    alive_nodes: int | None
    """Alive nodes now; None when the server would not say."""
    head_cpus: float | None
    """Logical CPUs of the head node; 0 on clusters where all work goes to (autoscaled) workers."""
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    """Auth headers for every request (empty when the server asks for no token)."""

    @property
    def multi_node(self) -> bool:
        """True when stage workers may run on another machine than the driver.

        That is: more than one alive node, a head with no CPUs (every task and actor lands on a
        worker node the autoscaler adds), or a server that would not tell (assume the worst).
        """
        if self.alive_nodes is None or self.head_cpus is None:
            return True
        return self.alive_nodes > 1 or self.head_cpus == 0


def normalise_address(address: str) -> str:
    """``host:port`` → ``http://host:port``; refuses Ray Client (``ray://``) and ``auto``."""
    address = address.strip().rstrip("/")
    if not address:
        raise KalmError("--address is empty; give the job server URL, e.g. http://HEAD:8265")
    if address == "auto" or address.startswith("ray://"):
        raise KalmError(
            f"--address {address!r} is not a job server URL; give the dashboard address, "
            "e.g. http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise KalmError(f"--address {address!r}: scheme must be http or https")
    return address


def read_token() -> tuple[str | None, str]:
    """The Ray auth token on this machine and where it was looked for (for error messages)."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token, "RAY_AUTH_TOKEN"
    path_env = os.environ.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_env).expanduser() if path_env else Path.home() / ".ray" / "auth_token"
    where = f"RAY_AUTH_TOKEN, {'RAY_AUTH_TOKEN_PATH=' if path_env else ''}{path}"
    try:
        token = path.read_text().strip()
    except OSError:
        return None, where
    return (token or None), where


def _get(url: str, headers: dict[str, str]) -> Any:
    """GET with a timeout; network failures become one KalmError line naming the server."""
    import requests

    base = url.split("/api/", 1)[0]
    try:
        return requests.get(url, headers=headers, timeout=PROBE_TIMEOUT_S)
    except requests.exceptions.Timeout:
        reason = f"no answer within {PROBE_TIMEOUT_S:.0f}s"
    except requests.exceptions.ConnectionError as e:
        text = str(e)
        if "refused" in text:
            reason = "connection refused"
        elif "resolve" in text or "known" in text:
            reason = "unknown host"
        else:
            reason = "connection failed"
    except requests.exceptions.RequestException as e:
        reason = type(e).__name__
    raise KalmError(
        f"cannot reach the Ray job server at {base} ({reason}); is the cluster up and is this "
        "its dashboard address (port 8265 by default)?"
    )


def connect(address: str) -> Cluster:
    """Probe the job server; KalmError (one line) when it is unreachable or refuses us."""
    url = normalise_address(address)
    headers: dict[str, str] = {}
    r = _get(f"{url}/api/version", headers)
    if r.status_code == 401:
        token, where = read_token()
        if token is None:
            raise KalmError(
                f"the Ray job server at {url} requires an auth token and none was found "
                f"(looked in {where}); copy it from the head node (`ray get-auth-token`) "
                "into RAY_AUTH_TOKEN"
            )
        headers = {"Authorization": f"Bearer {token}"}
        r = _get(f"{url}/api/version", headers)
    if r.status_code == 403:
        raise KalmError(
            f"the Ray job server at {url} rejected the auth token; use the cluster's token "
            "(`ray get-auth-token` on the head node)"
        )
    try:
        version = r.json()["ray_version"] if r.status_code == 200 else None
    except (ValueError, KeyError, TypeError):
        version = None
    if version is None:
        raise KalmError(
            f"{url} is not a Ray job server (GET /api/version answered {r.status_code})"
        )
    nodes, head_cpus = _alive_nodes(url, headers)
    return Cluster(
        address=url, ray_version=version, alive_nodes=nodes, head_cpus=head_cpus, headers=headers
    )


def _alive_nodes(url: str, headers: dict[str, str]) -> tuple[int | None, float | None]:
    """(alive nodes, head CPUs) from the state API; (None, None) when it does not answer."""
    query = "detail=false&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE&limit=10000"
    r = _get(f"{url}/api/v0/nodes?{query}", headers)
    try:
        rows = r.json()["data"]["result"]["result"]
    except (ValueError, KeyError, TypeError):
        return None, None
    alive = [n for n in rows if n.get("state") == "ALIVE"]
    head = [n for n in alive if n.get("is_head_node")]
    head_cpus = float((head[0].get("resources_total") or {}).get("CPU", 0.0)) if head else None
    return len(alive), head_cpus


def _client(cluster: Cluster, *, debug: bool = False) -> Any:
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logs(debug)
    with sdk_errors(cluster.address):
        # An explicit Authorization header stops the SDK adding its own (notes §6.1).
        return JobSubmissionClient(cluster.address, headers=dict(cluster.headers))


@contextlib.contextmanager
def sdk_errors(address: str, job_id: str | None = None) -> Iterator[None]:
    """Turn the job SDK's exceptions into one KalmError line."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    # OSError covers requests' and the builtin ConnectionError.
    except (RuntimeError, OSError, AuthenticationError, ValueError) as e:
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if job_id is not None and ("does not exist" in text or "404" in text):
            raise KalmError(f"no job {job_id!r} on the Ray job server at {address}") from None
        raise KalmError(f"Ray job server at {address}: {text[:300]}") from None


# ---- what the job gets --------------------------------------------------------------------


def project_root() -> Path:
    """The source checkout ``kalm submit`` ships: the folder holding ``kalm_ray/`` and ``jobs/``."""
    import kalm_ray

    root = Path(kalm_ray.__file__).resolve().parents[1]
    if not (root / "jobs").is_dir():
        raise KalmError(
            "kalm submit needs a kalm_ray source checkout (jobs/ beside kalm_ray/); "
            f"{root} has none"
        )
    return root


def resolve_run_dir(run_dir: str, cluster: Cluster, *, shared_filesystem: bool) -> str:
    """The run_dir the job should use; RunDirError when the cluster could not share it.

    URIs (``s3://``, ``gs://``) pass. A local path is refused when stage workers may run on
    other machines (:attr:`Cluster.multi_node`) unless ``shared_filesystem`` says every node
    mounts it, and refused when relative: the job's cwd is a temporary copy of the code (and
    "this machine" cannot be told apart from a port-forwarded cluster).
    """
    # By scheme, not through pyarrow: building an S3 filesystem here would look up the bucket.
    if "://" in run_dir and not run_dir.startswith("file://"):
        return run_dir
    if cluster.multi_node and not shared_filesystem:
        if cluster.alive_nodes is None:
            why = "would not say how many nodes it has"
        elif cluster.alive_nodes > 1:
            why = f"has {cluster.alive_nodes} nodes"
        else:
            why = "has a head with no CPUs (work runs on autoscaled worker nodes)"
        raise RunDirError(
            f"run_dir {run_dir!r} is a local path but the cluster at {cluster.address} {why}; "
            "use a shared URI (--run-dir s3://BUCKET/PATH or gs://...) or set "
            "ray.shared_filesystem: true if every node mounts that path"
        )
    if "://" not in run_dir and not os.path.isabs(run_dir):
        raise RunDirError(
            f"run_dir {run_dir!r} is relative, and a job runs in a temporary copy of the code; "
            "give an absolute path (--run-dir /path/on/the/cluster) or a URI"
        )
    return run_dir


def build_runtime_env(cfg: ExperimentConfig, *, config_yaml: str) -> dict[str, Any]:
    """The runtime_env YAML named by ``cfg.ray.runtime_env``, plus the config for the job.

    A local ``working_dir`` in the YAML is relative to the project root (as with
    ``ray job submit --runtime-env jobs/runtime_env.yaml`` run from the root).
    """
    root = project_root()
    path = Path(cfg.ray.runtime_env)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise ConfigError(f"ray.runtime_env: no such file {path}")
    try:
        env = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(env, dict):
        raise ConfigError(f"{path}: a runtime_env must be a mapping")
    wd = env.get("working_dir")
    if isinstance(wd, str) and "://" not in wd:
        env["working_dir"] = str((root / wd).resolve())
    env_vars = env.get("env_vars") or {}
    if not isinstance(env_vars, dict):
        raise ConfigError(f"{path}: env_vars must be a mapping")
    env["env_vars"] = {**{k: str(v) for k, v in env_vars.items()}, CONFIG_ENV: config_yaml}
    return env


def entrypoint(stage: str | None, *, debug: bool = False) -> str:
    """The job's shell command; ``python`` is whatever the cluster's nodes run. ``debug``:
    the job prints tracebacks and debug logs too (``kalm submit --debug`` reaches the job, not
    only this client)."""
    return f"python jobs/{stage or 'run'}.py" + (" --debug" if debug else "")


# ---- the commands -------------------------------------------------------------------------


def submit(
    cfg: ExperimentConfig,
    cluster: Cluster,
    *,
    stage: str | None,
    config_path: str,
    debug: bool = False,
) -> tuple[Any, str]:
    """Submit one stage (or the whole run); returns (client, job id)."""
    runtime_env = build_runtime_env(cfg, config_yaml=dump_config(cfg))
    job_id = (
        f"kalm-{cfg.name}-{stage or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    )
    client = _client(cluster, debug=debug)
    with sdk_errors(cluster.address):
        client.submit_job(
            entrypoint=entrypoint(stage, debug=debug),
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={
                "kalm_experiment": cfg.name,
                "kalm_stage": stage or "run",
                "kalm_config": config_path,
                "kalm_run_dir": cfg.run_dir,
            },
            entrypoint_num_cpus=cfg.ray.entrypoint_num_cpus,
            entrypoint_num_gpus=cfg.ray.entrypoint_num_gpus,
        )
    return client, job_id


def follow(client: Any, job_id: str, *, address: str, poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    printed = 0

    async def tail() -> None:
        nonlocal printed
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()
            printed += len(chunk)

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - the websocket is best effort; polling below catches up
        log.debug("log tail stopped (%s); polling instead", e)
    with sdk_errors(address, job_id):
        while True:
            status = client.get_job_status(job_id)
            logs = client.get_job_logs(job_id)
            if len(logs) > printed:
                sys.stdout.write(logs[printed:])
                sys.stdout.flush()
                printed = len(logs)
            if status.is_terminal():
                return str(status)
            time.sleep(poll_s)


def cli_submit(args: argparse.Namespace) -> int:
    from kalm_ray.plan import check

    cfg = load_config(args.config, run_dir=args.run_dir, seed=args.seed)
    check(cfg)  # `kalm plan`'s refusals, before anything reaches the cluster
    cluster = connect(args.address)
    if cluster.ray_version != _ray_version():
        print(
            f"[kalm] warning: the cluster runs Ray {cluster.ray_version}, kalm_ray pins "
            f"{_ray_version()}",
            file=sys.stderr,
        )
    run_dir = resolve_run_dir(cfg.run_dir, cluster, shared_filesystem=cfg.ray.shared_filesystem)
    cfg = cfg.model_copy(update={"run_dir": run_dir})
    client, job_id = submit(
        cfg, cluster, stage=args.stage, config_path=str(args.config), debug=args.debug
    )
    print(job_id, flush=True)
    hint = f"--address {cluster.address}"
    print(
        f"[kalm] submitted {job_id} ({args.stage or 'run'}, run_dir {run_dir}); "
        f"watch: kalm logs {job_id} {hint}; stop: kalm stop {job_id} {hint}",
        file=sys.stderr,
    )
    if args.no_follow:
        return 0
    try:
        status = follow(client, job_id, address=cluster.address)
    except KeyboardInterrupt:
        print(
            f"\n[kalm] stopped following; {job_id} keeps running (kalm stop {job_id} {hint})",
            file=sys.stderr,
        )
        raise
    if status != "SUCCEEDED":
        with sdk_errors(cluster.address, job_id):
            info = client.get_job_info(job_id)
        raise JobFailed(f"job {job_id} {status}: {failure_line(info.message)}")
    print(f"[kalm] {job_id} SUCCEEDED", file=sys.stderr)
    return 0


def _job_call(args: argparse.Namespace, call: Callable[[Any], T]) -> T:
    """``call(client)`` with the Jobs client of ``args.address``; the SDK's errors (about
    ``args.job_id``) become one line."""
    cluster = connect(args.address)
    client = _client(cluster, debug=args.debug)
    with sdk_errors(cluster.address, args.job_id):
        return call(client)


def cli_status(args: argparse.Namespace) -> int:
    info = _job_call(args, lambda client: client.get_job_info(args.job_id))
    meta = info.metadata or {}
    print(f"{args.job_id}  {info.status}")
    for key in ("kalm_experiment", "kalm_stage", "kalm_config", "kalm_run_dir"):
        if key in meta:
            print(f"  {key[5:]:<10} {meta[key]}")
    print(f"  entrypoint {info.entrypoint}")
    for name, ms in (("started", info.start_time), ("ended", info.end_time)):
        if ms:
            print(f"  {name:<10} {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(ms / 1000))}")
    if info.message:
        print(f"  message    {info.message.strip().splitlines()[0]}")
    return 0


def cli_logs(args: argparse.Namespace) -> int:
    sys.stdout.write(_job_call(args, lambda client: client.get_job_logs(args.job_id)))
    return 0


def cli_stop(args: argparse.Namespace) -> int:
    stopped, status = _job_call(
        args,
        lambda client: (client.stop_job(args.job_id), client.get_job_status(args.job_id)),
    )
    print(f"{args.job_id}  {'stop requested' if stopped else f'already ended ({status})'}")
    return 0


def failure_line(message: str | None) -> str:
    """One line from a job's failure message: the last line of the log tail Ray appends
    (the exception), else the message's first line."""
    lines = [ln.strip() for ln in (message or "").strip().splitlines() if ln.strip()]
    if not lines:
        return "no message; see `kalm logs`"
    return lines[-1][:300]


def _quiet_ray_logs(debug: bool) -> None:
    """Ray logs every packaging step at INFO; keep the submit output to ours unless --debug."""
    if debug:
        return
    import ray.job_submission  # noqa: F401 - importing ray resets its loggers' levels

    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The 'now ignored by default' notices about .git/.venv: those are in our excludes anyway.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def _ray_version() -> str:
    import ray

    return ray.__version__


# ---- the job side -------------------------------------------------------------------------


@contextlib.contextmanager
def _config_file(path: str | None) -> Iterator[str]:
    """The config path given, or a temporary file holding ``$KALM_CONFIG_YAML``."""
    if path is not None:
        yield path
        return
    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise ConfigError(f"no CONFIG argument and ${CONFIG_ENV} is not set")
    # Not in the working_dir: jobs with identical code share one extracted copy of it.
    fd, tmp = tempfile.mkstemp(prefix="kalm-job-", suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        yield tmp
    finally:
        os.unlink(tmp)


def job_main(stage: str | None, argv: Sequence[str] | None = None) -> int:
    """What ``jobs/<stage>.py`` runs: ``kalm <stage>`` (or ``kalm run``) on the cluster.

    ``jobs/<stage>.py [CONFIG] [--run-dir DIR] [--seed N] [--debug]``; without CONFIG the
    config comes from ``$KALM_CONFIG_YAML`` (set by ``kalm submit``).
    """
    from kalm_ray.cli import main

    name = stage or "run"
    p = argparse.ArgumentParser(prog=f"jobs/{name}.py", description=job_main.__doc__)
    p.add_argument("config", nargs="?", metavar="CONFIG", help=f"default: ${CONFIG_ENV}")
    p.add_argument("--run-dir", help="overrides the config's run_dir")
    p.add_argument("--seed", type=int, help="overrides the config's master seed")
    p.add_argument("--debug", action="store_true")
    if stage is None:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--from", dest="start", metavar="STAGE")
        g.add_argument("--only", metavar="STAGE")
    args = p.parse_args(argv)
    try:
        with _config_file(args.config) as path:
            cli_args = [name, path]
            cli_args += ["--run-dir", args.run_dir] if args.run_dir else []
            cli_args += ["--seed", str(args.seed)] if args.seed is not None else []
            cli_args += ["--debug"] if args.debug else []
            if stage is None:
                cli_args += ["--from", args.start] if args.start else []
                cli_args += ["--only", args.only] if args.only else []
            return main(cli_args)
    except KalmError as e:
        print(f"kalm: error: {e}", file=sys.stderr)
        return e.exit_code
