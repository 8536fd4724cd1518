"""Paths and files: say what is at a path, and write files and folders so that nothing a user has is
lost: no half-written file, no clobbered one.

:func:`atomic_write` writes into a temporary file in the target's own folder (so the final
rename never crosses file systems), flushes it to disk, then puts it in place in one step:
``os.replace`` when overwriting is allowed, otherwise a hard link, which fails if another
writer created the name in the meantime. :func:`atomic_write_dir` does the same for a folder
of files (a diffusers model folder). Any failure removes the temporary, leaves an existing
file byte for byte as it was, and every ``OSError`` (disk full, read-only file system,
permission denied, missing folder, ...) becomes a :class:`VAEFTError` that names the path,
the cause and what to do.

Files are created with mode 0o666 and the process umask applies, as for any other file the
user's tools write (``tempfile.mkstemp`` would make them 0600).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import shutil
import stat
import warnings
from typing import BinaryIO, Callable

from .errors import VAEFTError

__all__ = ["FolderLock", "atomic_write", "atomic_write_dir", "check_folder", "describe_os_error", "describe_path",
           "json_safe", "write_json"]


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "a file"), (stat.S_ISDIR, "a folder"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a special file"


def describe_path(path: str | os.PathLike) -> str | None:
    """What is at ``path``, for messages: None when nothing is; else "a file", "a folder", "a named
    pipe (FIFO)", "a socket", "a character device", "a block device", "a broken link (to T)", or
    "a link to <kind> (T)". Only stats, never opens."""
    try:
        lst = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISLNK(lst.st_mode):
        return _kind(lst.st_mode)
    target = os.path.realpath(path)
    try:
        return f"a link to {_kind(os.stat(path).st_mode)} ({target})"
    except OSError:
        return f"a broken link (to {target})"


def check_folder(path: str | os.PathLike, label: str, advice: str) -> None:
    """The one refusal of a path meant as a folder where something else is (a file, a FIFO, a broken
    link): ``<label> is a file, not a folder; <advice>``. Nothing there, or a folder: no error."""
    if os.path.lexists(path) and not os.path.isdir(path):
        raise VAEFTError(f"{label} is {describe_path(path) or 'not a folder'}, not a folder; {advice}")


def json_safe(obj, infinity: str | None = None):
    """``obj`` made fit for strict JSON, recursively (dicts, lists, tuples). The one rule everywhere
    this tool writes JSON: NaN becomes null (JSON has no such number; null says "no number here").
    Infinity becomes null too, or the word ``infinity`` names (``"overflow"`` for activations that
    overflowed), negated with a leading "-"."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        if obj != obj or infinity is None:
            return None
        return infinity if obj > 0 else "-" + infinity
    if isinstance(obj, dict):
        return {k: json_safe(v, infinity) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v, infinity) for v in obj]
    return obj


def write_json(path: str | os.PathLike, obj, *, what: str, indent: int | None = 2) -> str:
    """Atomically write ``obj`` (see :func:`json_safe`) as a JSON file, replacing ``path``."""
    text = json.dumps(json_safe(obj), indent=indent, default=str) + "\n"
    return atomic_write(path, lambda f: f.write(text.encode()), overwrite=True, what=what)

# errno -> what to do about it (the cause itself comes from strerror)
_ADVICE = {
    errno.ENOSPC: "free some space on that disk or choose a folder on another disk",
    errno.EDQUOT: "your disk quota is used up: free some space or choose another folder",
    errno.EROFS: "that file system is read-only: choose a writable folder",
    errno.EACCES: "you may not write there: choose a folder you can write to or fix its permissions",
    errno.EPERM: "you may not write there: choose a folder you can write to or fix its permissions",
    errno.ENOENT: "the folder does not exist (or was removed while writing): create it or choose another",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "that name is a folder: give a file name",
    errno.ENAMETOOLONG: "the name is too long for this file system: choose a shorter one",
    errno.EEXIST: "the name is taken: choose another name or allow overwriting",
    errno.ENOTEMPTY: "the name is taken: choose another name or allow overwriting",
    errno.EIO: "the disk reported an input/output error: check the disk and try again",
}


def describe_os_error(e: OSError, path: str, what: str = "file") -> str:
    """One line for a user: which path, what went wrong, what to do, and that nothing was written."""
    cause = e.strerror or str(e) or type(e).__name__
    advice = _ADVICE.get(e.errno, "check the folder and try again")
    return f"cannot write {what} {path!r}: {cause} [{errno.errorcode.get(e.errno, e.errno)}]; {advice}. " \
           "Nothing was written and no existing file was changed."


