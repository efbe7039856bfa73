"""Self-describing run folders: atomic writes, safe loading, one writer per folder, provenance.

Everything a run folder holds is data, never code: checkpoints and stage files are loaded with
``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, dicts), so a crafted file is
refused instead of executed. A damaged file gives one line naming it and what to do (UserError).
A folder being written is locked (``fcntl.flock`` on ``DIR/.lock``); the operating system drops the
lock when its holder dies, so a killed run never blocks its own resume.

Nothing is written through a link: the lock is opened with ``O_NOFOLLOW``, and a run folder's entries
(and the files written inside them) that are symbolic links or not regular files/folders are refused with one line
(:func:`require_regular`). What a run folder holds, and ``--overwrite``: :mod:`ssl_bench.run_folder`.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import glob
import json
import os
import pickle
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from . import __version__
from .errors import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and rename: readers never see a partial file."""
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _write_error(exc: BaseException) -> OSError | None:
    """The OSError behind a failed write (torch wraps its file writer's errors in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class WriteError(UserError):
    """A write that failed (a full disk, a quota, a read-only folder); the file it was to replace is unchanged."""

    def __init__(self, path: Path, cause: OSError):
        self.path, self.reason = Path(path), cause.strerror or str(cause)
        super().__init__(f"cannot write {path} ({self.reason}); the file was not changed: free space (or fix the "
                         f"file system) and try again")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: a process of another user holds that pid
        return True
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Remove what a killed writer of ``path`` left beside it: ``.NAME.PID.*`` temporary files (regular files
    only, never through a link) whose process no longer runs. A live writer's file is never touched."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.[^/]*")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        m = pattern.fullmatch(leftover.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            try:
                if stat.S_ISREG(os.lstat(leftover).st_mode):
                    leftover.unlink()
            except OSError:
                pass  # gone meanwhile, or not ours to remove: the write itself goes on


def atomic_write(path: Path, write, replace: bool = True) -> str | None:
    """``write(tmp_path)`` into a temporary file beside ``path`` (same suffix), then rename it over ``path``.

    A failing write (a full disk, a quota) removes the temporary file, leaves ``path`` as it was and
    raises a UserError saying so. With ``replace=False`` the written temporary file is returned
    instead of renamed (the caller renames it; see :func:`save_checkpoint`).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=path.suffix, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        write(tmp)
        if not replace:
            return tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = _write_error(exc)
        if cause is not None and not isinstance(exc, UserError):
            raise WriteError(path, cause) from None
        raise
    _fsync_dir(path.parent)
    return None


def _torch_save_synced(obj, tmp: str) -> None:
    import torch

    with open(tmp, "wb") as f:  # a Python file: a failing write surfaces as an OSError (errno), not a bare torch error
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_torch_save(obj, path: Path) -> None:
    """A checkpoint or stage file, written atomically; its folder (checkpoints/, stages/) and the file it replaces
    must be the run folder's own (a symbolic link there would put the file elsewhere): see :func:`require_regular`."""
    path = Path(path)
    require_regular(path.parent, folder=True)
    require_regular(path)
    atomic_write(path, lambda tmp: _torch_save_synced(obj, tmp))


#: the checkpoint generations of a run in progress: the newest, and the one before it
LAST, PREVIOUS = "last.pt", "previous.pt"


def save_checkpoint(obj, folder: Path) -> None:
    """Write ``folder/last.pt``, keeping the checkpoint it replaces as ``folder/previous.pt``.

    The new file is written and synced completely before anything is renamed, so a failing write
    leaves both generations as they were. ``last.pt`` is never absent: the old one is linked to
    ``previous.pt`` before the new one replaces it atomically.
    """
    folder = Path(folder)
    last = folder / LAST
    for path in (folder, last, folder / PREVIOUS):
        require_regular(path, folder=path == folder)
    try:
        tmp = atomic_write(last, lambda t: _torch_save_synced(obj, t), replace=False)
    except WriteError as exc:
        kept = "the previous checkpoint is intact" if last.is_file() else "nothing was changed"
        raise UserError(f"checkpoint not written: cannot write {last} ({exc.reason}); {kept}: free space (or fix "
                        f"the file system) and continue with --resume") from None
    remove_stale_temporaries(folder / PREVIOUS)
    keep = folder / f".{PREVIOUS}.{os.getpid()}.tmp"
    try:
        if last.is_file():
            # previous.pt becomes the old last.pt through a second name (a hard link, else a copy), so
            # last.pt exists at every moment: a kill anywhere here leaves a loadable last.pt
            try:
                os.link(last, keep)
            except OSError:
                shutil.copy2(last, keep)
            os.replace(keep, folder / PREVIOUS)
        os.replace(tmp, last)
    except OSError as exc:
        for leftover in (tmp, keep):
            if os.path.exists(leftover):
                os.unlink(leftover)
        raise UserError(f"checkpoint not written: cannot rename in {folder} ({exc.strerror or exc}); fix the "
                        f"file system and continue with --resume") from None
    _fsync_dir(folder)


