"""The run directory: where stages read and write, through ``pyarrow.fs``.

A run directory is a local path or a URI (``s3://``, ``gs://``) so that every
node of a cluster sees the same artefacts. Each stage writes into its own
folder through :func:`stage_output`: everything goes to a temporary sibling
that is renamed into place only when the stage finished, then
``manifest.json`` is written last. A crash therefore never leaves a half
artefact that looks whole, and a folder with a manifest is complete.

A stage is skipped when its manifest's ``fingerprint`` equals the one the
current config and inputs give (see :func:`fingerprint`); inputs are named by
their manifests' ``output_id``, so rebuilding a stage reruns those after it.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pyarrow.fs as pafs

from kalm_ray.errors import RunDirError

MANIFEST = "manifest.json"
RUN_INFO = "run.json"


def fingerprint(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    """Identity of a stage's output: its config hash and its inputs' fingerprints."""
    blob = json.dumps({"stage": stage, "config": config_hash, "inputs": inputs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour changes results."""
    out = {"python": platform.python_version()}
    for pkg in (
        "kalm_ray",
        "ray",
        "torch",
        "transformers",
        "peft",
        "mujoco",
        "metaworld",
        "gymnasium",
        "pyarrow",
    ):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class Manifest:
    """What a finished stage wrote: enough to skip it, audit it, and chain the next stage."""

    stage: str
    config_hash: str
    inputs: dict[str, str]
    fingerprint: str
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    output_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    """Identity of this very output; downstream fingerprints include it, so a re-created
    upstream (deleted, or produced again) makes the stages after it run again."""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @classmethod
    def new(cls, stage: str, config_hash: str, inputs: dict[str, str], **kw: Any) -> Manifest:
        return cls(
            stage=stage,
            config_hash=config_hash,
            inputs=inputs,
            fingerprint=fingerprint(stage, config_hash, inputs),
            **kw,
        )


class RunDir:
    """A run directory on any ``pyarrow.fs`` filesystem. Paths are relative to its root."""

    def __init__(self, uri: str):
        if not uri or not isinstance(uri, str):
            raise RunDirError(f"run_dir must be a path or URI, got {uri!r}")
        self.uri = uri
        try:
            if "://" in uri:
                self.fs, root = pafs.FileSystem.from_uri(uri)
            else:
                self.fs, root = pafs.LocalFileSystem(), os.path.abspath(uri)
        except (pafs.ArrowInvalid, ValueError, OSError) as e:  # type: ignore[attr-defined]
            raise RunDirError(f"run_dir {uri!r}: not a usable path or URI ({e})") from None
        self.root = root.rstrip("/")

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Filesystem path (for ``self.fs``) of a path relative to the root."""
        return "/".join([self.root, *[p.strip("/") for p in parts if p]])

    def uri_of(self, *parts: str) -> str:
        """A path usable by other libraries (Ray Data, RLlib): URI for remote, plain for local."""
        p = self.path(*parts)
        if self.is_local:
            return p
        scheme = self.uri.split("://", 1)[0]
        return f"{scheme}://{p}"

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def read_bytes(self, *parts: str) -> bytes:
        with self.fs.open_input_stream(self.path(*parts)) as f:
            return f.read()

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write a file atomically: a temporary sibling renamed over the target."""
        target = self.path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, target)

    def read_json(self, *parts: str) -> Any:
        raw = self.read_bytes(*parts)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise RunDirError(
                f"{self.uri_of(*parts)}: corrupt JSON ({e.msg}, line {e.lineno})"
            ) from None

    def write_json(self, obj: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(obj, indent=2, sort_keys=False, default=str).encode(), *parts)

    def write_text(self, text: str, *parts: str) -> None:
        self.write_bytes(text.encode(), *parts)

    def list(self, *parts: str) -> list[str]:
        """Names directly under a folder (empty if it does not exist)."""
        if not self.exists(*parts):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path(*parts)))
        return sorted(i.base_name for i in infos)

    def delete(self, *parts: str) -> None:
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    # ---- run identity -------------------------------------------------------------------

    def claim(self, experiment: str) -> None:
        """Record which experiment owns this run dir; refuse one written by another experiment.

        Raises RunDirError when the dir cannot be created or written, or belongs to another
        experiment name (so that two configs never mix artefacts).
        """
        try:
            self.makedirs()
            if self.exists(RUN_INFO):
                owner = self.read_json(RUN_INFO).get("experiment")
                if owner != experiment:
                    raise RunDirError(
                        f"run dir {self.uri} was written by experiment {owner!r}, "
                        f"not {experiment!r}; "
                        "use another --run-dir"
                    )
                return
            self.write_json({"experiment": experiment, "created": time.time()}, RUN_INFO)
        except RunDirError:
            raise
        except OSError as e:
            raise RunDirError(f"run dir {self.uri} is not writable ({e.strerror or e})") from None

    # ---- manifests ----------------------------------------------------------------------

    def manifest(self, stage_dir: str) -> Manifest | None:
        """The manifest of a finished stage folder, or None when absent."""
        if not self.exists(stage_dir, MANIFEST):
            return None
        data = self.read_json(stage_dir, MANIFEST)
        try:
            return Manifest(**data)
        except TypeError:
            raise RunDirError(
                f"{self.uri_of(stage_dir, MANIFEST)}: not a kalm_ray manifest"
            ) from None

    def is_current(self, stage_dir: str, fp: str) -> Manifest | None:
        """The stage's manifest if its fingerprint equals ``fp`` (the stage may be skipped)."""
        m = self.manifest(stage_dir)
        return m if m is not None and m.fingerprint == fp else None


@contextmanager
def stage_output(run: RunDir, stage_dir: str) -> Iterator[str]:
    """Write a stage's folder atomically.

    Yields a temporary folder (relative to the run dir) to write into. On success
    the previous output, if any, is moved aside to ``<stage_dir>.replaced-<time>``
    (never deleted: nothing already written is lost) and the temporary folder is
    renamed to ``stage_dir``. On failure the temporary folder is removed and the
    previous output stays as it was.
    """
    tmp = f"{stage_dir}.tmp-{uuid.uuid4().hex[:8]}"
    run.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        run.delete(tmp)
        raise
    if run.exists(stage_dir):
        run.fs.move(
            run.path(stage_dir), run.path(f"{stage_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        )
    run.fs.move(run.path(tmp), run.path(stage_dir))


def write_manifest(run: RunDir, stage_dir: str, manifest: Manifest) -> None:
    """Write ``manifest.json`` last, so its presence means the folder is complete."""
    run.write_json(asdict(manifest), stage_dir, MANIFEST)
