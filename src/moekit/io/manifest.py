"""The manifest ``moekit.json`` of every moekit folder: its kind and each file's size and SHA-256
(or the per-block checksums that guard it); reading, verifying and updating it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from moekit.io.errors import IntegrityError
from moekit.io.files import atomic_write_text, dumps, inside, read_json, sha256_file

MANIFEST = "moekit.json"
FORMAT = "moekit"
VERSION = 1


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


def file_record(path: Path, blocks: str | None = None) -> dict:
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


def record_files(folder: str | os.PathLike, kind: str, names: list[str]) -> None:
    """Add the files ``names`` (written by moekit into its folder ``folder``) to its manifest, with checksums."""
    folder = Path(folder)
    m = read_manifest(folder, kind, "not recorded")
    files = {**m["files"], **{n: file_record(inside(folder, n)) for n in names}}
    write_manifest(folder, kind, files, {k: v for k, v in m.items() if k not in ("format", "version", "kind", "files")})
