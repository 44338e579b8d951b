"""How outputs reach the disk: atomic files, a locked output folder, a set published whole.

**Files.** ``atomic_path`` and the ``write_*`` helpers write to a hidden temporary name beside
the target (``.NAME.XXXX.gif-tmp``), flush it to disk and rename it onto the target, so a reader
finds the old file or the new one, complete. Every file gets the permissions the process umask
allows (``0o666 & ~umask``), like a file any other program creates.

**Output folders.** An edit owns its ``output.dir`` and publishes it as one set of files:

1. ``claim_output_dir`` locks the folder for the whole run: ``DIR.lock`` beside it, held with
   ``flock(2)`` and holding the pid. A second run on the same folder fails at once, naming the
   lock file. The kernel drops the lock of a process that dies, so a lock file a killed run
   left behind is taken over, with a note.
2. Under the lock, leftovers of a killed run beside the folder are removed; if the folder is
   missing while a set moved aside by a killed publish is there, that set is put back.
3. Before any work: a folder that exists and is not empty is refused without ``--force``; with
   it, a folder holding anything but regular files under the output names is refused too (the
   folder is replaced as a whole, so gif never replaces a folder holding other things).
4. ``OutputDir.stage()`` gives a staging folder beside it (``.DIR.gif-staging-PID``, the same
   filesystem); the caller writes every file there. On success the files and the folder are
   flushed to disk and the staging folder takes the output folder's place.

**The guarantee.** On Linux (``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs and most
local filesystems) the two folders are exchanged in one atomic step: a reader sees the complete
old set or the complete new set, never a mix and never nothing, even across a crash. Elsewhere
(macOS, NFS, other filesystems) the publish is two renames, the old folder moved aside to
``.DIR.gif-old-PID`` and the staging folder moved in: for the instant between them the folder is
missing, and a run killed exactly there leaves it missing until the next run on the folder puts
the old set back. Limits on both: a reader that opened a file or the folder before the publish
keeps reading the old one; a run on another machine is locked out only where the filesystem
honours ``flock`` (local filesystems and NFS on Linux do).

**Signals.** While an output folder or file set is claimed, SIGTERM raises ``Interrupted`` like
Ctrl-C does, so every clean-up runs; during the renames of a publish SIGINT and SIGTERM are held
back and raised right after it, so an interrupt never lands between two renames. ``outcome()``
says what this process has and has not written, for the message after an interrupt.

The points of the write phase where a fault test stops a run (``_pause``, a no-op here):
``wrote:NAME`` (after one file is written), ``staged`` (every file staged, nothing published),
``moved-old`` (the old set moved aside, the new one not yet in: the two-rename publish) and
``swapped`` (the new set in place, the old one not yet removed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gifcli.errors import GifError

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; a second run is not locked out there
    fcntl = None

TMP_SUFFIX = ".gif-tmp"
_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM; ``exit_code`` is the shell's ``128 + signal number``."""

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


# ------------------------------------------------------------------- what this process wrote


@dataclass
class _History:
    published: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # folders whose previous set is untouched


_history = _History()


def forget_history() -> None:
    """Start a new command's record of what it wrote (``outcome``)."""
    global _history
    _history = _History()


def outcome() -> str:
    """What this command has written, for the message after an interrupt or an error."""
    if _history.published:
        return f"the outputs were already written ({', '.join(_history.published)})"
    kept = f"; the outputs already in {', '.join(_history.kept)} are unchanged"
    return "nothing was written" + (kept if _history.kept else "")


_staging_of: dict[str, Path] = {}  # staging folder -> the output folder it is published as


def write_failed(directory: Path | str, exc: OSError) -> GifError:
    """The one message for a failed write, naming the output folder (not a staging folder):
    disk full, or the system's reason; with what was and was not written."""
    directory = _staging_of.get(os.path.abspath(directory), directory)
    if exc.errno in _DISK_FULL:
        return GifError(f"no space left on device in {directory}; {outcome()}")
    return GifError(
        f"{directory}: cannot write the outputs ({exc.strerror or exc}); {outcome()}; "
        f"check the folder or choose another output path"
    )


