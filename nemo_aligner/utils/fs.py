"""Atomic file-system helpers: write into a temporary sibling, then rename, so readers never see half a file.

Durability: every file and directory of the new copy is ``fsync``-ed *before* the rename, and the parent directory
after it, so a power loss leaves either the old copy or the complete new one, never a renamed but empty one.
Permissions: ``tempfile`` creates 0700 directories and 0600 files; :func:`make_readable` gives the finished copy the
permissions a plain ``mkdir``/``open`` would have under the process umask (e.g. 0755/0644 for umask 022).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


#: The OS errors of a write that say the disk (not the data) is at fault, with the reason a message gives.
DISK_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}

#: Below this many free bytes a failed write is put down to a full disk (e.g. ``torch.save``'s ``RuntimeError``, which
#: loses the ``ENOSPC`` of the write it wraps).
NEARLY_FULL_BYTES = 1 << 20


def disk_problem(err: BaseException, directory: str | os.PathLike) -> str | None:
    """Why a write under ``directory`` that raised ``err`` failed, when the disk is at fault, else None.

    The disk is at fault when ``err`` or an exception it was raised from (``__cause__``/``__context__``, e.g. a
    library's wrapper) is an ``OSError`` whose errno is in :data:`DISK_ERRNOS` and whose file (if it names one) lies
    under ``directory``; or, for any other error, when the file system of ``directory`` (or its nearest existing
    parent) is now mounted read-only or has less than :data:`NEARLY_FULL_BYTES` free.

    Returns:
        e.g. ``"no space left on the device (errno 28)"``, or None.
    """
    root = os.path.abspath(directory)
    seen, todo = set(), [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_ERRNOS:
            names = [os.path.abspath(os.fsdecode(n)) for n in (current.filename, current.filename2) if n is not None]
            if not names or any(n == root or n.startswith(root + os.sep) for n in names):
                return f"{DISK_ERRNOS[current.errno]} (errno {current.errno})"
            return None  # e.g. a data file this process may not read: not the disk being written
        todo += [current.__cause__, current.__context__]
    where = Path(directory)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        stat = os.statvfs(where)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return f"read-only file system (errno {errno.EROFS})"
    if stat.f_bavail * stat.f_frsize < NEARLY_FULL_BYTES:
        return f"no space left on the device (errno {errno.ENOSPC})"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(directory: str | os.PathLike) -> None:
    """Give ``directory``, everything below it, ordinary permissions: ``0777 & ~umask`` for directories and
    ``0666 & ~umask`` for files (``mkdtemp`` / ``mkstemp`` / safetensors create 0700 / 0600 entries that other users
    cannot read). Symbolic links are left alone."""
    mask = _umask()
    root = Path(directory)
    root.chmod(0o777 & ~mask)
    for parent, dirs, files in os.walk(root):
        for name in dirs:
            path = Path(parent) / name
            if not path.is_symlink():
                path.chmod(0o777 & ~mask)
        for name in files:
            path = Path(parent) / name
            if not path.is_symlink():
                path.chmod(0o666 & ~mask)


def fsync_dir(directory: str | os.PathLike) -> None:
    """``fsync`` a directory, making the entries created, renamed or removed in it durable (no-op where the platform
    cannot open directories)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """``fsync`` a file, or every file and directory below (and including) a directory, deepest first."""
    path = Path(path)
    if not path.is_dir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for parent, dirs, files in os.walk(path, topdown=False):
        for name in files:
            file = Path(parent) / name
            if not file.is_symlink():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        fsync_dir(parent)


@contextlib.contextmanager
def atomic_directory(final_path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory next to ``final_path``; on success rename it to ``final_path``.

    If the body raises, the temporary directory is removed and ``final_path`` is untouched. With ``overwrite`` an
    existing ``final_path`` is replaced only after the new directory is complete (rename old aside, rename new in,
    delete old), so at every instant one complete copy exists. Before the rename the new directory gets ordinary
    permissions (:func:`make_readable`) and is ``fsync``-ed.

    Raises:
        FileExistsError: ``final_path`` exists and ``overwrite`` is False.
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists")
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        make_readable(tmp)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``; the file gets ``0666 & ~umask``
    permissions and is ``fsync``-ed before the rename, its directory after it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