class DamagedFileError(UserError):
    """A checkpoint or stage file that cannot be read (truncated, corrupt, missing, not what it should hold)."""

    def __init__(self, path: Path, reason: str, what_to_do: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path} is damaged ({reason}); {what_to_do}")


class UnsafeFileError(UserError):
    """A checkpoint or stage file that asks to run code when loaded; refused, never a reason to fall back."""


def load_torch(path: Path, what_to_do: str, kind: str = "file") -> dict:
    """``torch.load(weights_only=True)`` of a checkpoint or stage file: a dict of plain data, or one UserError.

    Never runs code from the file: a pickle asking for anything but tensors, numbers, strings, lists
    and dicts is refused. A truncated or corrupt file names itself and ``what_to_do``.
    """
    import torch

    path = Path(path)
    try:
        with warnings.catch_warnings():  # torch's own warnings never reach the user's stderr
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        # what the weights-only unpickler refuses because it would import or call something (not mere damage)
        found = re.search(r"(?:Unsupported global|unsupported GLOBAL|Trying to call reduce|Can only create new object"
                          r"|Can only build)[^\n]*", text)
        if found:
            detail = re.sub(r" (?:was not an allowed global|whose module).*", "", found.group(0))
            detail = detail.replace("GLOBAL ", "").replace("Trying to load ", "")
            raise UnsafeFileError(f"refusing to load {path}: it is not a plain {kind} ({detail}) and loading it "
                                  f"could run code; only open run folders from trusted sources, and {what_to_do}") from None
        _refuse_code_pickle(path, kind, what_to_do)
        raise _damaged(path, exc, what_to_do) from None
    except Exception as exc:  # truncated zip, bad magic number, EOF, I/O error, ...
        _refuse_code_pickle(path, kind, what_to_do)
        raise _damaged(path, exc, what_to_do) from None
    if not isinstance(obj, dict):
        raise DamagedFileError(path, f"it holds a {type(obj).__name__}, not a {kind}", what_to_do)
    return obj


#: pickle opcodes that import or call something: a file holding one would run code if unpickled
_CODE_OPCODES = {"GLOBAL", "STACK_GLOBAL", "REDUCE", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "BUILD", "EXT1", "EXT2",
                 "EXT4"}


def _refuse_code_pickle(path: Path, kind: str, what_to_do: str) -> None:
    """A bare pickle (any protocol; torch's own files are zip archives) that imports or calls something is refused as
    such, never taken for a damaged file (which would fall back to previous.pt). Read with pickletools: nothing runs."""
    import pickletools

    try:
        with open(path, "rb") as f:
            head = f.read(2)
            if len(head) < 2 or head[0] != 0x80:
                return
            f.seek(0)
            for op, _, _ in pickletools.genops(f):
                if op.name in _CODE_OPCODES:
                    raise UnsafeFileError(f"refusing to load {path}: it is not a plain {kind} (a pickle that uses "
                                          f"{op.name}) and loading it could run code; only open run folders from "
                                          f"trusted sources, and {what_to_do}")
    except UnsafeFileError:
        raise
    except Exception:  # noqa: BLE001 - unreadable as a pickle: damaged, said by the caller
        return


def _damaged(path: Path, exc: BaseException, what_to_do: str) -> UserError:
    if isinstance(exc, FileNotFoundError):
        return UserError(f"missing file: {path}; {what_to_do}")
    text = str(exc)
    inner = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # torch's own words come after its advice
    reason = inner.group(1) if inner else (text.strip().splitlines()[0] if text.strip() else type(exc).__name__)
    reason = reason.split(". ")[0].rstrip(".")  # torch's first sentence; the rest is advice for its developers
    return DamagedFileError(path, f"truncated or corrupt: {reason[:160]}", what_to_do)


def atomic_savefig(fig, path: Path, dpi: int = 150) -> None:
    """A matplotlib figure in the format of ``path``'s suffix (png, pdf), written atomically."""
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=dpi, bbox_inches="tight"))


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: Path, what_to_do: str | None = None, keys: tuple[str, ...] | None = None):
    """A JSON file; a missing or damaged one is one UserError naming it and what to do. ``keys``: the sections
    (JSON objects) it must have, or None for any JSON value (a run folder's files: ssl_bench.run_folder)."""
    path = Path(path)
    hint = what_to_do or "restore it from a copy or re-create it"
    if not path.is_file():
        raise UserError(f"missing file: {path}")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "not UTF-8 text"
        raise UserError(f"{path} is damaged (not valid JSON: {reason}); {hint}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path} ({exc.strerror or exc}); {hint}") from None
    if keys is not None:
        if not isinstance(obj, dict):
            raise UserError(f"{path} is damaged (a JSON {type(obj).__name__}, not an object); {hint}")
        missing = [k for k in keys if not isinstance(obj.get(k), dict)]
        if missing:
            raise UserError(f"{path} is damaged (no {missing[0]!r} section); {hint}")
    return obj


