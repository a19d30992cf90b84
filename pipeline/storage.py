"""Where stage outputs live and how they are written.

Layout: ``<workdir>/<stage>/<key>/`` where ``key`` is the *provenance key* of the output::

    key = sha256(canonical JSON of {stage config, keys of the input stages, code version})[:16]

The code version hashes the source of the stage's module and of every project module it
imports (transitively, within ``pipeline``, ``stages`` and ``models``), so editing a helper a
stage calls changes its key just like editing the stage itself.

Every file is written atomically (temp file in the same directory + ``os.replace``), a stage
directory gets a ``manifest.json`` and, written last, the completion marker ``COMPLETE``.
:func:`open_stage_output` refuses a directory without the marker, so a half-finished stage is
never mistaken for a result.

:func:`stage_lock` is the one lock of a stage output (``<workdir>/.locks/<stage>-<key>.lock``):
:func:`stages.run_stage`, which every entry point calls (``wsss run``, the Prefect flow, its
deployments), holds it from the cache check to the completion marker, so two runs with the
same config wait for each other instead of writing one directory at once.
"""

import ast
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from pipeline.errors import DiskFullError, disk_full_error, is_disk_full

COMPLETE_MARKER = "COMPLETE"
MANIFEST = "manifest.json"
PROJECT_PACKAGES = ("pipeline", "stages", "models")
LOCK_DIR = ".locks"
log = logging.getLogger(__name__)


class IncompleteStageError(RuntimeError):
    """A stage output directory is missing or has no completion marker."""


@dataclass
class StageResult:
    """What passes between stages (and Prefect tasks): small and JSON-serialisable."""

    stage: str
    key: str
    path: str
    metrics: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None
    cached: bool = False
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StageResult":
        return cls(**dict(data))


# --------------------------------------------------------------------------- keys
def canonical_json(data: Any) -> str:
    """Deterministic JSON (sorted keys, no spaces; paths and other objects as strings)."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)


def hash_text(*parts: str, length: int = 16) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:length]


def _module_file(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _project_imports(path: Path, module: str) -> set[str]:
    """Project modules imported by the file (absolute and relative imports)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PROJECT_PACKAGES:
                found.add(name)
    return found


