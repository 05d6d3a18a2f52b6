"""The ``kalm`` command line.

    kalm <stage> CONFIG [--run-dir DIR] [--seed N] [--verbose] [--debug]   # collect ... evaluate
    kalm run CONFIG [--run-dir DIR] [--seed N] [--from STAGE] [--only STAGE] [--verbose]
    kalm report RUN_DIR        kalm verify RUN_DIR        kalm envs
    kalm compare RUN_DIR RUN_DIR ... [--out FILE]   # the effect over runs (master seeds)
    kalm plan CONFIG           kalm submit CONFIG --address URL   (submit runs plan's checks)

``--seed N`` overrides the config's master seed (every stage derives its seeds from it): one
replicate of the experiment, in its own ``--run-dir`` (a run dir holds one master seed's run and
refuses another's); ``kalm compare`` reads several.

Errors are one line on stderr and a non-zero exit; with ``--debug`` the traceback is printed too.
SIGTERM is handled like Ctrl-C: one ``kalm: terminated`` line, Ray shut down, exit 143.
``--verbose`` (or ``ray.verbose: true``) also shows Ray's own logs (see kalm_ray.raysetup).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Sequence

from kalm_ray.errors import KalmError, Terminated
from kalm_ray.stage import STAGES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kalm", description="KALM on Ray: ground, imagine, learn, evaluate."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    help_of = {
        "collect": "collect real episodes with scripted policies (Ray actors)",
        "ground": "fine-tune the LLM on trajectory/instruction data (Ray Train)",
        "imagine": "generate imagined rollouts for novel instructions (Ray Data)",
        "train": "train offline RL policies on real (+ imagined) data (RLlib)",
        "evaluate": "evaluate policies on every level (Ray actors)",
    }
    # Every command that reads a CONFIG: the file, and what may override it.
    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("config", metavar="CONFIG")
    config.add_argument("--run-dir", help="overrides the config's run_dir")
    config.add_argument(
        "--seed",
        type=int,
        help="overrides the config's master seed (a replicate: give each its own --run-dir)",
    )
    runs = argparse.ArgumentParser(add_help=False)
    runs.add_argument(
        "--verbose",
        action="store_true",
        help="also show Ray's logs (Ray Data, RLlib, workers); same as ray.verbose: true",
    )
    for stage in STAGES:
        sub.add_parser(stage, parents=[common, config, runs], help=help_of[stage])
    r = sub.add_parser(
        "run", parents=[common, config, runs], help="all stages in order, skipping finished ones"
    )
    g = r.add_mutually_exclusive_group()
    g.add_argument("--from", dest="start", metavar="STAGE", help="start at this stage")
    g.add_argument("--only", metavar="STAGE", help="run only this stage")
    rep = sub.add_parser("report", parents=[common], help="regenerate eval/report.md and plots")
    rep.add_argument("run_dir", metavar="RUN_DIR")
    cmp_ = sub.add_parser(
        "compare",
        parents=[common],
        help="real+imagined vs real over independent runs of one config (e.g. master seeds)",
    )
    cmp_.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    cmp_.add_argument("--out", help="write the Markdown table here instead of printing it")
    ver = sub.add_parser(
        "verify", parents=[common], help="check every finished stage's files against its manifest"
    )
    ver.add_argument("run_dir", metavar="RUN_DIR")
    ver.add_argument(
        "--quick", action="store_true", help="sampled hashes for big files (as stages do)"
    )
    envs = sub.add_parser(
        "envs", parents=[common], help="list environments, levels, tasks, sample instructions"
    )
    envs.add_argument(
        "--tasks",
        action="store_true",
        help="list every task id instead (what collect.tasks takes: the train level's)",
    )
    sub.add_parser(
        "plan",
        parents=[common, config],
        help="what a config runs where, its memory and context budget; refuses what cannot run",
    )
    sm = sub.add_parser(
        "submit", parents=[common, config], help="submit a config as a Ray job to a cluster"
    )
    sm.add_argument(
        "--address", required=True, help="Ray dashboard/job server URL, e.g. http://127.0.0.1:8265"
    )
    sm.add_argument("--stage", choices=STAGES, help="submit one stage instead of the whole run")
    sm.add_argument("--no-follow", action="store_true", help="print the job id and return")
    for verb in ("status", "logs", "stop"):
        j = sub.add_parser(verb, parents=[common], help=f"{verb} of a submitted job")
        j.add_argument("job_id", metavar="JOB")
        j.add_argument("--address", required=True, help="Ray dashboard/job server URL")
    return p


def _cmd_envs(args: argparse.Namespace) -> int:
    from kalm_ray.envs import ENVS, LEVELS, get_suite

    if args.tasks:
        for env in ENVS:
            try:
                suite = get_suite(env)
            except ModuleNotFoundError as e:
                print(f"{env}: unavailable ({e})")
                continue
            for level in LEVELS:
                print(f"{env} {level}: {' '.join(suite.tasks(level))}")
        return 0
    rows = [("env", "level", "tasks", "steps", "sample instructions")]
    for env in ENVS:
        try:
            suite = get_suite(env)
        except ModuleNotFoundError as e:
            rows.append((env, "-", "-", "-", f"(unavailable: {e})"))
            continue
        for level in LEVELS:
            tasks = suite.tasks(level)
            samples = [suite.instructions(level, t)[0] for t in tasks[:2]]
            steps = str(suite.level_max_steps(level))  # CLEVR easy: one push
            rows.append((env, level, str(len(tasks)), steps, " | ".join(samples)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _load(args: argparse.Namespace):
    """The config, with ``--verbose``/``--debug`` folded into ``ray.verbose``; quiets Ray's
    console output (unless verbose) before any stage imports Ray or Hugging Face."""
    from kalm_ray.config import load_config
    from kalm_ray.raysetup import configure_console

    cfg = load_config(
        args.config, run_dir=getattr(args, "run_dir", None), seed=getattr(args, "seed", None)
    )
    if getattr(args, "verbose", False) or args.debug:
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"verbose": True})})
    configure_console(cfg.ray.verbose)
    return cfg


def _cmd_stage(args: argparse.Namespace) -> int:
    from kalm_ray.pipeline import run_pipeline

    cfg = _load(args)
    run_pipeline(cfg, only=args.cmd)
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kalm_ray.pipeline import run_pipeline

    cfg = _load(args)
    run_pipeline(cfg, start=args.start, only=args.only)
    _print_summary(cfg)
    return 0


def _print_summary(cfg) -> None:
    """Where everything is, whether a rerun would redo it, and the headline table when
    evaluation ran."""
    from kalm_ray.artifacts import RunDir
    from kalm_ray.stage import OUTPUT_DIRS, stage_states

    run = RunDir(cfg.run_dir)
    print(f"\n[kalm] run directory: {run.uri}")
    for stage, state in stage_states(cfg, run).items():
        print(f"  {stage:<9} {run.uri_of(OUTPUT_DIRS[stage]):<60} {state}")
    if run.exists("eval", "headline.md"):
        print("\n" + run.read_bytes("eval", "headline.md").decode())


def _cmd_verify(args: argparse.Namespace) -> int:
    from kalm_ray import artifacts
    from kalm_ray.artifacts import RunDir, verify_run
    from kalm_ray.errors import InputError
    from kalm_ray.stage import OUTPUT_DIRS

    run = RunDir(args.run_dir, gcs_retry_s=artifacts.READ_ONLY_GCS_RETRY_S)
    run.require_run()
    print(f"[kalm] verify: {run.uri}")
    problems = verify_run(run, OUTPUT_DIRS, full=not args.quick)
    for line in problems:
        print(f"kalm: damaged: {line}", file=sys.stderr)
    if problems:
        raise InputError(f"{len(problems)} problem(s) in {run.uri}; rerun the stages named above")
    return 0


_sigterm_seen = False
"""Set by :func:`_on_sigterm`: the exit code must not depend on the exception's type alone."""