def git_commit() -> dict:
    """The project's commit and whether the work tree differed from it (None outside a git checkout)."""
    def _git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
    try:
        head = _git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = _git("status", "--porcelain", "--untracked-files=no")
        return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def provenance() -> dict:
    import h5py
    import numpy
    import torch

    try:
        import medpy
        medpy_version = getattr(medpy, "__version__", None)
        if medpy_version is None:
            from importlib.metadata import version
            medpy_version = version("medpy")
    except Exception:
        medpy_version = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "ssl_bench": __version__,
        "git": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": gpu,
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "medpy": medpy_version,
        "platform": platform.platform(),
        "host": platform.node(),
        "cpu_threads": torch.get_num_threads(),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------- own entries only

def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def require_regular(path: Path, folder: bool = False, reading: bool = False) -> Path:
    """``path`` as a run-folder entry ssl-bench may write (``reading``: or read): absent, or a regular file
    (``folder``: a real folder).

    A symbolic link (even a dangling one) or anything else (a pipe, a device, a folder where a file belongs)
    is refused with one UserError naming it: writing through it could change or create a file outside
    the run folder, and reading through it would take a file from elsewhere as the run's own.
    """
    path = Path(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return path
    except OSError as exc:
        raise UserError(f"cannot inspect {path} ({exc.strerror or exc})") from None
    wanted = "folder" if folder else "file"
    if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) if folder else stat.S_ISREG(mode)):
        why = ("reading through it would take what is elsewhere as this run's own" if reading else
               "writing through it could change files outside the run folder")
        raise UserError(f"refusing to use {path}: it is {_kind(mode)}, not a regular {wanted}, and {why}; move it "
                        f"away (or put the {wanted} itself there)")
    return path


def open_append(path: Path):
    """``open(path, "a")`` for a run folder's own file: never through a symbolic link (a dangling one would create
    its target), never a pipe or device; one UserError naming the path otherwise."""
    path = require_regular(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link since the check
            require_regular(path)
        raise WriteError(path, exc) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UserError(f"refusing to use {path}: it is {_kind(mode)}, not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")


# ---------------------------------------------------------------------------------- one writer

LOCK_NAME = ".lock"


class FolderLock:
    """An exclusive ``flock`` on ``FOLDER/.lock`` (released on exit, or by the OS when the process dies)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is not None:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            finally:
                os.close(self.fd)
                self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _busy(folder: Path, path: Path, busy: str | None = None) -> UserError:
    try:
        holder = path.read_text().strip().splitlines()[0]
    except (OSError, IndexError, UnicodeDecodeError):
        holder = "holder unknown"
    busy = busy or f"{folder} is being written by another process"
    return UserError(f"{busy} ({holder}); wait for it to finish or stop it, then try again")


def lock_folder(folder: Path, name: str = LOCK_NAME, busy: str | None = None) -> FolderLock:
    """Take the one-writer lock of ``folder`` (which must exist), or raise a UserError if a live process holds it.

    ``busy`` words the refusal (default: "FOLDER is being written by another process").
    """
    folder = Path(folder)
    path = require_regular(folder / name)
    try:  # never through a link (O_NOFOLLOW), never blocking on a pipe (O_NONBLOCK)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # became a link since the check
            require_regular(path)
        raise UserError(f"cannot create the lock file {path} ({exc.strerror or exc}); the folder must be writable") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UserError(f"refusing to use {path}: it is {_kind(st.st_mode)}, not a regular file")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(folder, path, busy) from None
        raise UserError(f"cannot lock {path} ({exc.strerror or exc}); this file system does not support "
                        f"locks, so ssl-bench cannot make sure that one process writes the folder") from None
    if st.st_nlink != 1 or st.st_uid != os.geteuid():
        return FolderLock(fd, path)  # another name of the file, or not ours: the lock, but no note written into it
    try:
        os.ftruncate(fd, 0)
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {platform.node()} since {stamp}\n".encode())
    except OSError:
        pass  # the note is informative only; the lock is what counts
    return FolderLock(fd, path)


def refuse_if_locked(folder: Path, name: str = LOCK_NAME) -> None:
    """Raise the "being written" UserError if a live process holds ``folder``'s lock; never creates a file."""
    path = Path(folder) / name
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise _busy(Path(folder), path) from None
    finally:
        os.close(fd)  # closing drops a lock taken here