def module_closure(modules: Iterable[str]) -> list[Path]:
    """Source files of the given modules and every project module they import."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            seen[name] = Path()
            continue
        seen[name] = path
        todo.extend(_project_imports(path, name))
        # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))
    return sorted({p for p in seen.values() if p != Path()})


def code_version(modules: Iterable[str]) -> str:
    """Hash of the source of ``modules`` and their transitive project imports."""
    root = Path(__file__).resolve().parent.parent
    parts = []
    for path in module_closure(modules):
        try:
            rel = str(path.resolve().relative_to(root))
        except ValueError:
            rel = path.name
        parts.append(rel + "\n" + path.read_text())
    return hash_text(*parts)


def provenance_key(config: Any, inputs: Mapping[str, str], code: str) -> str:
    """Key of a stage output: its config, the keys of its inputs and its code version."""
    return hash_text(canonical_json({"config": config, "inputs": dict(sorted(inputs.items())),
                                     "code": code}))


def stage_dir(workdir: Path, stage: str, key: str) -> Path:
    return Path(workdir) / stage / key


# --------------------------------------------------------------------------- locks
_held_locks = threading.local()    # lock files this thread holds (the lock is reentrant per thread)


def lock_path(workdir: Path, stage: str, key: str) -> Path:
    return Path(workdir) / LOCK_DIR / f"{stage}-{key}.lock"


def _lock_holder(handle) -> str:
    handle.seek(0)
    pid = handle.read().strip()
    return f"pid {pid}" if pid else "another process"


@contextlib.contextmanager
def stage_lock(workdir: Path, stage: str, key: str,
               say: Callable[[str], None] | None = None) -> Iterator[Path]:
    """Hold the exclusive lock of one stage output (``fcntl.flock`` on its lock file).

    Other processes and other threads wait; a nested call in the thread that holds it passes
    straight through (the Prefect task locks before it starts its tracker, then calls
    :func:`stages.run_stage`, which locks again). While waiting it says once (``say``, default
    a log warning) ``<stage>: waiting for <lock file> held by pid N``. The holder writes its
    pid into the file; the lock dies with its process, so a killed run never leaves a stale
    lock behind."""
    path = lock_path(workdir, stage, key)
    held = _held_locks.__dict__.setdefault("paths", set())
    if path in held:
        yield path
        return
    say = say or log.warning
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"{stage}: waiting for {path} held by {_lock_holder(handle)} (a run with the same "
                "config); it continues when that one finishes this stage")
            start = time.monotonic()
            fcntl.flock(handle, fcntl.LOCK_EX)
            say(f"{stage}: got the lock after {time.monotonic() - start:.1f}s")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        held.add(path)
        try:
            yield path
        finally:
            held.discard(path)
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- atomic writes
def _umask() -> int:
    """The process umask, read without changing it where /proc allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _raise_if_disk_full(err: BaseException, path: Path) -> None:
    """A failed write for lack of space becomes :class:`~pipeline.errors.DiskFullError`
    naming ``path``, its directory and the space left."""
    if is_disk_full(err) and not isinstance(err, DiskFullError):
        raise disk_full_error(path) from err


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    The temp name keeps the suffix so libraries that pick a format from it (PIL, numpy)
    behave; on error the temp file is removed and ``path`` is untouched. The file gets the
    mode the umask gives new files (``mkstemp`` alone would make it 0600). A write that fails
    for lack of space (ENOSPC / EDQUOT, also wrapped by a library) raises
    :class:`~pipeline.errors.DiskFullError`: ``no space left on <dir> ... while writing
    <file>; N MB free``.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        tmp_path = Path(tmp)
        try:
            os.fchmod(fd, 0o666 & ~_umask())
        finally:
            os.close(fd)
        yield tmp_path
        os.replace(tmp_path, path)
    except (OSError, RuntimeError) as err:   # RuntimeError: libraries wrapping the OSError
        _raise_if_disk_full(err, path)
        raise
    finally:
        if tmp_path is not None and (tmp_path.exists() or tmp_path.is_symlink()):
            tmp_path.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def is_temp_file(path: Path) -> bool:
    """True for the leftovers of an interrupted :func:`atomic_path` (safe to delete)."""
    return path.name.startswith(".") and ".tmp" in path.name


def clean_temp_files(directory: Path) -> int:
    """Delete temp files a killed run left behind; returns how many."""
    count = 0
    for path in Path(directory).rglob(".*.tmp*"):
        if path.is_file() and is_temp_file(path):
            path.unlink()
            count += 1
    return count


# --------------------------------------------------------------------------- manifests
def write_manifest(directory: Path, manifest: Mapping[str, Any]) -> None:
    atomic_write_json(Path(directory) / MANIFEST, dict(manifest))


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise IncompleteStageError(f"{path} is missing")
    return json.loads(path.read_text())


def mark_complete(directory: Path) -> None:
    """Write the completion marker; call it last, after every file and the manifest."""
    atomic_write_text(Path(directory) / COMPLETE_MARKER, f"{time.time():.3f}\n")


def is_complete(directory: Path) -> bool:
    return (Path(directory) / COMPLETE_MARKER).is_file() and (Path(directory) / MANIFEST).is_file()


def open_stage_output(directory: Path) -> dict[str, Any]:
    """The manifest of a finished stage output; refuses missing or incomplete directories."""
    directory = Path(directory)
    if not directory.is_dir():
        raise IncompleteStageError(f"stage output {directory} does not exist")
    if not is_complete(directory):
        raise IncompleteStageError(
            f"stage output {directory} is incomplete (no {COMPLETE_MARKER} marker): the stage was "
            "interrupted or is still running; rerun it to resume")
    return read_manifest(directory)


def finish_stage(directory: Path, manifest: Mapping[str, Any]) -> None:
    """Write the manifest then the completion marker (in that order)."""
    write_manifest(directory, manifest)
    mark_complete(directory)
