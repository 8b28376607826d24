"""Damage done on purpose: flipped bytes, truncation, hand edits (re-signed to reach the check
behind the checksum). Written independently of moekit.io: a manifest is read as plain JSON."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Flip every bit of one byte of ``path`` (the middle one by default); returns its offset."""
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset % len(data)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    return i


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def resign(folder: Path) -> None:
    """Record the current size and SHA-256 of every file ``moekit.json`` lists, as if moekit had
    written them so: a hand edit then reaches the checks behind the checksums."""
    man = folder / "moekit.json"
    m = json.loads(man.read_text())
    for name, rec in m["files"].items():
        data = (folder / name).read_bytes()
        rec["bytes"] = len(data)
        if "sha256" in rec:
            rec["sha256"] = hashlib.sha256(data).hexdigest()
    man.write_text(json.dumps(m))


def edit_json(path: Path, edit) -> None:
    """Apply ``edit(dict)`` to a JSON file and re-sign its folder's manifest."""
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))
    if (path.parent / "moekit.json").exists():
        resign(path.parent)
