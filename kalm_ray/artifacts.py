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

Three guards make a run directory safe to share and to trust (issue 19):

- **leases** (:meth:`RunDir.lease`): one writer per stage folder; a second is refused
  with one line naming the holder, a dead or expired holder's lease is taken over;
- **checksums** (:func:`write_manifest`, :func:`verify_manifest`): every file a manifest
  covers has its size and SHA-256 recorded, checked when the stage is skipped and when a
  later stage reads it; ``kalm verify RUN_DIR`` checks a whole run;
- **staging** (:class:`Staging`): a resumable stage writes into a staging folder named by
  its fingerprint and marks each finished work unit, so a rerun after a crash skips them.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import logging
import os
import platform
import shlex
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from kalm_ray.errors import InputError, KalmError, RunDirError

log = logging.getLogger("kalm_ray")

MANIFEST = "manifest.json"
SERVER_COPY_LIMIT = 5 << 30
"""Largest file :meth:`RunDir.move_dir` copies in one server-side request: S3's CopyObject
refuses more than 5 GiB (a 7B model's merged weights are one ~13.5 GB file); bigger files
are streamed, which uploads them in parts."""
RUN_INFO = "run.json"


def fingerprint(stage: str, config_hash: str, inputs: dict[str, str]) -> str:
    """Identity of a stage's output: its config hash and its inputs' output ids."""
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
    checksums: dict[str, dict[str, Any]] | None = None
    """Per file (path relative to the run dir): ``size``, ``sha256`` and, for files over
    :data:`QUICK_LIMIT`, ``sample`` (see :func:`file_digest`). None in manifests written
    before issue 19: their files are loaded unverified."""

    @classmethod
    def from_json(cls, data: Any, where: str) -> Manifest:
        """A manifest from its parsed JSON; RunDirError naming ``where`` for any other shape
        (not an object, an unknown/missing field, a field of the wrong type or null)."""
        if not isinstance(data, dict):
            raise RunDirError(f"{where}: not a kalm_ray manifest (a JSON {_json_type(data)})")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise RunDirError(f"{where}: not a kalm_ray manifest (unknown field {unknown[0]!r})")
        for name in ("stage", "config_hash", "inputs", "fingerprint"):
            if name not in data:
                raise RunDirError(f"{where}: not a kalm_ray manifest (no field {name!r})")
        for name, value in data.items():
            want = _MANIFEST_TYPES[name]
            if not isinstance(value, want) or isinstance(value, bool):
                if value is None and name == "checksums":
                    continue
                raise RunDirError(
                    f"{where}: field {name!r} is a JSON {_json_type(value)}, expected "
                    f"{'an object' if want is dict else 'a string'}; rerun the stage that wrote it"
                )
        bad = [k for k, v in data["inputs"].items() if not isinstance(v, str)]
        if bad:
            raise RunDirError(f"{where}: field 'inputs' names {bad[0]!r} with no output id")
        for path, digest in (data.get("checksums") or {}).items():
            if not (
                isinstance(digest, dict)
                and isinstance(digest.get("size"), int)
                and isinstance(digest.get("sha256"), str)
            ):
                raise RunDirError(f"{where}: checksum of {path!r} is not {{size, sha256}}")
        return cls(**data)

    @classmethod
    def new(cls, stage: str, config_hash: str, inputs: dict[str, str], **kw: Any) -> Manifest:
        return cls(
            stage=stage,
            config_hash=config_hash,
            inputs=inputs,
            fingerprint=fingerprint(stage, config_hash, inputs),
            **kw,
        )


_MANIFEST_TYPES: dict[str, type] = {
    "stage": str,
    "config_hash": str,
    "inputs": dict,
    "fingerprint": str,
    "counts": dict,
    "timings": dict,
    "versions": dict,
    "output_id": str,
    "created": str,
    "checksums": dict,
}


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# Shapes of the JSON artefacts that readers index into, checked by RunDir.read_json by file
# name: key -> (types allowed, required). A file of another shape is one line naming it,
# not a KeyError/AttributeError far from it. Optional keys may be null.
_JSON_SHAPES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "policy_info.json": {
        "algo": ((str,), False),
        "data": ((str,), False),
        "seed": ((int,), False),
        "env": ((str,), False),
    },
    "results.json": {
        "policies": ((dict,), True),
        "levels": ((list,), True),
        "groups": ((dict,), True),
        "paired": ((dict,), False),
        "env": ((str,), False),
    },
    "run.json": {"experiment": ((str,), True), "seed": ((int,), False)},
}


