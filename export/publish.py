"""Where an export writes: the `--out` slot, locked for the whole export and published atomically.

Rules (issue 11, finding 4 and 10):
  * One export per `--out` at a time: a lock file beside it (`.NAME.export-lock`, flock, released by the
    kernel even on kill -9) makes a second export to the same path refuse at once.
  * `--force` replaces only a bundle (a directory with a specreason manifest), and only the one checked at the
    start: if `--out` appears or changes during the export, nothing is replaced and the export fails.
  * The bundle is built in a temporary sibling (`.NAME.tmp-XXXX`, marked by a file inside) and published by
    one atomic rename: renameat2(RENAME_NOREPLACE) for a new path, renameat2(RENAME_EXCHANGE) to replace a
    bundle, so a crash at any point leaves the old or the new bundle at `--out`, never neither. Where the
    system has no renameat2, two renames are used and the next export restores a left-over old bundle.
  * Temporary and old directories of earlier, killed exports to the same path are removed at the start (the
    lock proves no export is using them); SIGTERM and SIGHUP clean up like Ctrl-C (`interrupts_clean_up`).
  * Writability is checked before any model is loaded: the temporary directory is created first.
  * The bundle gets the umask's normal permissions (mkdtemp's 0700 would hide it from a service user).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, TracebackType

from .errors import ExportError

TEMP_MARK = ".specreason-export-tmp"  # inside a temporary bundle: this directory is ours to delete
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """rename(2) with flags; False when this system or file system lacks it (the caller falls back)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def is_bundle(path: Path) -> bool:
    """A directory whose manifest.json says it is a specreason bundle (what --force may replace)."""
    manifest = path / "manifest.json"
    if not path.is_dir() or path.is_symlink() or not manifest.is_file():
        return False
    try:
        with open(manifest, "rb") as f:
            head = f.read(4096).decode("utf-8", "replace")
    except OSError:
        return False
    return '"schema": "specreason-bundle"' in head or '"schema":"specreason-bundle"' in head


def _identity(path: Path) -> tuple[int, ...] | None:
    """What was checked at the start: the directory and its manifest, as the file system names them."""
    try:
        d, m = path.stat(follow_symlinks=False), (path / "manifest.json").stat()
    except OSError:
        return None
    # ctime cannot be set by anyone (a copy keeps size and mtime, and a freed inode number is often reused).
    return (d.st_dev, d.st_ino, d.st_ctime_ns, m.st_ino, m.st_size, m.st_mtime_ns, m.st_ctime_ns)


class OutputSlot:
    """The `--out` of one export (see the module docstring). Use as a context manager:

        with OutputSlot(out=..., force=...) as slot:   # lock, checks, stale clean-up, temp dir
            ... write into slot.tmp ...
            slot.publish()                            # atomic; nothing is left behind on any failure
    """

    def __init__(self, *, out: Path, force: bool) -> None:
        self.out = out.expanduser().absolute()
        self.force = force
        self.tmp = Path()
        self._lock_fd: int | None = None
        self._lock_path = self.out.parent / f".{self.out.name}.export-lock"
        self._checked: tuple[int, ...] | None = None

    def __enter__(self) -> OutputSlot:
        parent = self.out.parent
        if not parent.is_dir():
            raise ExportError(f"{parent} does not exist; create it or choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ExportError(f"{parent} is not writable; choose another --out")
        try:
            self._lock()
            self._clean_stale()
            self._check_out()
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-", dir=parent))
            (self.tmp / TEMP_MARK).write_text(json.dumps({"pid": os.getpid(), "out": str(self.out)}) + "\n")
            self.tmp.chmod(0o777 & ~_umask())
        except OSError as e:
            self.__exit__(None, None, None)
            raise ExportError(f"cannot write to {parent} ({e.strerror or e}); choose another --out") from e
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.tmp != Path() and (self.tmp / TEMP_MARK).exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
        if self._lock_fd is not None:
            # Unlink while holding the lock: a waiter that opened the old file sees it is gone and retries.
            with contextlib.suppress(OSError):
                self._lock_path.unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    def _lock(self) -> None:
        while True:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise ExportError(f"another specreason-export (pid {holder}) is writing {self.out}; wait for it "
                                  "or choose another --out") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self._lock_path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
                self._lock_fd = fd
                return
            os.close(fd)  # the holder removed it between our open and flock: take the new one

    def _check_out(self) -> None:
        if not os.path.lexists(self.out):
            return
        if not self.force:
            raise ExportError(f"{self.out} already exists; pass --force to replace it or choose another --out")
        if not is_bundle(self.out):
            raise ExportError(f"{self.out} exists and is not a specreason bundle (no manifest.json of one): --force "
                              "only replaces a bundle; remove it yourself or choose another --out")
        self._checked = _identity(self.out)

    def _clean_stale(self) -> None:
        """Remove what killed exports to this --out left behind; restore an old bundle a crash left aside."""
        parent, name = self.out.parent, self.out.name
        for old in sorted(parent.glob(f".{name}.old-*")):
            if is_bundle(old) and not os.path.lexists(self.out):
                os.rename(old, self.out)  # the crash came between the two renames of the fallback: undo it
            elif is_bundle(old):
                shutil.rmtree(old, ignore_errors=True)
        for tmp in parent.glob(f".{name}.tmp-*"):
            if tmp.is_dir() and not tmp.is_symlink() and (tmp / TEMP_MARK).is_file():
                shutil.rmtree(tmp, ignore_errors=True)

    def publish(self) -> None:
        """Move the finished bundle to --out atomically (see the module docstring)."""
        (self.tmp / TEMP_MARK).unlink()
        exists = os.path.lexists(self.out)
        changed = exists if self._checked is None else _identity(self.out) != self._checked
        if changed:
            (self.tmp / TEMP_MARK).write_text("")  # still ours: cleaned up on exit
            raise ExportError(f"{self.out} was created or changed by someone else during the export; nothing was "
                              "replaced and no bundle was written. Export again")
        try:
            if not exists:
                if not _renameat2(self.tmp, self.out, _RENAME_NOREPLACE):
                    os.rename(self.tmp, self.out)
            elif _renameat2(self.tmp, self.out, _RENAME_EXCHANGE):
                shutil.rmtree(self.tmp, ignore_errors=True)  # it now holds the old bundle
            else:
                old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
                os.rename(self.out, old)
                os.rename(self.tmp, self.out)
                shutil.rmtree(old, ignore_errors=True)
        except FileExistsError as e:
            (self.tmp / TEMP_MARK).write_text("")  # still ours: removed on exit
            raise ExportError(f"{self.out} was created by someone else during the export; nothing was replaced "
                              "and no bundle was written. Export again") from e
        except BaseException:
            if self.tmp.is_dir():
                (self.tmp / TEMP_MARK).write_text("")
            raise


@contextlib.contextmanager
def interrupts_clean_up() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt like Ctrl-C, so clean-up code runs."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
