"""Starting or joining Ray the same way from every stage, and what Ray may print.

By default the console shows kalm_ray's own output only (``[kalm]``/``[kalm_ray]`` lines,
our progress bars, the tables): Ray's Python loggers (Ray Data's progress logs and execution
plans, RLlib/Train/Tune warnings, deprecation notices) print errors only, Ray Data's progress
bars are off, the workers' output is not forwarded, and Python warnings raised inside Ray's
modules are hidden. Everything still goes to Ray's log files (Ray Data:
``/tmp/ray/session_latest/logs/ray-data/``; workers: ``.../logs/worker-*``).
``ray.verbose: true`` in the config, or ``kalm ... --verbose``, shows it all on the console.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from kalm_ray.config import RayConfig
from kalm_ray.errors import BackendUnavailable, ConfigError, InputError, KalmError

log = logging.getLogger("kalm_ray")

QUIET_LEVEL = logging.ERROR
"""Console threshold of Ray's loggers when not verbose."""

_mode: bool | None = None
"""The last ``verbose`` given to :func:`configure_console` (None: never called)."""

_sigterm: Callable[[int, Any], None] | None = None
"""The CLI's SIGTERM handler; ``ray.init`` replaces any handler with its own (a bare
``sys.exit(15)``, which ends in a C++ abort and a stack dump), so :func:`init_ray` puts this
one back."""

LOOPBACK = "127.0.0.1"

_RAYLET_NOISE = ("worker processes have been started on node",)
"""Raylet notices pushed to the driver that say nothing actionable (the worker-pool size
warning: our pools ask for fractional CPUs on purpose)."""

def configure_console(verbose: bool) -> None:
    """Quiet (or restore) Ray's console output in this process; idempotent and cheap.

    Call it before Ray or Hugging Face libraries log anything (the CLI does, right after
    reading the config); :func:`init_ray` calls it again, so stages run from Python get it
    too. Handler thresholds, not logger levels, are changed: RLlib resets ``ray.rllib``'s
    level whenever an algorithm is built, and the log files must keep everything.
    """
    global _mode
    _mode = verbose
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not verbose:
        # Read when huggingface_hub/transformers are imported: their download and
        # "Writing model shards" bars are not ours.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import ray  # noqa: F401  (sets up the "ray" logger and its console handler)

    ray_logger = logging.getLogger("ray")
    if not ray_logger.handlers:
        # ray.init(configure_logging=False) removes them (tests do that); without one, Ray's
        # warnings would go to Python's last-resort handler, which has no threshold to set.
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")
        )
        ray_logger.addHandler(handler)
    import ray.data  # noqa: F401  (configures the "ray.data" logger: console + file handlers)

    _set_console_thresholds(logging.INFO if verbose else QUIET_LEVEL)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    action = "default" if verbose else "ignore"
    warnings.filterwarnings(action, module=r"ray(\.|$)")
    _filter_raylet_notices(quiet=not verbose)


def reapply_console() -> None:
    """:func:`configure_console` again with the last mode, for console handlers that Ray
    libraries add when imported (RLlib adds one to ``ray.rllib``); no-op if never configured."""
    if _mode is not None:
        _set_console_thresholds(logging.INFO if _mode else QUIET_LEVEL)


def _set_console_thresholds(level: int) -> None:
    """``level`` on every console handler of the ``ray`` loggers (``ray``, ``ray.data``,
    ``ray.rllib``, ...); file handlers (Ray Data's log files) are left alone."""
    names = ["ray", *(n for n in logging.root.manager.loggerDict if n.startswith("ray."))]
    for name in names:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(
                handler, logging.FileHandler
            ):
                handler.setLevel(level)


