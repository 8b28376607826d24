"""Files moekit writes: atomic, checksummed, verified on load, and never in place of someone else's.

Three rules, one module:

* **Atomic.** A file is written under a temporary name in its folder, fsynced, then renamed: a
  reader never sees half a file under the final name. A new folder is written whole under a
  temporary name (``.NAME.moekit-tmp-HOST-PID-RANDOM``) and renamed when complete: it is complete or absent.
* **Checksummed.** Every moekit folder (a model, a checkpoint, a converted model, a MoLE table, an
  expert store, a training run) carries ``moekit.json``: its kind and, for each file, its size and
  SHA-256 (or, for a large file read in blocks, the name of the per-block checksums that guard it).
  :func:`verify` checks them on load and names the file and the way to recover.
* **Ours only.** :func:`check_target` refuses to write into an existing folder that is not empty
  and not moekit's own folder of the same kind; moekit removes only files its manifest lists, and
  temporary folders of its own naming whose writer is gone.

``fault_point(stage)`` marks the steps of a multi-file write; a test installs a hook with
:func:`fault_hook` to raise or kill the process at any of them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["IntegrityError", "MANIFEST", "MoekitWarning", "FolderWriter", "atomic_write", "atomic_write_bytes",
           "atomic_write_text", "check_report_target", "check_target", "claim_folder", "clean_stale", "dumps", "fault_hook", "fault_point", "inside",
           "json_safe", "kind_of", "publish", "read_json", "read_manifest", "record_files", "remove_folder", "sha256_file",
           "staging_dir", "update_manifest", "verify", "verify_file", "write_folder", "write_manifest"]

MANIFEST = "moekit.json"
FORMAT = "moekit"
VERSION = 1
_CHUNK = 1 << 20


class IntegrityError(ValueError):
    """A file or folder moekit reads is corrupt, truncated, incomplete or not what it claims to be."""


class MoekitWarning(UserWarning):
    """Something moekit did on the user's behalf that they should know of (a checkpoint skipped, a
    setting applied on resume); the command line prints it as one line."""


# ----------------------------------------------------------------------------------- fault injection

_HOOK: Callable[[str], None] | None = None


def fault_point(stage: str) -> None:
    """A named step of a multi-file write (a no-op unless a test installed a hook)."""
    if _HOOK is not None:
        _HOOK(stage)


@contextlib.contextmanager
def fault_hook(hook: Callable[[str], None]) -> Iterator[None]:
    """Call ``hook(stage)`` at every :func:`fault_point` inside the block (tests: raise, or ``os._exit``)."""
    global _HOOK
    old, _HOOK = _HOOK, hook
    try:
        yield
    finally:
        _HOOK = old


# ----------------------------------------------------------------------------------- single files


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


def _host() -> str:
    """A short tag of this machine, so that temporaries are only ever tidied by a process of the same host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _tmp_prefix(name: str, tag: str = "tmp") -> str:
    """``.NAME.moekit-TAG-HOST-PID-``: the name of a temporary moekit writes beside ``NAME``."""
    return f".{name}.moekit-{tag}-{_host()}-{os.getpid()}-"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path`` (created with the
    usual permissions, as ``open`` would)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path.name), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(obj):
    """``obj`` with every non-finite float replaced by ``None``: what ``json.dumps(allow_nan=False)``
    accepts (bare ``NaN`` / ``Infinity`` are not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps(obj, indent: int | None = 1) -> str:
    """Strict JSON of ``obj`` (non-finite floats written as ``null``)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def read_json(path: str | os.PathLike, fix: str = "") -> dict:
    """A JSON object from ``path``; a missing, unreadable or malformed file is an error naming it."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing{'; ' + fix if fix else ''}") from None
    except UnicodeDecodeError:
        raise IntegrityError(f"{path}: not UTF-8 text (corrupt?){'; ' + fix if fix else ''}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise IntegrityError(f"{path}: not valid JSON ({e.msg}, line {e.lineno}){'; ' + fix if fix else ''}") from None
    if not isinstance(obj, dict):
        raise IntegrityError(f"{path}: expected a JSON object, got {type(obj).__name__}{'; ' + fix if fix else ''}")
    return obj


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def inside(folder: str | os.PathLike, name: str, what: str = "") -> Path:
    """``folder / name``, refused unless ``name`` is a relative path that stays inside ``folder``
    (names read from files never reach outside their folder)."""
    folder = Path(folder)
    bad = (not isinstance(name, str) or not name or "\x00" in name or os.path.isabs(name)
           or any(part in ("..", "") for part in Path(name).parts) or name != str(Path(name)))
    if not bad:
        root = folder.resolve()
        target = (folder / name).resolve()
        bad = target != root and root not in target.parents
    if bad:
        raise IntegrityError(f"{what or folder}: the path {name!r} it names leads outside {folder}; the file is "
                             "corrupt or was edited by hand; write it again with moekit")
    return folder / name


# ----------------------------------------------------------------------------------- manifests


def kind_of(folder: str | os.PathLike) -> str | None:
    """The kind of the moekit folder ``folder`` (``"gpt-model"``...), or ``None`` if it has no readable manifest."""
    p = Path(folder) / MANIFEST
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return m.get("kind") if isinstance(m, dict) and m.get("format") == FORMAT else None


def read_manifest(folder: str | os.PathLike, kind: str | tuple[str, ...], fix: str) -> dict:
    """The manifest of the moekit folder ``folder`` of ``kind`` (not verified: see :func:`verify`)."""
    folder = Path(folder)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; check the path")
    p = folder / MANIFEST
    tail = f"; {fix}" if fix else ""
    if not p.exists():
        raise IntegrityError(f"{folder}: no {MANIFEST}, so not a complete moekit {kinds[0]} (an interrupted write, "
                             f"or not written by moekit){tail}")
    m = read_json(p, fix)
    _check_manifest(p, m, tail)
    if m.get("kind") not in kinds:
        raise IntegrityError(f"{folder}: a moekit {m.get('kind')}, not a {' or '.join(kinds)}{tail}")
    return m


def _check_manifest(p: Path, m: dict, tail: str) -> None:
    if m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise IntegrityError(f"{p}: not a moekit manifest{tail}")
    if m.get("version") != VERSION:
        raise IntegrityError(f"{p}: manifest version {m.get('version')!r}, this moekit reads {VERSION}{tail}")


def verify(folder: str | os.PathLike, kind: str | tuple[str, ...], fix: str, only: list[str] | None = None) -> dict:
    """Check every file the manifest lists (or the names in ``only``): inside the folder, present,
    of its recorded size and SHA-256. Files guarded by per-block checksums (``"blocks"``) are only
    checked for size here; their reader checks each block. Returns the manifest."""
    folder = Path(folder)
    m = read_manifest(folder, kind, fix)
    for name, rec in m["files"].items():
        if only is not None and name not in only:
            continue
        _check_file(folder, name, rec, fix)
    if only is not None:
        missing = [n for n in only if n not in m["files"]]
        if missing:
            raise IntegrityError(f"{folder / MANIFEST}: lists no {missing}; {fix}")
    return m


def _check_file(folder: Path, name: str, rec: dict, fix: str) -> None:
    p = inside(folder, name, str(folder / MANIFEST))
    tail = f"; {fix}" if fix else ""
    if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int):
        raise IntegrityError(f"{folder / MANIFEST}: malformed entry for {name!r}{tail}")
    try:
        size = p.stat().st_size
    except FileNotFoundError:
        raise IntegrityError(f"{p}: missing (listed in {MANIFEST}){tail}") from None
    if size != rec["bytes"]:
        raise IntegrityError(f"{p}: {size:,} bytes, {MANIFEST} records {rec['bytes']:,} (truncated or replaced){tail}")
    if "sha256" in rec and sha256_file(p) != rec["sha256"]:
        raise IntegrityError(f"{p}: checksum mismatch (corrupt, or changed since moekit wrote it){tail}")


def verify_file(path: str | os.PathLike, fix: str) -> bool:
    """Verify ``path`` against the manifest of its folder if that manifest lists it (``True``);
    ``False`` when the folder is not moekit's or does not list it (a file of the user's own)."""
    path = Path(path)
    man = path.parent / MANIFEST
    if not man.exists():
        return False
    m = read_json(man, fix)
    _check_manifest(man, m, f"; {fix}")
    rec = m["files"].get(path.name)
    if rec is None:
        return False
    _check_file(path.parent, path.name, rec, fix)
    return True


def _record(path: Path, blocks: str | None = None) -> dict:
    rec = {"bytes": path.stat().st_size}
    if blocks is None:
        rec["sha256"] = sha256_file(path)
    else:
        rec["blocks"] = blocks
    return rec


def write_manifest(folder: Path, kind: str, files: dict, meta: dict) -> None:
    body = {"format": FORMAT, "version": VERSION, "kind": kind, **meta, "files": dict(sorted(files.items()))}
    atomic_write_text(folder / MANIFEST, dumps(body))


def update_manifest(folder: str | os.PathLike, kind: str, **meta) -> dict:
    """Rewrite the manifest of ``folder`` with fields of ``meta`` changed (files and checksums kept)."""
    folder = Path(folder)
    m = read_manifest(folder, kind, "not updated")
    m.update(meta)
    rest = {k: v for k, v in m.items() if k not in ("format", "version", "kind", "files")}
    write_manifest(folder, kind, m["files"], rest)
    return m


# ----------------------------------------------------------------------------------- folders


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


def record_files(folder: str | os.PathLike, kind: str, names: list[str]) -> None:
    """Add the files ``names`` (written by moekit into its folder ``folder``) to its manifest, with checksums."""
    folder = Path(folder)
    m = read_manifest(folder, kind, "not recorded")
    files = {**m["files"], **{n: _record(inside(folder, n)) for n in names}}
    write_manifest(folder, kind, files, {k: v for k, v in m.items() if k not in ("format", "version", "kind", "files")})


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
    d = Path(tempfile.mkdtemp(prefix=_tmp_prefix(final.name, tag), dir=final.parent))
    os.chmod(d, 0o777 & ~_umask())
    return d


def clean_stale(parent: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Tidy what an interrupted moekit write left in ``parent`` (for ``name``, or any), once the
    process that wrote it is gone (a process of this machine: temporaries of another host are left
    alone): a previous version swapped out but not yet replaced goes back under its name; other
    temporary files and folders of moekit's own naming are removed. Returns the paths removed."""
    parent, removed = Path(parent), []
    if not parent.is_dir():
        return removed
    host = _host()
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
        _fsync_dir(final.parent)
        return
    m = read_manifest(final, kind, "not replaced")
    listed = {Path(n).parts[0] for n in m["files"]} | {MANIFEST}
    foreign = sorted(p.name for p in final.iterdir() if p.name not in listed)
    if foreign:
        raise FileExistsError(f"{final}: holds {foreign[:3]} which moekit did not write; move them out, then write again")
    if _exchange(staged, final):
        fault_point("exchanged")
        _fsync_dir(final.parent)
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
    _fsync_dir(final.parent)
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
        self.files[name] = _record(p, blocks)
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