def check_json_shape(obj: Any, name: str, where: str) -> None:
    """Raise InputError naming ``where`` if ``obj`` does not have the shape known for the
    artefact ``name`` (a base name in ``_JSON_SHAPES``); unknown names pass."""
    shape = _JSON_SHAPES.get(name)
    if shape is None:
        return
    if not isinstance(obj, dict):
        raise InputError(f"{where}: expected a JSON object, got a JSON {_json_type(obj)}")
    for key, (types, required) in shape.items():
        if key not in obj or obj[key] is None:
            if required:
                raise InputError(f"{where}: no {key!r} field")
            continue
        value = obj[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise InputError(
                f"{where}: field {key!r} is a JSON {_json_type(value)}, not "
                + " or ".join(_json_type(t()) for t in types)
            )
    if name == "results.json":
        for pname, p in obj["policies"].items():
            if not isinstance(p, dict) or not isinstance(p.get("levels"), dict):
                raise InputError(f"{where}: policy {pname!r} has no 'levels' object")
        for gname, g in obj["groups"].items():
            if not isinstance(g, dict) or not isinstance(g.get("algo"), str):
                raise InputError(f"{where}: group {gname!r} has no 'algo'")
        if not all(isinstance(lv, str) for lv in obj["levels"]):
            raise InputError(f"{where}: 'levels' is not a list of level names")


READ_ONLY_GCS_RETRY_S = 60
"""How long ``kalm verify``/``report``/``compare`` retry one call to a ``gs://`` run dir
before they fail. Arrow's default, which the stages keep (a blip in a stage hours long is
worth waiting out), is 15 minutes, in C++, deaf to Ctrl-C and SIGTERM."""


class RunDir:
    """A run directory on any ``pyarrow.fs`` filesystem. Paths are relative to its root."""

    def __init__(self, uri: str, *, gcs_retry_s: float | None = None):
        if not uri or not isinstance(uri, str):
            raise RunDirError(f"run_dir must be a path or URI, got {uri!r}")
        self.uri = uri
        try:
            if "://" in uri:
                self.fs, root = pafs.FileSystem.from_uri(uri)
                if gcs_retry_s is not None and self.fs.type_name == "gcs" and "?" not in uri:
                    # Arrow's GCS client retries a failing call for 15 minutes, in C++, where
                    # neither Ctrl-C nor SIGTERM reach it (no credentials: `kalm verify gs://…`
                    # hung that long). Options in the URI's query are the user's own.
                    self.fs = pafs.GcsFileSystem(
                        retry_time_limit=datetime.timedelta(seconds=gcs_retry_s)
                    )
            else:
                self.fs, root = pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))
        except (pa.ArrowException, ValueError, NotImplementedError, OSError) as e:
            # pa.ArrowInvalid (unknown scheme) and ArrowNotImplementedError (a scheme this
            # pyarrow build lacks) are ValueError/NotImplementedError subclasses; hdfs:// without
            # libhdfs is an OSError. Messages can span lines: keep the first.
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise RunDirError(f"run_dir {uri!r}: not a usable path or URI ({why})") from None
        self.root = root.rstrip("/")
        self.claimed_seed: int | None = None
        """The master seed a command of this process claims the dir for (:meth:`claim`)."""

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

    def require_run(self) -> None:
        """InputError unless this is a run dir (``kalm verify``/``report``/``compare`` read
        one): a mistyped path must not read as a run with nothing done."""
        try:
            found = self.exists()
        except OSError as e:  # an object store this machine cannot reach (no credentials, DNS)
            why = " ".join(str(e).split())[:240]
            raise RunDirError(f"{self.uri}: cannot reach it ({why})") from None
        if not found:
            raise InputError(f"{self.uri}: no such run directory")
        if not self.exists(RUN_INFO):
            raise InputError(
                f"{self.uri}: not a kalm run directory (no {RUN_INFO}, which the first stage "
                "run in it writes)"
            )
        self.read_json(RUN_INFO)  # its shape is checked there: one line if it is no record

    def command(self, stage: str, *flags: str) -> str:
        """The command that (re)makes ``stage`` in this run dir, for error hints:
        ``kalm STAGE CONFIG [FLAGS] --run-dir URI [--seed N]``.

        Why both flags: a hint is copied as it is, and without them it would act on the
        config's own run_dir and master seed, not on the replicate the user is looking at.
        The seed is the one this process claims the dir for (:meth:`claim`), else the one
        ``run.json`` records (none for a run dir that has none).
        """
        seed = self.claimed_seed
        if seed is None:
            try:
                seed = (self.read_json(RUN_INFO) if self.exists(RUN_INFO) else {}).get("seed")
            except (InputError, RunDirError, OSError):  # unreadable, or not of run.json's shape
                pass  # a hint must not fail: the command without the seed
        words = ["kalm", stage, "CONFIG", *flags, "--run-dir", shlex.quote(self.uri)]
        return " ".join(words + ([] if seed is None else ["--seed", str(seed)]))

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def makedirs(self, *parts: str) -> None:
        self.fs.create_dir(self.path(*parts), recursive=True)

    def move_dir(self, src: str, dst: str) -> None:
        """Rename the folder ``src`` to ``dst`` (both relative to the root; ``dst`` absent).

        Object stores (S3, GCS) have no folders to rename, and Arrow's filesystems refuse to
        move one there: on any filesystem that is not local, each file is copied (a
        server-side copy on S3 and GCS), then the source is deleted, its manifest first, so
        that a move stopped half way never leaves a folder that looks finished.
        """
        if self.is_local:
            self.fs.move(self.path(src), self.path(dst))
            return
        base, target = self.path(src), self.path(dst)
        files = [
            i
            for i in self.fs.get_file_info(pafs.FileSelector(base, recursive=True))
            if i.type == pafs.FileType.File
        ]
        # The manifest last: a copy stopped half way never looks finished either.
        files.sort(key=lambda i: i.path == f"{base}/{MANIFEST}")
        for info in files:
            to = target + info.path[len(base) :]
            self.fs.create_dir(to.rsplit("/", 1)[0], recursive=True)
            if (info.size or 0) <= SERVER_COPY_LIMIT:
                self.fs.copy_file(info.path, to)
            else:  # S3 copies at most 5 GiB in one request; a stream uploads in parts
                with self.fs.open_input_stream(info.path) as i, self.fs.open_output_stream(to) as o:
                    while chunk := i.read(64 << 20):
                        o.write(chunk)
        if self.exists(src, MANIFEST):
            self.fs.delete_file(self.path(src, MANIFEST))
        self.fs.delete_dir(base)

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
        """Parse a JSON file; artefacts known by name (``policy_info.json``, ``results.json``,
        ``run.json``) must also have their shape (see ``_JSON_SHAPES``)."""
        raw = self.read_bytes(*parts)
        try:
            obj = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            why = f"{e.msg}, line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "not text"
            raise RunDirError(f"{self.uri_of(*parts)}: corrupt JSON ({why})") from None
        check_json_shape(obj, parts[-1].rsplit("/", 1)[-1], self.uri_of(*parts))
        return obj

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
        """Remove a file or a folder (recursively); nothing if absent."""
        info = self.fs.get_file_info(self.path(*parts))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(*parts))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(*parts))

    # ---- leases (see Lease) ---------------------------------------------------------------

    def lease(self, stage_dir: str, *, stage: str | None = None):
        """Context manager: hold the exclusive lease on ``stage_dir`` (reentrant in this
        process); RunDirError naming the holder if another live writer has it."""
        return _lease(self, stage_dir, stage=stage)

    def lease_key(self, stage_dir: str) -> tuple[str, str]:
        return _lease_key(self, stage_dir)

    # ---- run identity -------------------------------------------------------------------

    def claim(self, experiment: str, seed: int | None = None, *, write: bool = True) -> None:
        """Record which experiment (and master seed) owns this run dir; refuse one written by
        another experiment or under another master seed.

        Raises RunDirError when the dir cannot be created or written, or belongs to another
        experiment name (so that two configs never mix artefacts) or master seed. Why the seed:
        ``--seed N`` makes a replicate, and ``kalm compare`` reads one run dir per replicate;
        rerun in the same dir it would replace the other seed's every stage. A run dir from
        before the seed was recorded is not checked (claiming never rewrites ``run.json``: a
        refused command leaves the run dir as it was). ``write=False`` only checks: a command
        claims the dir once its own checks have passed (:func:`kalm_ray.stage.plan_stage`).
        """
        self.claimed_seed = seed
        try:
            if write:
                self.makedirs()
            if self.exists(RUN_INFO):
                info = self.read_json(RUN_INFO)
                owner = info.get("experiment")
                if owner != experiment:
                    raise RunDirError(
                        f"run dir {self.uri} was written by experiment {owner!r}, "
                        f"not {experiment!r}; "
                        "use another --run-dir"
                    )
                if seed is not None and info.get("seed") not in (None, seed):
                    raise RunDirError(
                        f"run dir {self.uri} holds master seed {info['seed']}'s run of "
                        f"{experiment!r}, not seed {seed}'s; use another --run-dir (one per "
                        "seed, or `run_dir: runs/${name}_s${seed}` in the config; `kalm "
                        "compare` reads them together)"
                    )
                return
            if not write:
                return
            info = {"experiment": experiment, "created": time.time()}
            self.write_json(info if seed is None else {**info, "seed": seed}, RUN_INFO)
        except RunDirError:
            raise
        except OSError as e:
            raise RunDirError(f"run dir {self.uri} is not writable ({e.strerror or e})") from None

    # ---- manifests ----------------------------------------------------------------------

    def manifest(self, stage_dir: str) -> Manifest | None:
        """The manifest of a finished stage folder, or None when absent."""
        if not self.exists(stage_dir, MANIFEST):
            return None
        return Manifest.from_json(
            self.read_json(stage_dir, MANIFEST), self.uri_of(stage_dir, MANIFEST)
        )

    def is_current(self, stage_dir: str, fp: str) -> Manifest | None:
        """The stage's manifest if its fingerprint equals ``fp`` (the stage may be skipped)."""
        m = self.manifest(stage_dir)
        return m if m is not None and m.fingerprint == fp else None