def _temp_name(folder: str, name: str, suffix: str) -> str:
    # hidden, and not ending in the target's extension, so model lists (ComfyUI's) never show it;
    # the name is shortened so the temporary fits where the target fits
    return os.path.join(folder, f".{name[:100]}.{secrets.token_hex(6)}{suffix}")


def _check_target(path: str, overwrite: bool, what: str, folder_ok: bool = False) -> str:
    """The target's folder, after refusing what can be refused before writing anything."""
    if not os.path.basename(path):
        raise VAEFTError(f"{what} path {path!r} ends in a separator: give a {'folder' if folder_ok else 'file'} name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VAEFTError(f"cannot write {what} {path!r}: its folder {folder!r} does not exist; create it first "
                         "or choose another folder")
    if not folder_ok and os.path.isdir(path):
        raise VAEFTError(f"cannot write {what} {path!r}: that is a folder; give a file name")
    if folder_ok and os.path.lexists(path) and not os.path.isdir(path):
        raise VAEFTError(f"cannot write {what} {path!r}: a file of that name exists (a folder is written here); "
                         "choose another name")
    if os.path.lexists(path) and not overwrite and not (folder_ok and _is_empty_dir(path)):
        raise VAEFTError(f"{path!r} already exists; choose another name or allow overwriting")
    return folder


def _is_empty_dir(path: str) -> bool:
    try:
        return os.path.isdir(path) and not os.listdir(path)
    except OSError:
        return False


def _fsync_dir(folder: str) -> None:
    """Make a rename durable; best effort (some file systems cannot open or sync a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _link_into_place(tmp: str, path: str) -> bool:
    """Create ``path`` from ``tmp`` only if ``path`` does not exist; True when linked (tmp then
    still exists), False when it was renamed instead (file systems without hard links)."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        raise VAEFTError(f"{path!r} already exists (another writer created it just now); choose another name "
                         "or allow overwriting") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS, errno.EXDEV):
            raise
    # No hard links here (FAT, some network file systems): check, then rename; only a writer racing
    # into this instant could be replaced.
    if os.path.lexists(path):
        raise VAEFTError(f"{path!r} already exists; choose another name or allow overwriting")
    os.rename(tmp, path)
    return False


