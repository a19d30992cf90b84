"""Errors the ``wsss`` command reports as one line instead of a traceback.

* :class:`InputError` — bad input the user can fix (a dataset file, a map file, a stage-3
  input...). Each module keeps its own subclass (``DatasetError``, ``MapFileError``,
  ``CRFInputError``, ...) with a message naming the file and what is wrong; the CLI prints
  it and exits 2, like a config error.
* :class:`DiskFullError` — a write failed for lack of space; the message names the file,
  the directory and the space left (:func:`disk_full_error` builds it).

Only the standard library: the CLI imports this before torch.
"""

import errno
import shutil
from pathlib import Path

NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})


class InputError(ValueError):
    """Bad user input; the message names the file, id or field and what is wrong."""


class DiskFullError(OSError):
    """No space left while writing a file; ``str()`` is the whole one-line message."""

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(err: BaseException) -> bool:
    """True for an OSError meaning "no space left" (ENOSPC, or EDQUOT: quota exceeded), also
    when it is the cause or context of ``err`` (libraries that wrap it)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE_ERRNOS:
            return True
        err = err.__cause__ or err.__context__
    return False


def free_mb(directory: Path) -> float:
    """Free space (MB) of the file system holding ``directory`` (its nearest existing parent)."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    try:
        return shutil.disk_usage(directory).free / 2**20
    except OSError:
        return float("nan")


def mount_point(directory: Path) -> Path:
    """The mount point of the file system holding ``directory``."""
    directory = Path(directory).absolute()
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    while not directory.is_mount() and directory != directory.parent:
        directory = directory.parent
    return directory


def disk_full_error(path: Path) -> DiskFullError:
    """``no space left on <dir> (file system <mount>) while writing <file>; N MB free``."""
    path = Path(path)
    return DiskFullError(errno.ENOSPC, f"no space left on {path.parent} (file system "
                                       f"{mount_point(path.parent)}) while writing {path.name}; "
                                       f"{free_mb(path.parent):.0f} MB free")