def _on_sigterm(signum: int, frame: object) -> None:
    # Ray's blocking calls (ray.get, ray.wait) run signal handlers inside their own signal
    # check, swallow what the handler raises and raise a fresh, plain KeyboardInterrupt
    # (`check_status` on an Interrupted status in Ray's _raylet.pyx). So a TERM that lands
    # there arrives as a KeyboardInterrupt; the flag says it was a TERM (seen in CI: exit 130
    # and "interrupted" for a SIGTERM mid-collect).
    global _sigterm_seen
    _sigterm_seen = True
    raise Terminated()


def _shutdown_ray() -> None:
    """Stop the local Ray this process started (its raylet then ends the workers/actors)."""
    import signal

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second TERM must not cut the shutdown
    try:
        ray.shutdown()
    except Exception:  # noqa: BLE001 - exiting anyway; the exit line matters more
        pass


def _lazy(module: str, fn: str):
    def call(args: argparse.Namespace) -> int:
        return int(getattr(importlib.import_module(module), fn)(args) or 0)

    return call


_COMMANDS = {
    **{stage: _cmd_stage for stage in STAGES},
    "run": _cmd_run,
    "envs": _cmd_envs,
    "verify": _cmd_verify,
    "report": _lazy("kalm_ray.eval.report", "cli_report"),
    "compare": _lazy("kalm_ray.eval.compare", "cli_compare"),
    "plan": _lazy("kalm_ray.plan", "cli_plan"),
    "submit": _lazy("kalm_ray.cluster.submit", "cli_submit"),
    "status": _lazy("kalm_ray.cluster.submit", "cli_status"),
    "logs": _lazy("kalm_ray.cluster.submit", "cli_logs"),
    "stop": _lazy("kalm_ray.cluster.submit", "cli_stop"),
}


def _last_line(message: str) -> None:
    """``message`` on stderr, on a line of its own.

    A signal can arrive while a progress bar is drawn and before its ``with`` block is
    entered (seen in CI: SIGTERM during collect's first draw); that bar is never closed and
    the cursor stays after it. Closing the bars still open ends their lines first.
    """
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar whose __init__ was cut short
            print(file=sys.stderr)
    print(message, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="[%(name)s] %(message)s",
        stream=sys.stderr,
    )
    from kalm_ray.raysetup import install_sigterm_handler

    global _sigterm_seen
    _sigterm_seen = False
    install_sigterm_handler(_on_sigterm)
    try:
        return _COMMANDS[args.cmd](args)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (Terminated, or Ray's plain rewrap of it)
        _shutdown_ray()
        if _sigterm_seen:  # set by the only place that raises Terminated
            _last_line("kalm: terminated")
            return 143
        _last_line("kalm: interrupted")
        return 130
    except KalmError as e:
        if args.debug:
            traceback.print_exc()
        print(f"kalm: error: {e}", file=sys.stderr)
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence: one line, not a traceback
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"kalm: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":
    sys.exit(main())