def atomic_write(path: str | os.PathLike, write_fn: Callable[[BinaryIO], object], *, overwrite: bool = False,
                 what: str = "file") -> str:
    """Create ``path`` with the bytes ``write_fn(f)`` writes to the binary file object ``f``.

    The file appears complete or not at all. Without ``overwrite`` an existing ``path`` is never
    replaced, even by a writer racing this one; with it, the old file stays whole until the new
    one replaces it in one step. ``what`` names the file in messages ("VAE file", "checkpoint").
    Returns ``path`` as given (a str).

    Raises VAEFTError for an existing target (without ``overwrite``), a missing folder, a folder
    where a file should be, and any OSError while writing (the temporary file is removed).
    Exceptions of ``write_fn`` that are not OSErrors propagate unchanged, after the cleanup.
    """
    path = os.fspath(path)
    folder = _check_target(path, overwrite, what)
    tmp = None
    try:
        tmp = _temp_name(folder, os.path.basename(path), ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_CLOEXEC", 0), 0o666)
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        if overwrite:
            os.replace(tmp, path)
            tmp = None
        elif not _link_into_place(tmp, path):
            tmp = None
        _fsync_dir(folder)
    except OSError as e:
        raise VAEFTError(describe_os_error(e, path, what)) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            except OSError:
                pass  # the original error matters more than a leftover hidden temporary
    return path


def atomic_write_dir(path: str | os.PathLike, write_fn: Callable[[str], object], *, overwrite: bool = False,
                     what: str = "folder") -> str:
    """Create the folder ``path`` holding the files ``write_fn(tmp_folder)`` writes into ``tmp_folder``.

    The folder is assembled under a temporary name beside ``path`` (files flushed to disk), then
    renamed into place: it appears complete or not at all. An existing empty folder is replaced;
    a non-empty one only with ``overwrite``, and only if it holds nothing but names the new
    folder also has (so a mistaken path never deletes a user's other files). Same errors as
    :func:`atomic_write`.
    """
    path = os.fspath(path).rstrip("/\\") or os.fspath(path)
    folder = _check_target(path, overwrite, what, folder_ok=True)
    tmp = old = None
    try:
        tmp = _temp_name(folder, os.path.basename(path), ".tmpdir")
        os.mkdir(tmp, 0o777)
        write_fn(tmp)
        names = set(os.listdir(tmp))
        for name in names:
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                fd = os.open(full, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(tmp)
        if os.path.isdir(path) and not _is_empty_dir(path):
            if not overwrite:
                raise VAEFTError(f"{path!r} already exists; choose another name or allow overwriting")
            foreign = sorted(set(os.listdir(path)) - names)
            if foreign:
                raise VAEFTError(f"{path!r} holds other files ({', '.join(foreign[:5])}); it is not replaced. "
                                 "Choose a new folder name or remove those files")
            old = _temp_name(folder, os.path.basename(path), ".old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except OSError:
                os.rename(old, path)  # put the previous folder back
                old = None
                raise
            tmp = None
        else:
            # rename onto a missing name or an empty folder; fails (no clobber) if a racing writer
            # filled the name meanwhile
            try:
                os.rename(tmp, path)
            except OSError as e:
                if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    raise VAEFTError(f"{path!r} already exists (another writer created it just now); choose "
                                     "another name or allow overwriting") from None
                raise
            tmp = None
        _fsync_dir(folder)
    except OSError as e:
        raise VAEFTError(describe_os_error(e, path, what)) from e
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
    return path


class FolderLock:
    """One writer per folder (a run folder) while a process writes it: an advisory lock (``fcntl.flock``)
    on ``<folder>/.lock``, which holds the writer's pid and host. The kernel releases the lock when the
    process ends in any way (a crash, SIGKILL), so a stale lock file never blocks anyone; a second
    writer is refused by name. On platforms without ``fcntl`` (Windows) there is no lock."""

    NAME = ".lock"
    _held: set[int] = set()  # this process's lock descriptors (a forked loader worker closes its copies)

    def __init__(self, folder: str, fd: int | None, created: bool):
        self.folder, self.fd, self.created = folder, fd, created
        if fd is not None:
            FolderLock._held.add(fd)

    @classmethod
    def close_inherited(cls) -> None:
        """In a forked child (a data-loader worker): close the parent's lock descriptors, which share the
        lock, so the lock ends with the writing process and not with the last worker."""
        for fd in list(cls._held):
            try:
                os.close(fd)
            except OSError:
                pass
        cls._held.clear()

    @classmethod
    def acquire(cls, folder: str | os.PathLike, what: str = "run folder") -> "FolderLock":
        folder = os.fspath(folder)
        try:
            import fcntl  # POSIX only: elsewhere a run folder has no lock, and says so
        except ImportError:
            return cls(folder, None, False)
        path = os.path.join(folder, cls.NAME)
        created = not os.path.lexists(path)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as e:
            raise VAEFTError(describe_os_error(e, path, f"the lock of {what}")) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):  # no flock here (some NFS/CIFS)
                os.close(fd)
                if created:
                    try:
                        os.unlink(path)
                    except OSError:
                        pass
                warnings.warn(f"cannot lock {folder} ({e.strerror or e}): running without a lock, so make sure no "
                              f"other process writes this {what}", RuntimeWarning, stacklevel=2)
                return cls(folder, None, False)
            holder = os.read(fd, 200).decode("utf-8", "replace").split()
            os.close(fd)
            who = f"pid {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "another process"
            raise VAEFTError(f"{what} {folder!r} is being written by another process ({who}): two writers would "
                             "log every step twice. Wait for that run to end, or stop it (Ctrl-C, Cancel) and then "
                             "continue it; nothing here was changed") from None
        import socket  # only to name the host holding a lock in the refusal

        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        return cls(folder, fd, created)

    def release(self, forget: bool = False) -> None:
        """Let go of the folder. ``forget``: also remove the lock file if this lock made it (a refused
        start leaves the folder as it found it)."""
        if self.fd is None:
            return
        if forget and self.created:
            try:
                os.unlink(os.path.join(self.folder, self.NAME))
            except OSError:
                pass
        FolderLock._held.discard(self.fd)
        os.close(self.fd)  # closing the only descriptor releases the flock
        self.fd = None


def last_component(path: str) -> str:
    """The last part of a path written on any system (``C:\\a\\b.safetensors`` or ``/a/b``): a file or folder name."""
    parts = [p for p in re.split(r"[\\/]+", path) if p and not re.fullmatch(r"[A-Za-z]:", p)]
    return parts[-1] if parts else ""