@contextmanager
def stage_output(run: RunDir, stage_dir: str, *, resume_key: str | None = None) -> Iterator[str]:
    """Write a stage's folder atomically, under the stage's lease.

    Yields a temporary folder (relative to the run dir) to write into. On success
    the previous output, if any, is moved aside to ``<stage_dir>.replaced-<time>``
    (never deleted: nothing already written is lost) and the temporary folder is
    renamed to ``stage_dir``. On failure the temporary folder is removed and the
    previous output stays as it was.

    With ``resume_key`` (the stage's fingerprint) the folder is a :class:`Staging` area
    named by it, ``<stage_dir>.partial-<key>``, and is kept on failure (Ctrl-C, SIGTERM, a
    crash) so that a rerun of the same config finds its finished units there.
    The lease (:meth:`RunDir.lease`, reentrant) keeps a second writer out; a lease lost
    while running (suspended past its expiry and taken over) refuses the final rename.
    """
    with run.lease(stage_dir):
        if resume_key is None:
            tmp = f"{stage_dir}.tmp-{uuid.uuid4().hex[:8]}"
        else:
            tmp = f"{stage_dir}.partial-{resume_key[:16]}"
            _say_other_staging(run, stage_dir, keep=tmp)
        run.makedirs(tmp)
        try:
            yield tmp
        except BaseException:
            if resume_key is None:
                run.delete(tmp)
            raise
        lease = _HELD.get(run.lease_key(stage_dir))
        if lease is not None and lease.lost:
            raise RunDirError(
                f"{run.uri_of(stage_dir)}: this process lost its lease while running "
                f"(another kalm took it over); its output is left in {run.uri_of(tmp)}"
            )
        if resume_key is not None:
            run.delete(tmp, Staging.UNITS)
        if run.exists(stage_dir):
            run.move_dir(stage_dir, f"{stage_dir}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
        run.move_dir(tmp, stage_dir)


def _say_other_staging(run: RunDir, stage_dir: str, *, keep: str) -> None:
    """One line naming the staging folders of this stage that other settings (or older code)
    left: this run does not resume them and nothing removes them, so they would only take up
    space unseen. Kept, as every stopped run's work is; whether to delete them is the user's."""
    parent, _, name = stage_dir.rpartition("/")
    prefix = f"{parent}/" if parent else ""
    others = [
        f"{prefix}{n}"
        for n in run.list(parent)
        if n.startswith(f"{name}.partial-") and f"{prefix}{n}" != keep
    ]
    if others:
        print(
            f"[kalm] {', '.join(run.uri_of(o) for o in others)}: left by a stopped run under "
            "other settings; not resumed by this one (delete when no longer needed)",
            flush=True,
        )


def write_manifest(
    run: RunDir, stage_dir: str, manifest: Manifest, *, also: tuple[str, ...] = ()
) -> None:
    """Write ``manifest.json`` last, so its presence means the folder is complete.

    The manifest gets the checksum of every file under ``stage_dir`` (and of the files
    ``also`` names, paths relative to the run dir, for a stage that writes beside its
    folder), except the regenerable ones in :data:`UNCHECKED`.
    """
    files = [p for p in _walk(run, stage_dir) if not _unchecked(p)] + list(also)
    manifest.checksums = {p: file_digest(run, p) for p in sorted(files)}
    run.write_json(asdict(manifest), stage_dir, MANIFEST)


# ---- checksums ----------------------------------------------------------------------------

QUICK_LIMIT = 64 << 20
"""Files up to this size are hashed whole on every check; bigger ones (model weights) get a
sampled digest for the checks at skip/read time and their full hash for ``kalm verify``.
SHA-256 reads ~1.7 GB/s on this project's dev machine (blake2b ~0.86 GB/s, so not that), so a
13 GB model costs ~8 s whole but ~0.05 s sampled."""
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 64 << 10
UNCHECKED = ("eval/report.md", "eval/*.png")
"""Files ``kalm report`` rewrites after the stage; derived, so not checksummed."""


def _unchecked(path: str) -> bool:
    return any(fnmatch.fnmatch(path, pat) for pat in UNCHECKED)


def _walk(run: RunDir, folder: str) -> list[str]:
    """Every file under ``folder`` (run-relative paths), manifest and leases excluded."""
    base = run.path(folder)
    if run.fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    out = []
    for info in run.fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        rel = f"{folder}/{info.path[len(base) :].lstrip('/')}"
        if rel == f"{folder}/{MANIFEST}" or rel.endswith(LEASE_SUFFIX):
            continue
        out.append(rel)
    return out


def file_digest(run: RunDir, path: str, *, full: bool = True) -> dict[str, Any]:
    """``size`` and ``sha256`` of a run-relative file; plus ``sample`` for big files (the
    SHA-256 of :data:`SAMPLE_BLOCKS` blocks spread evenly, first and last included).
    ``full=False`` skips the whole-file hash of a big file (a quick check)."""
    p = run.path(path)
    with run.fs.open_input_file(p) as f:
        size = f.size()
        out: dict[str, Any] = {"size": size}
        if size > QUICK_LIMIT:
            h = hashlib.sha256()
            step = (size - SAMPLE_BLOCK) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                h.update(f.read_at(SAMPLE_BLOCK, i * step))
            out["sample"] = h.hexdigest()
            if not full:
                return out
            f.seek(0)
        h = hashlib.sha256()
        while chunk := f.read(8 << 20):
            h.update(chunk)
        out["sha256"] = h.hexdigest()
    return out


@dataclass(frozen=True)
class Damage:
    """One file of a manifest that is not as written."""

    path: str
    why: str
    stage: str


def verify_manifest(
    run: RunDir, stage_dir: str, manifest: Manifest, *, full: bool = False
) -> list[Damage] | None:
    """Files of ``manifest`` that are missing or differ; None when it has no checksums.

    ``full=False`` (the check at skip/read time): size of every file, content hash of files
    up to :data:`QUICK_LIMIT`, sampled hash of bigger ones. ``full=True`` hashes everything.
    """
    if manifest.checksums is None:
        return None
    damaged = []
    for path, want in manifest.checksums.items():
        try:
            info = run.fs.get_file_info(run.path(path))
            if info.type != pafs.FileType.File:
                damaged.append(Damage(path, "missing", manifest.stage))
                continue
            if info.size != want["size"]:
                damaged.append(
                    Damage(path, f"size {info.size} bytes, {want['size']} written", manifest.stage)
                )
                continue
            got = file_digest(run, path, full=full or want["size"] <= QUICK_LIMIT)
        except OSError as e:
            damaged.append(Damage(path, f"unreadable ({e})", manifest.stage))
            continue
        key = "sha256" if "sha256" in got else "sample"
        if key in want and got[key] != want[key]:
            damaged.append(Damage(path, "content differs from what was written", manifest.stage))
    return damaged


def check_stage_files(run: RunDir, stage_dir: str, manifest: Manifest) -> bool:
    """Quick-verify a finished stage's files; False when damaged (each file logged on one
    line), True when intact or unverifiable (an older manifest: said once, on one line)."""
    damaged = verify_manifest(run, stage_dir, manifest)
    if damaged is None:
        _say_unverified(run, stage_dir)
        return True
    for d in damaged:
        print(f"[kalm] {run.uri_of(d.path)}: {d.why}", file=sys.stderr, flush=True)
    return not damaged


def require_intact(run: RunDir, stage_dir: str, manifest: Manifest) -> None:
    """Quick-verify the output of an earlier stage before reading it; InputError naming the
    first damaged file and the stage to rerun."""
    damaged = verify_manifest(run, stage_dir, manifest)
    if damaged is None:
        _say_unverified(run, stage_dir)
        return
    if damaged:
        d = damaged[0]
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise InputError(
            f"{run.uri_of(d.path)}: {d.why}{more}; rerun `{run.command(d.stage)}` "
            f"(or `kalm verify {shlex.quote(run.uri)}`)"
        )


_said_unverified: set[str] = set()


def _say_unverified(run: RunDir, stage_dir: str) -> None:
    where = run.uri_of(stage_dir)
    if where not in _said_unverified:
        _said_unverified.add(where)
        print(
            f"[kalm] {where}: manifest has no checksums (written by an older kalm_ray); "
            "its files are used unverified",
            file=sys.stderr,
            flush=True,
        )


def verify_run(run: RunDir, stage_dirs: dict[str, str], *, full: bool = True) -> list[str]:
    """``kalm verify``: check every finished stage of a run; returns one line per problem
    and prints one line per stage."""
    problems: list[str] = []
    ids: dict[str, str] = {}
    unreadable: set[str] = set()
    for stage, folder in stage_dirs.items():
        try:
            m = run.manifest(folder)
        except KalmError as e:  # unreadable: this stage is damaged, the others still checked
            problems.append(f"{e}; rerun `{run.command(stage)}`")
            print(f"  {stage:<9} {run.uri_of(folder)}: manifest damaged")
            unreadable.add(stage)
            continue
        if m is None:
            print(f"  {stage:<9} {run.uri_of(folder)}: not run")
            continue
        ids[stage] = m.output_id
        damaged = verify_manifest(run, folder, m, full=full)
        if damaged is None:
            print(f"  {stage:<9} {run.uri_of(folder)}: unverified (manifest has no checksums)")
        elif damaged:
            for d in damaged:
                problems.append(f"{run.uri_of(d.path)}: {d.why}; rerun `{run.command(stage)}`")
            print(f"  {stage:<9} {run.uri_of(folder)}: {len(damaged)} damaged file(s)")
        else:
            print(f"  {stage:<9} {run.uri_of(folder)}: {len(m.checksums or {})} files intact")
        for up, oid in m.inputs.items():
            if up in stage_dirs and up not in ids and up not in unreadable:
                problems.append(
                    f"{run.uri_of(folder)}: made from a {up!r} output that is no longer there "
                    f"({run.uri_of(stage_dirs[up])}); rerun `{run.command('run', '--from', up)}`"
                )
            elif up in ids and ids[up] != oid:
                problems.append(
                    f"{run.uri_of(folder)}: made from an earlier {up!r} output than the one "
                    f"there now; rerun `{run.command(stage)}`"
                )
    return problems


# ---- staging: resumable stages ------------------------------------------------------------


class Staging:
    """A resumable stage's staging folder and the finished work units in it.

    A unit is one file the stage writes into the folder (collect: one episode file per
    task). After the file is complete the stage calls :meth:`mark_finished`, which records
    its size and hash (and any facts the stage needs back, e.g. counts) in
    ``_units/<name>.json``, written atomically. :meth:`finished` returns the units whose file
    is still exactly as marked; anything else is redone. Only the lease holder writes here.
    """

    UNITS = "_units"

    def __init__(self, run: RunDir, folder: str):
        self.run, self.folder = run, folder

    def mark_finished(self, name: str, info: dict[str, Any] | None = None) -> None:
        digest = file_digest(self.run, f"{self.folder}/{name}")
        self.run.write_json(
            {"name": name, "digest": digest, "info": info or {}}, self.folder, self.UNITS,
            f"{name}.json",
        )

    def remove(self, prefix: str) -> None:
        """Delete the folder's files named ``prefix...`` (a stage's unit files that are not
        part of its output, once the output is written)."""
        for name in self.run.list(self.folder):
            if name.startswith(prefix):
                self.run.delete(self.folder, name)

    def finished(self) -> dict[str, dict[str, Any]]:
        """``name -> info`` of every unit whose file matches its mark."""
        out = {}
        for marker in self.run.list(self.folder, self.UNITS):
            if not marker.endswith(".json") or ".tmp-" in marker:
                continue
            try:
                mark = json.loads(self.run.read_bytes(self.folder, self.UNITS, marker))
                name = mark["name"]
                if file_digest(self.run, f"{self.folder}/{name}") == mark["digest"]:
                    out[name] = mark["info"]
            except (OSError, ValueError, KeyError, TypeError):
                continue  # a damaged mark or file: redo that unit
        return out


# ---- leases: one writer per stage folder ----------------------------------------------------

LEASE_SUFFIX = ".lease"
LEASE_TTL_S = 120.0
"""A lease not renewed for this long is stale (its holder is gone, hung, or on a host whose
pids we cannot check)."""
LEASE_RENEW_S = 20.0

_HELD: dict[tuple[str, str], Lease] = {}
_HELD_LOCK = threading.Lock()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Lease:
    """An exclusive, expiring claim on one stage folder: ``<stage_dir>.lease`` holding the
    owner token, host, pid, stage, start and expiry (JSON).

    Local filesystem: the file appears atomically with its content (``os.link`` of a written
    temp file fails if the lease exists: an O_EXCL create that is never seen half written);
    takeover of a stale lease and renewals run under ``flock`` of the parent folder, so two
    processes never both take over. Object stores (``pyarrow.fs`` has no conditional put):
    best effort, create-if-absent then read back, and a lease whose holder is alive is
    renewed by a background thread; two writers racing within one round trip can both win.
    """

    def __init__(self, run: RunDir, stage_dir: str, *, stage: str, ttl: float = LEASE_TTL_S):
        self.run, self.stage_dir, self.stage, self.ttl = run, stage_dir, stage, ttl
        self.path = run.path(f"{stage_dir}{LEASE_SUFFIX}")
        self.token = uuid.uuid4().hex
        self.depth = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the record
    def _record(self) -> dict[str, Any]:
        now = time.time()
        return {
            "owner": self.token,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "stage": self.stage,
            "started": getattr(self, "_started", now),
            "expires": now + self.ttl,
        }

    def _read(self) -> dict[str, Any] | None:
        """The current holder's record; None if absent; ``{}`` if unreadable."""
        try:
            with self.run.fs.open_input_stream(self.path) as f:
                rec = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            if self.run.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            return {}
        return rec if isinstance(rec, dict) else {}

    @staticmethod
    def stale_reason(rec: dict[str, Any]) -> str | None:
        """Why a holder's record no longer counts (None: it does)."""
        try:
            expires, host, pid = float(rec["expires"]), str(rec["host"]), int(rec["pid"])
        except (KeyError, TypeError, ValueError):
            return "its lease file is unreadable"
        if host == socket.gethostname():
            if pid == os.getpid():
                if not any(le.token == rec.get("owner") for le in _HELD.values()):
                    return "left by this process"
            elif not _pid_alive(pid):
                return f"pid {pid} is not running"
        if expires < time.time():
            return f"expired {time.time() - expires:.0f}s ago"
        return None

    def describe(self, rec: dict[str, Any]) -> str:
        started = rec.get("started")
        since = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, int | float)
            else "?"
        )
        return (
            f"kalm {rec.get('stage', '?')} (pid {rec.get('pid', '?')} on {rec.get('host', '?')}, "
            f"since {since})"
        )

    # -- acquire / renew / release
    def acquire(self) -> None:
        self._started = time.time()
        local = self.run.is_local
        try:
            if local:
                # A stage refused before writing anything leaves no folder behind (release).
                self._made_parent = not os.path.isdir(os.path.dirname(self.path))
                os.makedirs(os.path.dirname(self.path), exist_ok=True)
            else:
                self.run.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        except OSError as e:  # a file where a folder must be, a read-only or absent mount
            raise RunDirError(
                f"run dir {self.run.uri} is not writable ({e.strerror or e})"
            ) from None
        if self._create():
            return self._start_renewer()
        with self._guard():
            rec = self._read()
            if rec is None and self._create():
                return self._start_renewer()
            rec = rec if rec is not None else (self._read() or {})
            why = self.stale_reason(rec)
            if why is None:
                raise RunDirError(
                    f"{self.run.uri_of(self.stage_dir)} is being written by "
                    f"{self.describe(rec)}; wait for it to finish or use another --run-dir "
                    f"(lease {self.run.uri_of(self.stage_dir + LEASE_SUFFIX)})"
                )
            self._delete()
            if not self._create():
                rec = self._read() or {}
                raise RunDirError(
                    f"{self.run.uri_of(self.stage_dir)} is being written by "
                    f"{self.describe(rec)}; wait for it to finish or use another --run-dir"
                )
        print(
            f"[kalm] {self.stage}: took over the stale lease of {self.describe(rec)} on "
            f"{self.run.uri_of(self.stage_dir)} ({why})",
            file=sys.stderr,
            flush=True,
        )
        self._start_renewer()

    def _create(self) -> bool:
        data = json.dumps(self._record()).encode()
        if self.run.is_local:
            tmp = f"{self.path}.tmp-{self.token[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            try:
                os.link(tmp, self.path)  # atomic, and fails if a lease exists
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self.run.fs.get_file_info(self.path).type != pafs.FileType.NotFound:
            return False
        with self.run.fs.open_output_stream(self.path) as f:
            f.write(data)
        return (self._read() or {}).get("owner") == self.token

    def _delete(self) -> None:
        try:
            self.run.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    @contextmanager
    def _guard(self) -> Iterator[None]:
        if not self.run.is_local:
            yield
            return
        import fcntl

        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def renew(self) -> bool:
        """Push the expiry forward; False (and ``lost``) if someone else holds it now."""
        with self._guard():
            rec = self._read()
            if rec is None or rec.get("owner") != self.token:
                self.lost = True
                return False
            data = json.dumps(self._record()).encode()
            if self.run.is_local:
                tmp = f"{self.path}.tmp-{self.token[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, self.path)
            else:
                with self.run.fs.open_output_stream(self.path) as f:
                    f.write(data)
        return True

    def _start_renewer(self) -> None:
        def loop() -> None:
            while not self._stop.wait(min(LEASE_RENEW_S, self.ttl / 3)):
                try:
                    if not self.renew():
                        log.warning("%s: lease lost to another writer", self.stage_dir)
                        return
                except OSError as e:  # a transient store error: try again next round
                    log.debug("lease renewal failed: %s", e)

        self._thread = threading.Thread(target=loop, name="kalm-lease", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            with self._guard():
                rec = self._read()
                if rec is not None and rec.get("owner") == self.token:
                    self._delete()
            if getattr(self, "_made_parent", False):
                os.rmdir(os.path.dirname(self.path))  # only if still empty
        except OSError as e:  # never mask the stage's own outcome for a lease file
            log.debug("lease release: %s", e)


def _lease_key(run: RunDir, stage_dir: str) -> tuple[str, str]:
    return (type(run.fs).__name__, run.path(stage_dir))


@contextmanager
def _lease(run: RunDir, stage_dir: str, *, stage: str | None = None) -> Iterator[Lease]:
    key = _lease_key(run, stage_dir)
    with _HELD_LOCK:
        held = _HELD.get(key)
    if held is not None:  # reentrant: the pipeline holds it, the stage's writer nests
        held.depth += 1
        try:
            yield held
        finally:
            held.depth -= 1
        return
    lease = Lease(run, stage_dir, stage=stage or stage_dir)
    lease.acquire()
    with _HELD_LOCK:
        _HELD[key] = lease
    try:
        yield lease
    finally:
        with _HELD_LOCK:
            _HELD.pop(key, None)
        lease.release()