# ------------------------------------------------------------------------------ single files


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_writable(directory: str | Path) -> None:
    """Fail early, before any work, when ``directory`` cannot be created or written to.

    Creates nothing: the nearest existing ancestor must be a writable folder.
    """
    directory = Path(os.path.abspath(directory))
    existing = directory
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        reason = "is not a folder" if not existing.is_dir() else "is not writable"
        raise GifError(
            f"{directory}: cannot write here ({existing} {reason}); choose another output path"
        )


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; the ones created, deepest first."""
    missing = []
    while not os.path.lexists(directory):
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise write_failed(folder.parent, exc) from None
    return missing


def _remove_empty(folders: Iterable[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _fsync(path: Path | str) -> None:
    """Flush a file or folder to disk (a no-op where the platform cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename still orders the writes
    finally:
        os.close(fd)


def new_tmp(path: Path) -> Path:
    """An empty hidden temporary file beside ``path``, with the umask's permissions."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise write_failed(path.parent, exc) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files
    finally:
        os.close(fd)
    return Path(tmp)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    An ``OSError`` of the block or of the rename becomes a ``GifError`` naming the folder
    (its own message when the disk is full).
    """
    path = Path(path)
    _make_parents(path.parent)
    tmp = new_tmp(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise write_failed(path.parent, exc) from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    _pause(f"wrote:{path.name}")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def _jsonable(value: object) -> object:
    if hasattr(value, "tolist"):  # tensors and arrays
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (e.g. a matplotlib savefig)."""
    with atomic_path(path) as tmp:
        writer(tmp)


# ----------------------------------------------------------------------------------- signals


class _Deferred:
    """SIGINT/SIGTERM held back during a publish (main thread only)."""

    def __init__(self) -> None:
        self.pending: int | None = None

    @contextmanager
    def hold(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self.pending = None

        def remember(signum: int, frame: object) -> None:
            self.pending = self.pending or signum

        previous = {
            signum: signal.signal(signum, remember)
            for signum in (signal.SIGINT, signal.SIGTERM)
            if signal.getsignal(signum) is not signal.SIG_IGN  # e.g. under nohup: stays ignored
        }
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            pending, self.pending = self.pending, None
        if pending is not None:
            raise Interrupted(pending)


_deferred = _Deferred()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises ``Interrupted`` (as Ctrl-C does) so that every clean-up runs."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    ):
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _pause(stage: str) -> None:
    """A named point of the write phase (see the module doc): nothing happens here; the fault
    tests replace this function to stop a run at ``stage``."""


# ---------------------------------------------------------------------------------- the lock

_held: dict[str, int] = {}  # lock path -> how many claims of this process hold it


@contextmanager
def _locked(lock: Path, *, what: str, note: Callable[[str], None]) -> Iterator[None]:
    """Hold ``lock`` (flock, pid inside) for the block; re-entrant within one process."""
    key = os.path.abspath(lock)
    if key in _held or fcntl is None:
        _held[key] = _held.get(key, 0) + 1
        try:
            yield
        finally:
            _held[key] -= 1
            if not _held[key]:
                del _held[key]
        return
    fd = _acquire(lock, what=what, note=note)
    _held[key] = 1
    try:
        yield
    finally:
        del _held[key]
        with contextlib.suppress(OSError):  # unlinked while held: a waiting run re-checks
            os.unlink(lock)
        os.close(fd)


def _acquire(lock: Path, *, what: str, note: Callable[[str], None]) -> int:
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise write_failed(lock.parent, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            by = f"gif run (pid {holder})" if holder else "gif run"
            raise GifError(
                f"{what} is in use by another {by}: {lock} is locked; wait for that run to "
                f"finish, or choose another output path"
            ) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file as we took it: take the new one
            os.close(fd)
            continue
        left = _read_pid(fd)
        if left:
            note(f"took over {lock}, left by an earlier gif run (pid {left}) that was stopped")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------- output folders


def _staging_name(directory: Path, pid: int | str) -> Path:
    return directory.parent / f".{directory.name}.gif-staging-{pid}"


def _old_name(directory: Path, pid: int | str) -> Path:
    return directory.parent / f".{directory.name}.gif-old-{pid}"


def _lock_name(path: Path) -> Path:
    return path.parent / f"{path.name}.lock"


def _own_leftover(name: str, names: Iterable[str]) -> bool:
    """A file gif itself leaves in an output folder: a temporary file of one of its outputs."""
    return name.endswith(TMP_SUFFIX) and any(name.startswith(f".{n}.") for n in names)


def check_output_dir(directory: str | Path, *, force: bool, names: Iterable[str]) -> None:
    """Refuse, before any work, an output folder the run may not replace.

    Without ``force`` an existing, non-empty folder is refused; with it, a folder holding
    anything but regular files named in ``names`` (and gif's own temporary files) is refused.
    A symbolic link or a file at the path is refused too (``check_writable``).
    """
    directory = Path(directory)
    names = list(names)
    check_writable(directory)
    if not os.path.lexists(directory):
        return
    if directory.is_symlink():
        raise GifError(
            f"{directory}: output.dir is a symbolic link; point output.dir at the folder itself"
        )
    if os.path.ismount(directory):  # it cannot be renamed, nor staged beside on its filesystem
        raise GifError(
            f"{directory}: output.dir is a mount point; gif replaces output.dir as a whole, so "
            f"name a folder inside it, e.g. {directory / 'out'}"
        )
    try:
        entries = sorted(os.listdir(directory))
    except OSError as exc:
        raise GifError(f"{directory}: cannot list output.dir ({exc.strerror})") from None
    if not entries:
        return
    if not force:
        raise GifError(
            f"{directory / entries[0]}: already exists; pass --force to replace the outputs "
            f"in {directory} or set output.dir"
        )
    foreign = [
        e
        for e in entries
        if not (
            (e in names and (directory / e).is_file() and not (directory / e).is_symlink())
            or _own_leftover(e, names)
        )
    ]
    if foreign:
        raise GifError(
            f"{directory / foreign[0]}: not an output gif writes (gif replaces output.dir as a "
            f"whole); move it away or choose another output.dir"
        )


@dataclass
class OutputDir:
    """A claimed output folder (``claim_output_dir``); ``stage()`` publishes a set into it."""

    directory: Path
    names: tuple[str, ...]
    force: bool

    @contextmanager
    def stage(self) -> Iterator[Path]:
        """Yield an empty staging folder beside the output folder; when the block succeeds,
        its files replace the output folder's as one set. On any failure or interrupt the
        staging folder is removed and the output folder is left as it was."""
        staging = _staging_name(self.directory, os.getpid())
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
        except OSError as exc:
            raise write_failed(self.directory, exc) from None
        _staging_of[os.path.abspath(staging)] = self.directory
        try:
            yield staging
            check_output_dir(self.directory, force=self.force, names=self.names)
            for entry in staging.iterdir():
                _fsync(entry)
            _fsync(staging)
            _pause("staged")
            self._publish(staging)
        except OSError as exc:
            raise write_failed(self.directory, exc) from None
        finally:
            del _staging_of[os.path.abspath(staging)]
            shutil.rmtree(staging, ignore_errors=True)

    def _publish(self, staging: Path) -> None:
        directory = self.directory
        with _deferred.hold():
            if not os.path.lexists(directory):
                os.rename(staging, directory)
                _pause("swapped")
            elif _exchange(staging, directory):
                _pause("swapped")
                shutil.rmtree(staging)  # now the old set
            else:
                old = _old_name(directory, os.getpid())
                os.rename(directory, old)
                _pause("moved-old")
                os.rename(staging, directory)
                _pause("swapped")
                shutil.rmtree(old)
            _fsync(directory.parent)
            if str(directory) not in _history.published:
                _history.published.append(str(directory))
            if str(directory) in _history.kept:
                _history.kept.remove(str(directory))


@contextmanager
def claim_output_dir(
    directory: str | Path,
    *,
    force: bool,
    names: Iterable[str],
    note: Callable[[str], None] = lambda message: None,
) -> Iterator[OutputDir]:
    """Lock ``directory`` for the block, recover what a killed run left, and refuse a folder
    the run may not replace (``check_output_dir``), all before any work.

    ``names``: the file names the run writes; ``note(message)`` receives what the recovery
    did. Claims nest within one process (the inner one reuses the lock).
    """
    directory = Path(directory)
    names = tuple(names)
    check_writable(directory)
    created = _make_parents(directory.parent)
    published = False
    try:
        with (
            _locked(_lock_name(directory), what=f"output.dir {directory}", note=note),
            _sigterm_interrupts(),
        ):
            _recover(directory, note)
            check_output_dir(directory, force=force, names=names)
            had_outputs = os.path.lexists(directory) and os.listdir(directory)
            if had_outputs and str(directory) not in _history.kept:
                _history.kept.append(str(directory))
            yield OutputDir(directory=directory, names=names, force=force)
            published = str(directory) in _history.published
    finally:
        if not published:
            _remove_empty(created)


def _recover(directory: Path, note: Callable[[str], None]) -> None:
    """Under the lock: every staging or moved-aside folder beside ``directory`` is a killed
    run's. A moved-aside set goes back when the folder is missing; the rest is removed."""
    parent = directory.parent
    for staging in parent.glob(f".{_glob_escape(directory.name)}.gif-staging-*"):
        shutil.rmtree(staging, ignore_errors=True)
    for old in sorted(parent.glob(f".{_glob_escape(directory.name)}.gif-old-*")):
        if not os.path.lexists(directory):
            os.rename(old, directory)
            note(f"put back the outputs of {directory} that a stopped gif run had moved aside")
        else:
            shutil.rmtree(old, ignore_errors=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where
    the system or the filesystem cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc older than glibc 2.28
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


# -------------------------------------------------------------------------------- file sets


@contextmanager
def claim_output_files(
    paths: Iterable[Path], *, force: bool, note: Callable[[str], None] = lambda message: None
) -> Iterator[dict[Path, Path]]:
    """Write a few files beside each other (``gif train``'s checkpoint, report and config) as
    a set: lock the first for the block, refuse existing ones without ``force`` (and folders
    always), then yield ``{path: temporary path}``; when the block succeeds every temporary
    file is renamed onto its path, signals held back. Each file is atomic; the set is, except
    for a process killed between two renames (microseconds)."""
    paths = [Path(p) for p in paths]
    for path in paths:
        check_writable(path.parent)
    created = _make_parents(paths[0].parent)
    written = False
    try:
        with (
            _locked(_lock_name(paths[0]), what=str(paths[0]), note=note),
            _sigterm_interrupts(),
        ):
            for path in paths:
                for leftover in path.parent.glob(f".{_glob_escape(path.name)}.*{TMP_SUFFIX}"):
                    leftover.unlink(missing_ok=True)
                check_output_file(path, force=force)
            tmps = {path: new_tmp(path) for path in paths}
            try:
                yield tmps
                for tmp in tmps.values():
                    _fsync(tmp)
                _pause("staged")
                with _deferred.hold():
                    for path, tmp in tmps.items():
                        os.replace(tmp, path)
                    _history.published.extend(str(p) for p in paths)
                    written = True
                _fsync(paths[0].parent)
            except OSError as exc:
                raise write_failed(paths[0].parent, exc) from None
            finally:
                for tmp in tmps.values():
                    if os.path.lexists(tmp):
                        os.unlink(tmp)
    finally:
        if not written:
            _remove_empty(created)


def check_output_file(path: str | Path, *, force: bool) -> None:
    """Refuse, before any work, an output file that exists (a dangling link too) unless
    ``force``, and a folder at its path always."""
    path = Path(path)
    check_writable(path.parent)
    if path.is_dir() and not path.is_symlink():
        raise GifError(f"{path}: is a folder; remove it or choose another output path")
    if os.path.lexists(path) and not force:
        raise GifError(f"{path}: already exists; pass --force to overwrite it or choose another")
