"""Single files: atomic writes (temporary name, fsync, rename), strict JSON, SHA-256, and paths read
from files kept inside their folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from moekit.io.errors import IntegrityError

_CHUNK = 1 << 20


def fsync_dir(folder: Path) -> None:
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


def host_tag() -> str:
    """A short tag of this machine, so that temporaries are only ever tidied by a process of the same host."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def temp_prefix(name: str, tag: str = "tmp") -> str:
    """``.NAME.moekit-TAG-HOST-PID-``: the name of a temporary moekit writes beside ``NAME``."""
    return f".{name}.moekit-{tag}-{host_tag()}-{os.getpid()}-"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename ``tmp_path`` to ``path`` (created with the
    usual permissions, as ``open`` would)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
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
