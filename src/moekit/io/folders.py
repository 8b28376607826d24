"""Whole folders: where moekit may write (never over what it did not write), staging and atomic
publication (``renameat2(RENAME_EXCHANGE)``, or two renames that :func:`clean_stale` repairs),
removal of only the files a manifest lists, and :func:`write_folder`."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from moekit.io.errors import IntegrityError
from moekit.io.faults import fault_point
from moekit.io.files import atomic_write, current_umask, dumps, fsync_dir, host_tag, inside, temp_prefix
from moekit.io.manifest import MANIFEST, file_record, kind_of, read_manifest, write_manifest


def check_target(folder: str | os.PathLike, kind: str | tuple[str, ...], what: str) -> bool:
    """May moekit write a ``kind`` into ``folder``? Yes if it does not exist, is empty, or is a
    moekit folder of that kind (returns whether it exists with content); otherwise a
    ``FileExistsError`` naming the folder and what to do. ``what`` names the argument (``--out``)."""
    folder = Path(folder)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not folder.exists():
        if folder.is_symlink():
            raise FileExistsError(f"{what} {folder}: a broken symbolic link; remove it or choose another path")
        return False
    if not folder.is_dir():
        raise FileExistsError(f"{what} {folder}: exists and is a file, not a folder; choose another path")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        return False
    found = kind_of(folder)
    if found in kinds:
        return True
    held = f"a moekit {found}" if found else f"{len(entries)} entries not written by moekit (e.g. {entries[0]!r})"
    raise FileExistsError(f"{what} {folder}: exists and holds {held}, not a moekit {kinds[0]}; moekit writes only into "
                          "a new or empty folder or one it wrote itself: choose another path")


def claim_folder(folder: str | os.PathLike, kind: str, what: str) -> Path:
    """Make ``folder`` a moekit folder of ``kind`` (created, or an empty one marked with a manifest),
    or accept it if it already is one; any other existing folder is refused (:func:`check_target`)."""
    folder = Path(folder)
    if not check_target(folder, kind, what):
        folder.mkdir(parents=True, exist_ok=True)
        write_manifest(folder, kind, {}, {})
    return folder


def check_report_target(path: str | os.PathLike, what: str, kind: str) -> Path:
    """May moekit write the JSON report of benchmark ``kind`` at ``path``? Yes if nothing is there
    or moekit's own report of that benchmark (``{"benchmark": kind, ...}``); otherwise a ``FileExistsError``."""
    path = Path(path)
    if path.is_dir() or path.suffix != ".json":
        raise FileExistsError(f"{what} {path}: give a file path ending in .json")
    if path.exists() or path.is_symlink():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
            ours = isinstance(found, dict) and found.get("benchmark") == kind and not path.is_symlink()
        except (ValueError, OSError):
            ours = False
        if not ours:
            raise FileExistsError(f"{what} {path}: exists and is not a moekit {kind} report; choose another path")
    return path


_TMP = re.compile(r"^\.(?P<name>.+)\.moekit-(?P<tag>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(final: Path, tag: str = "tmp") -> Path:
    """A new empty folder beside ``final`` named ``.NAME.moekit-TAG-HOST-PID-RANDOM`` (removable by
    :func:`clean_stale` once this process is gone), with the usual permissions."""
    final.parent.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name, tag), dir=final.parent))
    os.chmod(d, 0o777 & ~current_umask())
    return d


