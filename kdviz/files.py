"""Files kdviz writes: every one goes to a temporary name in its folder and is renamed into place.

A reader (another process, or the next run after a crash, Ctrl-C or a full disk) sees the old
file or the new one, never half of one. Output paths are checked before any work starts.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> _ = write_text(folder / "a.txt", "new")
>>> (folder / "a.txt").read_text(), sorted(p.name for p in folder.iterdir())
('new', ['a.txt'])
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

TEMP_MARK = ".kdviz-tmp-"  # temporary files carry this in their name (never a final name)


class KdvizWarning(UserWarning):
    """Something went wrong that does not change any result (e.g. the cache could not be written)."""


def _write_errors() -> tuple[type[BaseException], ...]:
    """OSError, and the error polars raises when its writer hits one (e.g. a full disk)."""
    try:
        from polars.exceptions import ComputeError
    except ImportError:
        return (OSError,)
    return (OSError, ComputeError)


WRITE_ERRORS = _write_errors()


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError):
        return err.strerror or str(err)
    return str(err).rsplit(": ", 1)[-1]  # polars: "...: underlying IO error: No space left on device (os error 28)"


def warn(message: str) -> None:
    warnings.warn(message, KdvizWarning, stacklevel=3)


def expand(path: str | os.PathLike) -> Path:
    """`path` with ``~`` expanded (what a shell would have done)."""
    return Path(os.path.expanduser(os.fspath(path)))


def cache_root() -> Path:
    """``$KDVIZ_CACHE_DIR`` or ``~/.cache/kdviz``: analysis results, converted models."""
    return expand(os.environ.get("KDVIZ_CACHE_DIR") or Path.home() / ".cache" / "kdviz")


@contextmanager
def atomic_path(path: str | os.PathLike, *, what: str = "file") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, else remove it.

    OSError (full disk, permissions) becomes a ValueError that names `path` and says that a
    file already there is untouched.
    """
    path = expand(path)
    if path.is_symlink():  # replace the file the link points to, and keep the link
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        os.replace(temp, path)
    except WRITE_ERRORS as err:
        raise ValueError(
            f"Could not write the {what} {path}: {_reason(err)}. "
            f"{'The file already there is unchanged. ' if path.exists() else ''}"
            "Free some space or choose another path."
        ) from err
    finally:
        if temp.exists():
            temp.unlink()


def write_with(path: str | os.PathLike, writer: Callable[[Path], object], *, what: str = "file") -> Path:
    """Call `writer(temporary_path)`, then rename the result onto `path` (see `atomic_path`)."""
    with atomic_path(path, what=what) as temp:
        writer(temp)
    return expand(path)


def write_text(path: str | os.PathLike, text: str, *, what: str = "file") -> Path:
    return write_with(path, lambda temp: temp.write_text(text, encoding="utf-8"), what=what)


