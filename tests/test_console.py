"""What reaches the console: kalm_ray's lines by default, Ray's logs with ``--verbose``."""

from __future__ import annotations

import logging

import pytest

from kalm_ray import raysetup


@pytest.fixture
def restore_console():
    yield
    raysetup.configure_console(False)  # the default every other test runs under


def _run_a_dataset() -> None:
    import ray.data

    ray.data.range(8, override_num_blocks=2).map_batches(lambda b: b).take_all()


def test_quiet_by_default_and_verbose_on_request(ray_local, capfd, restore_console):
    import ray.data

    raysetup.configure_console(False)
    assert not ray.data.DataContext.get_current().enable_progress_bars
    console = [h for h in logging.getLogger("ray.data").handlers if h.name == "console"]
    assert console and all(h.level == logging.ERROR for h in console)
    ray_handlers = logging.getLogger("ray").handlers
    assert ray_handlers and all(h.level == logging.ERROR for h in ray_handlers)
    capfd.readouterr()
    _run_a_dataset()
    logging.getLogger("ray.rllib.algorithms").warning("You are running BC on the new API stack!")
    out = capfd.readouterr()
    assert "streaming_executor" not in out.out + out.err and "new API stack" not in out.err

    raysetup.configure_console(True)
    assert ray.data.DataContext.get_current().enable_progress_bars
    _run_a_dataset()
    out = capfd.readouterr()
    assert "Starting execution of Dataset" in out.out + out.err


def test_raylet_worker_pool_notice_is_filtered_only_when_quiet(ray_local, restore_console):
    import ray._private.worker as worker

    seen: list[list[str]] = []
    raysetup.configure_console(True)
    original = worker.print_to_stdstream
    worker.print_to_stdstream = lambda data, ignore_prefix: seen.append(data["lines"])
    try:
        raysetup._filter_raylet_notices(quiet=True)
        notice = "WARNING: 8 PYTHON worker processes have been started on node: abc with address"
        worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, False)
        died = "A worker died or was killed while executing a task"
        worker.print_to_stdstream({"lines": [died], "pid": "raylet", "is_err": False}, False)
        assert seen == [[died]]
        raysetup._filter_raylet_notices(quiet=False)  # verbose: the original printer again
        worker.print_to_stdstream({"lines": [notice], "pid": "raylet", "is_err": False}, False)
        assert seen[-1] == [notice]
    finally:
        worker.print_to_stdstream = original


def test_cli_verbose_and_debug_turn_on_ray_verbose(tmp_path, monkeypatch):
    from kalm_ray import cli

    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text("name: v\n")
    calls: list[bool] = []
    monkeypatch.setattr(raysetup, "configure_console", calls.append)
    parser = cli._parser()
    assert not cli._load(parser.parse_args(["run", str(cfg_path)])).ray.verbose
    assert cli._load(parser.parse_args(["run", str(cfg_path), "--verbose"])).ray.verbose
    assert cli._load(parser.parse_args(["collect", str(cfg_path), "--debug"])).ray.verbose
    assert calls == [False, True, True]


def test_console_handlers_added_later_get_the_threshold(restore_console):
    """RLlib adds its own console handler when imported; reapply_console() covers it."""
    import io

    raysetup.configure_console(False)
    stream = io.StringIO()
    late = logging.StreamHandler(stream)
    logger = logging.getLogger("ray.kalm_test_library")
    logger.addHandler(late)
    logger.propagate = False
    try:
        raysetup.reapply_console()
        logger.warning("You are running BC on the new API stack!")
        logger.error("a real error")
        assert stream.getvalue() == "a real error\n"
    finally:
        logger.removeHandler(late)


def test_the_progress_board_sums_the_steps_of_its_sources():
    """Training units post their own iteration under their name; the bar shows the sum, and a
    late (out of order) report never moves a source back."""
    from kalm_ray.progress import ProgressBoard

    board = ProgressBoard()
    board.post({"source": "bc-real-seed0", "step": 2})
    board.post({"source": "bc-real-seed1", "step": 1})
    board.post({"source": "bc-real-seed0", "step": 1})  # arrived late
    assert board.latest()["step"] == 3
    board.post({"step": 7, "loss": 0.5})  # ground's single source: the furthest step
    board.post({"step": 6})
    assert board.latest()["step"] == 7 and board.latest()["loss"] == 0.5
