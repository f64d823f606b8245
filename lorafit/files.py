"""Filesystem rules shared by every writer (adapters, checkpoints, merged models, run folders).

Three guarantees live here:
- a folder is replaced so that at every instant the old or the new one is complete on disk
  (``atomic_dir``: write aside, rename the old aside, move the new in, then delete the old);
- a write that fails for a reason of the machine (disk full, read-only, permission) becomes one
  ``LorafitError`` naming the path, and leaves nothing half-written (``write_failure``);
- one process at a time writes a run folder (``FolderLock``: an flock held for the life of the run,
  released by the kernel when the process dies, so a stale lock file never blocks anyone).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lorafit.errors import LorafitError

# errno values that say "this machine cannot take the write", not "lorafit has a bug".
_MACHINE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                   errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                   errno.EPERM: "the operation is not permitted", errno.EFBIG: "the file is too large"}
_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def machine_write_problem(err: BaseException) -> str | None:
    """Why a write failed and what to do, when the reason is the machine (disk full, read-only, ...); else None.

    safetensors reports a failed write as a SafetensorError whose text ends in "(os error N)"; that N counts.
    (lorafit writes torch.save state through a plain file write, so it arrives as an OSError.)
    """
    code = err.errno if isinstance(err, OSError) else None
    if code is None and (found := re.search(r"\(os error (\d+)\)", str(err))):
        code = int(found.group(1))
    if code not in _MACHINE_ERRNOS:
        return None
    fix = "free disk space there" if code in _SPACE_ERRNOS else "choose a folder you can write to"
    return f"{_MACHINE_ERRNOS[code]} ({os.strerror(code)}). Fix: {fix}, then run the command again"


def write_bytes(path: Path, data: bytes) -> None:
    """Write a whole file with a plain write, so that a full disk is an OSError naming the file (torch.save
    to a path reports it only as an opaque C++ stream error)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


@contextmanager
def write_failure(target: Path, what: str, kept: str = "") -> Iterator[None]:
    """Turn a failed write of ``target`` (disk full, read-only, permission) into one LorafitError.

    ``kept`` says what is still intact, e.g. "the previous checkpoint step-000020 is intact".
    """
    try:
        yield
    except LorafitError:
        raise
    except Exception as err:
        problem = machine_write_problem(err)
        if problem is None:
            raise
        after = f" ({kept})" if kept else ""
        raise LorafitError(f"could not write {what} {target}{after}: {problem}") from None


def write_text_atomic(path: Path, text: str) -> None:
    """Replace a small text file whole (temp file beside it, then rename): never a half-written one."""
    with write_failure(path, "the file"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def aside_path(final: Path) -> Path:
    """Where ``atomic_dir`` keeps the previous ``final`` while the new one is moved in."""
    return final.parent / f".{final.name}.previous"


def restore_interrupted_replace(final: Path) -> str | None:
    """Finish a replace of ``final`` that a kill interrupted; returns what was done, if anything.

    Killed after the old folder was renamed aside but before the new one moved in: ``final`` is missing
    and the aside is the complete old folder, so it goes back. Killed after the new one moved in: the
    aside is only the old folder waiting to be deleted.
    """
    aside = aside_path(final)
    if not aside.is_dir():
        return None
    if final.exists():
        shutil.rmtree(aside)
        return f"removed {aside}, left by an interrupted replace of {final} (the new one was complete)"
    os.replace(aside, final)
    return f"restored {final} from {aside}: a replace of it was interrupted before the new one was in place"


@contextmanager
def atomic_dir(final: Path, what: str = "folder", kept: str | None = None) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final``; on success it replaces ``final``, on error it vanishes.

    Replacing is rename-aside: the old ``final`` -> ``.final.previous``, the new one -> ``final``, then the old
    is deleted. At every instant the old or the new folder is complete on disk; a kill between the two
    renames is undone by ``restore_interrupted_replace`` (called here first, and by readers that care).
    """
    restore_interrupted_replace(final)
    if kept is None:
        kept = f"the previous {final} is intact" if final.exists() else "nothing was left behind"
    with write_failure(final, what, kept):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        with write_failure(final, what, kept):
            yield tmp
            _default_permissions(tmp)
        aside = aside_path(final)
        if final.exists():
            os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tidy_after_kill(folder: Path, name: str = "*") -> list[str]:
    """Undo what killed writers of ``folder/name`` left: finish interrupted replaces, delete temp folders.
    Only call while holding the lock on what is written (no live writer can own them then)."""
    if not folder.is_dir():
        return []
    done = []
    for aside in folder.glob(f".{name}.previous"):
        done.append(restore_interrupted_replace(folder / aside.name[1:].removesuffix(".previous")))
    for temp in folder.glob(f".{name}.tmp-*"):
        shutil.rmtree(temp, ignore_errors=True)
        done.append(f"removed {temp}, a half-written folder left by a killed run")
    return [line for line in done if line]


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder and some writers make 0600 files; give the result the
    permissions any new file of this user would get (umask), so a merged model can be shared."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def local_paths(candidates: dict[str, str | Path | None]) -> dict[str, Path]:
    """Those of ``candidates`` (label -> path, hub id or package spec) that exist on this machine: the
    inputs an output must never replace."""
    return {label: Path(value) for label, value in candidates.items() if value and Path(value).exists()}


def refuse_overlap(out: Path, option: str, inputs: dict[str, Path]) -> None:
    """``out`` will be replaced whole: refuse it when it is, lies inside, or contains one of ``inputs``."""
    target = out.expanduser().resolve()
    for label, path in inputs.items():
        source = path.expanduser().resolve()
        relation = ("is" if target == source else "lies inside" if source in target.parents
                    else "contains" if target in source.parents else None)
        if relation:
            raise LorafitError(f"{option} {out} {relation} {label} ({path}): lorafit never writes over its inputs "
                               f"(not even with --overwrite). Choose another {option}")


class ExclusiveLock:
    """An exclusive, non-blocking lock held for the life of a command: an ``flock`` on ``path``.

    The kernel drops an flock when its holder exits or is killed, so a lock file left by a dead process is
    stale by construction and simply taken over. The file's text (pid, host, start time) only names the
    holder in the message. ``busy`` is the message's start, e.g. "output.dir runs/x is in use".
    """

    def __init__(self, path: Path, busy: str, fix: str):
        self.path, self.busy, self.fix = path, busy, fix
        self._fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        with write_failure(self.path, "the lock file"):
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read_holder(self.path)
                    os.close(fd)
                    raise LorafitError(f"{self.busy} by another lorafit command ({holder}); {self.fix}") from None
                # The previous holder may have deleted the file between our open and our lock: retry then.
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter that opened it sees a new inode
            os.close(self._fd)
            self._fd = None


class FolderLock(ExclusiveLock):
    """A run folder locked for the life of a run: ``OUT/.lorafit.lock``. A folder this lock had to create
    is removed again if the run left nothing in it."""

    NAME = ".lorafit.lock"

    def __init__(self, folder: Path):
        super().__init__(folder / self.NAME, f"output.dir {folder} is in use",
                         "wait for it to finish, stop it, or choose another output.dir")
        self.folder = folder
        self.created_folder = False

    def __enter__(self) -> FolderLock:
        with write_failure(self.folder, "the run folder"):
            self.created_folder = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        if self.created_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()


def replace_lock(final: Path, option: str) -> ExclusiveLock:
    """A lock beside ``final`` (``.final.lock``) for a command that replaces it whole, such as merge."""
    return ExclusiveLock(final.parent / f".{final.name}.lock", f"{option} {final} is being written",
                         f"wait for it to finish, or choose another {option}")


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "holder unknown"
