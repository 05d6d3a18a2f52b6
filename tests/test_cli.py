"""The command line: readable listings, one-line errors, non-zero exits."""

from __future__ import annotations

import pytest

from kalm_ray.cli import main


def test_envs_table(capsys) -> None:
    assert main(["envs"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["env", "level", "tasks"]
    rows = [line.split()[:3] for line in out[1:]]
    assert ["clevr", "train", "80"] in rows and ["clevr", "rephrase", "80"] in rows
    assert any(r[:2] == ["metaworld", "train"] and r[2] == "10" for r in rows)
    assert any(r[:2] == ["metaworld", "hard"] and r[2] == "4" for r in rows)
    # --tasks: every task id, what collect.tasks takes (its error points here)
    assert main(["envs", "--tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    train = next(line for line in lines if line.startswith("clevr train: ")).split()[2:]
    assert len(train) == 80 and "left:red:blue" in train


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["collect", "nope.yaml"], "nope.yaml: no such config file"),
        (["ground", "{cfg}"], "needs the output of 'collect'"),
        (["run", "{cfg}", "--from", "bake"], "--from 'bake'"),
        # a file where the run dir should be: one line, not NotADirectoryError
        (["collect", "{cfg}", "--run-dir", "{cfg}"], "is not writable (Not a directory)"),
        # a bad override is the flag's, not the file's
        (["plan", "{cfg}", "--seed", "-1"], "error: --seed: Input should be greater than"),
        (["plan", "{cfg}", "--seed", "4294967"], "error: --seed: Input should be less than"),
        (["plan", "{cfg}", "--run-dir", "runs/${seed"], "error: --run-dir: 'runs/${seed'"),
        (["plan", "/dev/null"], "/dev/null: not a regular file, not a config file"),
        (["plan", "/"], "/: a folder, not a config file"),
    ],
)
def test_errors_are_one_line(tmp_path, capsys, argv, needle) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"name: t\nrun_dir: {tmp_path / 'run'}\n")
    rc = main([a.replace("{cfg}", str(cfg)) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and needle in err[0] and err[0].startswith("kalm: error:")


def test_bad_config_key_names_the_key(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: t\ncollect:\n  episodes_per_task: -1\n")
    assert main(["collect", str(cfg)]) != 0
    err = capsys.readouterr().err.strip()
    assert "collect.episodes_per_task" in err and "\n" not in err


@pytest.mark.parametrize(
    ("env", "level", "task", "needle"),
    [
        ("atari", "train", None, "unknown env 'atari'"),
        ("clevr", "expert", None, "unknown level 'expert'"),
        ("clevr", "train", "left:red:red", "task 'left:red:red'"),
    ],
)
def test_unknown_env_level_task(env, level, task, needle) -> None:
    from kalm_ray.envs import get_suite
    from kalm_ray.envs.suite import UnknownChoiceError

    with pytest.raises(UnknownChoiceError) as e:
        get_suite(env).make_env(level, task)
    assert needle in str(e.value) and "valid choices" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("signalled", [True, False])
def test_sigterm_exits_143_even_when_ray_rewraps_it(monkeypatch, capsys, signalled) -> None:
    """A SIGTERM that lands in a blocking Ray call reaches the CLI as a plain
    KeyboardInterrupt: Ray swallows what the handler raises and raises its own (its
    ``check_status`` on an Interrupted status). The exit is still 143; Ctrl-C stays 130."""
    import os
    import signal

    import kalm_ray.cli as cli

    def blocking_ray_call(args) -> int:
        try:
            if signalled:
                os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler runs here
            raise KeyboardInterrupt  # Ctrl-C
        except KeyboardInterrupt:
            raise KeyboardInterrupt() from None  # what Ray raises instead

    monkeypatch.setitem(cli._COMMANDS, "envs", blocking_ray_call)
    rc = main(["envs"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert (rc, last) == ((143, "kalm: terminated") if signalled else (130, "kalm: interrupted"))


def test_a_ray_address_with_nothing_there_is_one_line_not_a_hang(tmp_path) -> None:
    """``ray.init`` retries an unreachable GCS without end; the command says so at once. In
    its own process: this session's Ray may be up already, and init_ray would join it."""
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"name: t\nrun_dir: {tmp_path / 'run'}\nray: {{address: '127.0.0.1:{port}'}}\n"
        "collect: {episodes_per_task: 1, tasks: ['left:red:blue']}\n"
    )
    t0 = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "kalm_ray.cli", "collect", str(cfg)],
        capture_output=True, text=True, timeout=300,
    )
    err = [line for line in out.stderr.splitlines() if line.startswith("kalm: ")]
    assert out.returncode == 2 and len(err) == 1, out.stderr[-2000:]
    assert err[0] == (
        f"kalm: error: ray.address '127.0.0.1:{port}': no Ray there (Connection refused); "
        "start the cluster, or correct ray.address"
    )
    assert time.monotonic() - t0 < 120


def test_a_binary_config_is_one_line(tmp_path, capsys) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    assert main(["plan", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kalm: error: {cfg}: not a text file (a YAML config is UTF-8 text)"


def test_an_unreachable_object_store_fails_within_the_retry_limit(monkeypatch, capsys) -> None:
    """Arrow's GCS client retried a failing call for 15 minutes, deaf to Ctrl-C and SIGTERM:
    `kalm verify gs://...` without credentials hung. The read-only commands set their own
    limit (the stages keep Arrow's: a blip in a long stage is worth waiting out)."""
    import time

    import kalm_ray.artifacts

    monkeypatch.setattr(kalm_ray.artifacts, "READ_ONLY_GCS_RETRY_S", 2)
    t0 = time.monotonic()
    rc = main(["verify", "gs://kalm-no-such-bucket-3c9f/run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("kalm: error: gs://kalm-no-such")
    assert time.monotonic() - t0 < 40