def _filter_raylet_notices(*, quiet: bool) -> None:
    """Drop the raylet's worker-pool size notices that the driver prints (quiet mode only).

    NOTE: Ray's driver prints every message the raylet pushes (``listen_error_messages`` in
    ``ray._private.worker``, a background thread started by ``ray.init``) whatever
    ``log_to_driver`` says; it looks ``print_to_stdstream`` up at call time, so wrapping the
    module attribute filters them. The raylet keeps them in its own log file.
    """
    import ray._private.worker as worker

    original = getattr(worker.print_to_stdstream, "_kalm_original", worker.print_to_stdstream)
    if not quiet:
        worker.print_to_stdstream = original
        return

    def filtered(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            lines = [ln for ln in data.get("lines", []) if not any(n in ln for n in _RAYLET_NOISE)]
            if not lines:
                return
            data = {**data, "lines": lines}
        original(data, ignore_prefix)

    filtered._kalm_original = original  # type: ignore[attr-defined]
    worker.print_to_stdstream = filtered


class _RestartNoticeProbe:
    """An actor that is never scheduled (see :func:`_absorb_restart_notice`)."""

    def __init__(self, *refs: Any) -> None:
        self.refs = refs


def _absorb_restart_notice() -> None:
    """Spend Ray's once-per-process "constructor arguments in the object store" error on a probe.

    NOTE: the core worker (C++) writes "Actor ... has constructor arguments in the object
    store and max_restarts > 0" (ray-project/ray#53727) straight to this process's stderr,
    once per process, at the first such actor creation; every Ray Data actor pool is one
    (its workers restart and get the map transformer by ObjectRef). Here that one time is a
    probe asking for a resource no node has (so it never starts a process), submitted with
    fd 2 pointed at /dev/null, and killed at once. The raylet logs still have the line.
    """
    import ray

    probe_cls = ray.remote(num_cpus=0, max_restarts=1, resources={"kalm_never": 1})(
        _RestartNoticeProbe
    )
    ref = ray.put(b"")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        probe = probe_cls.remote([ref])  # a nested ref: the notice's trigger
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)
    ray.kill(probe, no_restart=True)


def install_sigterm_handler(handler: Callable[[int, Any], None]) -> None:
    """Handle SIGTERM with ``handler`` in this process, now and after every ``init_ray``."""
    global _sigterm
    _sigterm = handler
    _reinstall_sigterm()


def _reinstall_sigterm() -> None:
    if _sigterm is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _sigterm)


@contextmanager
def _bind_loopback() -> Iterator[None]:
    """Make the local Ray this process starts use 127.0.0.1 as its node IP.

    NOTE: Ray 2.60 binds its gRPC servers (GCS, raylet, object manager, every worker's core
    worker), the dashboard agent and the runtime-env agent to the node IP, but
    ``ray.init(_node_ip_address="127.0.0.1")`` is rewritten to the host's routable IP
    (``services.resolve_ip_for_localhost``); only ``ENABLE_RAY_CLUSTER`` off (what
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` gives) makes the node IP loopback. It is read at
    call time and only while the node starts (children get the node IP as an argument), so
    it is switched off around ``ray.init`` only: left off, a later ``ray start --address`` of
    this process would refuse to run. A node on loopback cannot be joined from another host:
    right for a local run.
    """
    import ray._private.ray_constants as ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def autoscaler_gpus() -> int:
    """GPUs the Ray cluster's autoscaler may bring up (its declared node types); 0 if none.

    NOTE: ``ray.cluster_resources()`` counts only nodes that are up, so a cluster whose GPU
    group is at zero shows none. The autoscaler reports its node types to the GCS; this reads
    them the way Ray Train (worker_group.py) and Ray Data (cluster_autoscaler) do, through
    ``ray._private.state`` (private, hence guarded: any failure means "unknown" = 0).
    """
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - a private API: unknown is 0, gpus_on_demand covers it
        return 0
    return int(most.get("GPU", 0) or 0)


def gpu_visible(*, on_demand: bool = False) -> bool:
    """Whether GPUs are there to use: ``on_demand`` (``ray.gpus_on_demand``: the cluster brings
    GPU nodes when asked), GPUs in the Ray cluster now or in a node type its autoscaler may
    start (when Ray is up), else a GPU on this host."""
    if on_demand:
        return True
    try:
        import ray

        if ray.is_initialized():
            return ray.cluster_resources().get("GPU", 0) > 0 or autoscaler_gpus() > 0
    except ImportError:
        pass
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def local_cpus(cfg: RayConfig) -> int:
    """Logical CPUs of a local Ray this process starts: ``ray.num_cpus``, else max(8, cores)
    (see :func:`init_ray` for why at least 8)."""
    return cfg.num_cpus or max(8, os.cpu_count() or 1)


def local_resources(cfg: RayConfig) -> dict[str, float] | None:
    """What this process's Ray has or will have: the running one's, or those :func:`init_ray`
    gives a local Ray it starts (its CPUs; the GPUs CUDA shows this process). None when Ray
    is joined at an address: a cluster's resources are its own to count."""
    import ray

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return None
    if ray.is_initialized():
        return dict(ray.cluster_resources())
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"CPU": float(local_cpus(cfg)), "GPU": float(gpus)}