def file_digest(path: str | os.PathLike) -> str:
    """xxh3 (64-bit, hex) of a file's bytes, read in blocks (a few GB/s)."""
    import xxhash

    digest = xxhash.xxh3_64()
    with expand(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def file_checksums(paths) -> dict[str, str]:
    """{file name: `file_digest`} of `paths`, to record beside them and check later with `changed_file`."""
    return {Path(path).name: file_digest(path) for path in paths}


def changed_file(folder: Path, recorded: dict[str, str], *, since: str) -> str | None:
    """The first file of `recorded` (name -> `file_digest`) in `folder` that is missing, unreadable or has other
    bytes, said in words ("NAME has changed since <since> (...)"), or None when all match."""
    for name, expected in recorded.items():
        try:
            found = file_digest(folder / name)
        except FileNotFoundError:
            return f"{name} is missing"
        except OSError as err:
            return f"{name} cannot be read ({err.strerror or err})"
        if found != expected:
            return f"{name} has changed since {since} (xxh3 {found}, recorded {expected})"
    return None


def check_writable(path: str | os.PathLike, *, what: str, folder: bool = False) -> Path:
    """ValueError unless `path` (a file, or a folder with folder=True) can be written; nothing is left behind.

    Creates missing parent folders (as the write would). Probes with a real file, so it is
    right for root, read-only mounts and full disks alike.
    """
    path = expand(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"The {what} {path} is a file, not a folder; give a folder path.")
    if not folder and path.is_dir():
        raise ValueError(f"The {what} {path} is a folder; give the path of a file (a new one, or one to replace).")
    target = path if folder else path.parent
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target, prefix=TEMP_MARK):
            pass
    except OSError as err:
        raise ValueError(f"Cannot write the {what} {path}: {err.strerror or err} ({target}). "
                         "Choose a folder you can write to.") from err
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (existing or not, through links and ``~``)."""
    a, b = expand(a), expand(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def check_distinct(paths: dict[str, str | os.PathLike | None]) -> None:
    """ValueError when two of the named paths (e.g. data, --out, --report) are the same file."""
    named = [(name, p) for name, p in paths.items() if p is not None]
    for i, (name_a, a) in enumerate(named):
        for name_b, b in named[i + 1:]:
            if same_file(a, b):
                raise ValueError(f"{name_a} and {name_b} are the same file ({expand(a)}); writing one would destroy "
                                 f"the other. Give {name_b} another path.")


def move_aside(path: Path, reason: str) -> Path | None:
    """Rename an unreadable file to ``<name>.corrupt-<id>`` (kept for inspection) and warn; None if that fails."""
    aside = path.with_name(f"{path.name}.corrupt-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(path, aside)
    except OSError:
        warn(f"Could not read {path} ({reason}) nor move it aside; it is ignored.")
        return None
    warn(f"Could not read {path} ({reason}); moved it to {aside.name} and computing it again.")
    return aside


MOVED_LAST = ("metrics.json", "manifest.json")  # a folder with these is complete


@contextmanager
def new_folder(out: str | os.PathLike, *, what: str = "folder") -> Iterator[Path]:
    """Yield a temporary sibling of `out` to fill; on success rename it to `out` (one atomic step).

    If `out` appeared meanwhile (another process made it), that one is kept and ours dropped.
    """
    out = expand(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = out.with_name(f"{out.name}{TEMP_MARK}{uuid.uuid4().hex[:8]}")
    try:
        stage.mkdir()
        yield stage
        try:
            os.rename(stage, out)
        except OSError:
            if not out.is_dir():
                raise
    except WRITE_ERRORS as err:
        raise ValueError(f"Could not write the {what} {out}: {_reason(err)}. Free some space or choose another "
                         "folder.") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


@contextmanager
def staged_folder(out: str | os.PathLike, *, what: str = "folder") -> Iterator[Path]:
    """Yield an empty staging folder inside `out`; on success move each file it holds into `out`.

    Every file lands by rename, so a file of an earlier run in `out` is replaced whole or left
    as it was (an interrupted save leaves only the hidden staging folder, removed here).
    """
    out = expand(out)
    stage = out / f"{TEMP_MARK}{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir(parents=True)
        yield stage
        for file in sorted((p for p in stage.rglob("*") if p.is_file()), key=lambda p: (p.name in MOVED_LAST, p)):
            target = out / file.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    except WRITE_ERRORS as err:
        raise ValueError(f"Could not write the {what} {out}: {_reason(err)}. Files already there are "
                         "unchanged. Free some space or choose another folder.") from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def lock_path(out: str | os.PathLike, *, inside: bool = False) -> Path:
    """Where the writer of `out` keeps its lock: in the folder (`inside`), or as a hidden file beside it."""
    out = expand(out)
    return out / ".kdviz-lock" if inside else out.with_name(f".{out.name}.kdviz-lock")


@contextmanager
def writer_lock(out: str | os.PathLike, *, what: str, inside: bool = False) -> Iterator[None]:
    """Hold the only right to write `out` while the block runs; a second writer gets a ValueError naming the first
    (its process id, command line and start time), so two runs never write one folder. POSIX only (elsewhere: no
    lock). The lock file goes away when the block ends."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = lock_path(out, inside=inside)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ValueError(f"Another kdviz run is writing the {what} {expand(out)} ({holder}); two runs would "
                             "overwrite each other's files. Wait for it to finish, or give this run another output.") \
                from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, `{' '.join(sys.argv)[:200]}`, started {time.strftime('%Y-%m-%d %H:%M:%S')}")
        handle.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                path.unlink()  # while still holding it (the lock goes with the file's closing)


def remove_stale_stages(out: str | os.PathLike) -> list[Path]:
    """Remove staging folders and files of `out` left by an earlier writer that was killed (call while holding
    `writer_lock(out)`: no other writer can own them then). The removed paths."""
    out = expand(out)
    stale = sorted(out.parent.glob(f"{glob.escape(out.name)}{TEMP_MARK}*")) if out.parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return stale


def seal(path: str | os.PathLike) -> Path:
    """Record `path`'s xxh3 beside it (``NAME.xxh3``, written last): the file that lists an artefact's checksums
    (a cache's meta.json, a checkpoint's mark) is covered too."""
    path = expand(path)
    return write_text(path.with_name(f"{path.name}.xxh3"), file_digest(path) + "\n", what="checksum")


def seal_problem(path: str | os.PathLike) -> str | None:
    """What is wrong with `path` against its seal (missing, changed), or None; None too for an artefact written
    before kdviz sealed this file (no seal beside it)."""
    path = expand(path)
    sealed = path.with_name(f"{path.name}.xxh3")
    if not sealed.is_file():
        return None
    if not path.is_file():
        return f"{path.name} is missing"
    expected, found = sealed.read_text().strip(), file_digest(path)
    return None if found == expected else f"{path.name} has changed since it was written (xxh3 {found}, sealed {expected})"