def clean_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Tidy what an interrupted moekit write left in ``parent`` (for ``name``, or any), once the
    process that wrote it is gone (a process of this machine: temporaries of another host are left
    alone): a previous version swapped out but not yet replaced goes back under its name; other
    temporary files and folders of moekit's own naming are removed. Returns the paths removed."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    host = host_tag()
    for p in sorted(parent.iterdir()):
        m = _TMP.match(p.name)
        if not m or p.is_symlink() or (name is not None and m["name"] != name) or m["host"] != host:
            continue
        if _alive(int(m["pid"])):
            continue
        final = parent / m["name"]
        if m["tag"] == "old" and p.is_dir() and not final.exists() and (p / MANIFEST).exists():
            os.rename(p, final)
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` if unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_folder(folder: str | os.PathLike, kind: str | tuple[str, ...]) -> None:
    """Delete a moekit folder of ``kind``: the files its manifest lists, the manifest, then the folder
    if nothing else is left (anything moekit did not write stays)."""
    folder = Path(folder)
    m = read_manifest(folder, kind, "it was not removed")
    for name in m["files"]:
        p = inside(folder, name, str(folder / MANIFEST))
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
        sub = p.parent
        while sub != folder and sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
            sub = sub.parent
    (folder / MANIFEST).unlink()
    with contextlib.suppress(OSError):
        folder.rmdir()


def publish(staged: Path, final: Path, kind: str | tuple[str, ...]) -> None:
    """Put the complete folder ``staged`` at ``final``. An existing ``final`` must be moekit's folder
    of ``kind`` holding only files its manifest lists; it is swapped out atomically and removed."""
    fault_point("publish")
    if not final.exists():
        os.rename(staged, final)
        fsync_dir(final.parent)
        return
    m = read_manifest(final, kind, "not replaced")
    listed = {Path(n).parts[0] for n in m["files"]} | {MANIFEST}
    foreign = sorted(p.name for p in final.iterdir() if p.name not in listed)
    if foreign:
        raise FileExistsError(f"{final}: holds {foreign[:3]} which moekit did not write; move them out, then write again")
    if _exchange(staged, final):
        fault_point("exchanged")
        fsync_dir(final.parent)
        shutil.rmtree(staged)  # now the previous version: files moekit wrote, as checked above
        return
    old = staged.with_name(staged.name.replace(".moekit-tmp-", ".moekit-old-"))
    os.rename(final, old)  # a kill from here to the next rename: clean_stale puts the old version back
    try:
        fault_point("exchanged")
        os.rename(staged, final)
    except BaseException:
        if not final.exists():
            os.rename(old, final)
        raise
    fsync_dir(final.parent)
    shutil.rmtree(old)


class FolderWriter:
    """Writes the files of one moekit folder (see :func:`write_folder`); each file atomically."""

    def __init__(self, root: Path, kind: str) -> None:
        self.root, self.kind = root, kind
        self.files: dict[str, dict] = {}
        self.meta: dict = {}

    def path(self, name: str) -> Path:
        return inside(self.root, name, f"moekit {self.kind}")

    def write(self, name: str, write: Callable[[str], None], blocks: str | None = None) -> Path:
        """``write(tmp_path)`` writes file ``name``; ``blocks`` names the per-block checksums that guard
        it instead of a whole-file SHA-256 (a large file read a block at a time)."""
        fault_point(f"file:{name}")
        p = atomic_write(self.path(name), write)
        self.files[name] = file_record(p, blocks)
        return p

    def write_bytes(self, name: str, data: bytes) -> Path:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(data)

        return self.write(name, write)

    def write_text(self, name: str, text: str) -> Path:
        return self.write_bytes(name, text.encode("utf-8"))

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, dumps(obj))


@contextlib.contextmanager
def write_folder(folder: str | os.PathLike, kind: str, what: str = "output folder",
                 meta: dict | None = None, whole: bool = False) -> Iterator[FolderWriter]:
    """Write the moekit folder ``folder`` of ``kind``: ``with write_folder(p, "model") as w:
    w.write_text("config.json", ...)``. A new folder is written under a temporary name and renamed
    when complete (a kill leaves nothing under ``folder``). An existing one must be moekit's own of
    this kind (see :func:`check_target`): with ``whole=True`` the new version is also written aside
    and swapped in atomically (the old one removed after; an entry moekit did not write stops it,
    see :func:`publish`); otherwise each file is replaced atomically and the manifest last (files
    the old manifest listed and the new one does not are removed; files moekit did not write
    stay). Set ``w.meta`` for extra manifest fields."""
    folder = Path(folder)
    if folder.is_symlink() and folder.is_dir():  # written where the link points; the link stays
        folder = folder.resolve()
    exists = check_target(folder, kind, what)
    clean_stale(folder.parent, folder.name)
    in_place = exists and not whole
    if in_place:
        clean_stale(folder)  # files a killed in-place write left
    root = folder if in_place else staging_dir(folder)
    w = FolderWriter(root, kind)
    w.meta = dict(meta or {})
    old = read_manifest(folder, kind, "")["files"] if in_place else {}
    try:
        yield w
        fault_point("manifest")
        write_manifest(root, kind, w.files, w.meta)
        if not in_place:
            if folder.is_dir() and not any(folder.iterdir()):  # an empty folder: replaced by the complete one
                folder.rmdir()
            publish(root, folder, kind)
    except BaseException:
        if not in_place:
            shutil.rmtree(root, ignore_errors=True)
        raise
    for name in set(old) - set(w.files):
        with contextlib.suppress(FileNotFoundError, IntegrityError):
            inside(folder, name).unlink()