def shortfall(key: str, need: dict[str, float], have: dict[str, float]) -> KalmError | None:
    """The refusal naming ``key`` when ``need`` (one piece of work, all at once) does not fit
    in a local Ray that has ``have``; None when it fits."""
    if need.get("GPU", 0) and not have.get("GPU"):
        return BackendUnavailable(
            f"{key} asks for GPUs, but this local Ray has none; set it off for a CPU run"
        )
    for res, n in need.items():
        if n > have.get(res, 0.0):
            cpus = res == "CPU"
            return InputError(
                f"{key}: needs {n:g} {res}s at once, but this local Ray has "
                f"{have.get(res, 0.0):g}{' logical CPUs (ray.num_cpus)' if cpus else ''}; "
                f"lower it{', or raise ray.num_cpus' if cpus else ''}"
            )
    return None


def require_resources(key: str, need: dict[str, float], cfg: RayConfig) -> None:
    """Refuse, in one line naming ``key``, work Ray can never place: Ray would queue it
    forever (Ray Train retries its worker group without end) behind a progress bar at 0.

    A local Ray that this process starts has what it has, so every resource is counted. A
    cluster may add nodes: there only GPUs that no node has or can have are refused
    (:func:`gpu_visible`); how many is Ray's to say.

    Raises:
        BackendUnavailable: GPUs asked for where Ray has none and can get none.
        InputError: more of a resource at once than the local Ray has.
    """
    import ray

    gpus = need.get("GPU", 0)
    if cfg.address or os.environ.get("RAY_ADDRESS"):
        if gpus and not gpu_visible(on_demand=cfg.gpus_on_demand):
            raise BackendUnavailable(
                f"{key} asks for GPUs, but Ray has none here and its autoscaler offers none; "
                "set it off for a CPU run, or ray.gpus_on_demand: true where the cluster adds "
                "GPU nodes on request"
            )
        return
    refusal = shortfall(key, need, ray.cluster_resources())
    if refusal is not None:
        raise refusal


def check_reachable(address: str, key: str, *, timeout_s: float = 10.0) -> None:
    """Refuse, in one line, a Ray address nothing listens on.

    Why: ``ray.init`` retries an unreachable GCS without end (C++ log lines every 30 s, a
    SIGTERM barely heard). A TCP connect to the address's port says it in seconds. ``auto``
    and addresses without a port are left to Ray.

    Raises:
        ConfigError: nothing accepts a connection at ``host:port`` within ``timeout_s``.
    """
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        why = e.strerror or type(e).__name__.replace("Error", " error").strip()
        raise ConfigError(
            f"{key} {address!r}: no Ray there ({why}); start the cluster, or correct {key}"
            + (" (unset it for a local Ray)" if key == "RAY_ADDRESS" else "")
        ) from None


def check_address(cfg: RayConfig) -> None:
    """:func:`check_reachable` on the address :func:`init_ray` would join, if any (``kalm run``
    checks it before the first stage, so a refused command claims no run dir)."""
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_reachable(address, "ray.address" if cfg.address else "RAY_ADDRESS")


def init_ray(cfg: RayConfig) -> None:
    """Join ``cfg.address`` or start a local Ray; a no-op when Ray is already up.

    A local Ray gets max(8, cores) logical CPUs by default: offline RLlib with 2 logical
    CPUs deadlocks (the env runner and the PreLearner take both, the Parquet read never
    schedules; see shared notes §4.7). The dashboard binds to ``cfg.dashboard_host``, every
    other listener to loopback (:func:`_bind_loopback`).
    Workers' stdout/stderr reach this console only with ``cfg.verbose`` (see the module doc).
    """
    import ray

    configure_console(cfg.verbose)
    if ray.is_initialized():
        return
    # NOTE: configure_logging=True keeps the "ray" logger's console handler (and the level
    # configure_console gave it); False would remove every handler, and Ray's warnings would
    # then reach the console anyway, through Python's last-resort handler.
    # Jobs submitted to a cluster set RAY_ADDRESS; join it rather than start a new Ray.
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_address(cfg)
        ray.init(address=address, log_to_driver=cfg.verbose, configure_logging=True)
        _reinstall_sigterm()
        configure_console(cfg.verbose)
        return
    with _bind_loopback():
        ray.init(
            num_cpus=local_cpus(cfg),
            include_dashboard=cfg.dashboard,
            dashboard_host=cfg.dashboard_host,
            _node_ip_address=LOOPBACK,
            log_to_driver=cfg.verbose,
            configure_logging=True,
        )
    _reinstall_sigterm()
    configure_console(cfg.verbose)
    if not cfg.verbose:
        try:
            _absorb_restart_notice()
        except Exception as e:  # noqa: BLE001 - cosmetic; never stop a run for it
            log.debug("restart-notice probe failed: %s", e)
