"""User-facing errors. The CLI prints their message as one line and exits non-zero."""

from __future__ import annotations


class KalmError(Exception):
    """Base of every error whose message is meant for the user as it is (one line)."""

    exit_code: int = 2


class ConfigError(KalmError):
    """A config file that does not parse or validate; the message names the file and key."""


class RunDirError(KalmError):
    """A run directory that cannot be used (unwritable, malformed, written by another config)."""


class InputError(KalmError):
    """A stage input that is missing or corrupt (data, model folder, checkpoint)."""


class BackendUnavailable(KalmError):
    """A generation backend that cannot run here (e.g. vLLM on a machine with no GPU)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (``timeout``, ``docker stop``, Kubernetes, schedulers), raised in the main
    thread by the CLI's handler. A KeyboardInterrupt, so every cleanup that Ctrl-C runs
    (pools shut down, temporary folders removed, staging kept) runs for it too."""
