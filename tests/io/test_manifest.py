"""The manifest moekit.json: sizes and SHA-256 recorded, every damage named on load, paths kept inside the folder."""

import hashlib
import json

import pytest

from moekit.io import (
    IntegrityError,
    fault_hook,
    inside,
    verify,
)
from tests.faults import flip_byte, resign, truncate
from tests.io.folder import tree, write_thing


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    folder = write_thing(tmp_path / "f")
    m = json.loads((folder / "moekit.json").read_text())
    assert m["kind"] == "thing" and m["format"] == "moekit"
    assert m["files"] == {"a.txt": {"bytes": 5, "sha256": hashlib.sha256(b"alpha").hexdigest()},
                          "sub/b.bin": {"bytes": 4, "sha256": hashlib.sha256(b"beta").hexdigest()}}
    assert verify(folder, "thing", "fix")["files"] == m["files"]
    assert tree(tmp_path) == ["f", "f/a.txt", "f/moekit.json", "f/sub", "f/sub/b.bin"]  # no temporary left


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "extend"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    folder = write_thing(tmp_path / "f")
    target = folder / "sub" / "b.bin"
    if damage == "flip":
        flip_byte(target)
        want = r"sub/b.bin: checksum mismatch \(corrupt, or changed since moekit wrote it\); fix it so"
    elif damage == "truncate":
        truncate(target)
        want = r"sub/b.bin: 2 bytes, moekit.json records 4 \(truncated or replaced\); fix it so"
    elif damage == "missing":
        target.unlink()
        want = r"sub/b.bin: missing \(listed in moekit.json\); fix it so"
    else:
        target.write_text("beta!")
        want = r"sub/b.bin: 5 bytes, moekit.json records 4"
    with pytest.raises(IntegrityError, match=want):
        verify(folder, "thing", "fix it so")
    verify(folder, "thing", "fix", only=["a.txt"])  # the other file is intact


@pytest.mark.parametrize("text,match", [
    ("{not json", r"moekit.json: not valid JSON \(Expecting property name"),
    ('["a list"]', "moekit.json: expected a JSON object, got list"),
    ('{"format": "other", "files": {}}', "moekit.json: not a moekit manifest"),
    ('{"format": "moekit", "version": 99, "kind": "thing", "files": {}}', "manifest version 99, this moekit reads 1"),
    ('{"format": "moekit", "version": 1, "kind": "model", "files": {}}', "a moekit model, not a thing"),
])
def test_a_broken_manifest_is_an_error_naming_it(tmp_path, text, match):
    folder = write_thing(tmp_path / "f")
    (folder / "moekit.json").write_text(text)
    with pytest.raises(IntegrityError, match=match):
        verify(folder, "thing", "fix")


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "", "a//b", "./a.txt"])
def test_paths_read_from_a_manifest_stay_inside_the_folder(tmp_path, name):
    folder = write_thing(tmp_path / "f")
    (tmp_path / "outside.txt").write_text("alpha")
    m = json.loads((folder / "moekit.json").read_text())
    m["files"] = {name: {"bytes": 5, "sha256": hashlib.sha256(b"alpha").hexdigest()}}
    (folder / "moekit.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="leads outside"):
        verify(folder, "thing", "fix")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = write_thing(tmp_path / "f")
    (tmp_path / "secret").write_text("beta")
    (folder / "sub" / "b.bin").unlink()
    (folder / "sub" / "b.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(IntegrityError, match="leads outside"):
        verify(folder, "thing", "fix")
    with pytest.raises(IntegrityError, match="leads outside"):
        inside(folder, "sub/b.bin")


def test_resign_helper_is_independent(tmp_path):
    folder = write_thing(tmp_path / "f")
    (folder / "a.txt").write_text("edited")
    with pytest.raises(IntegrityError):
        verify(folder, "thing", "")
    resign(folder)
    verify(folder, "thing", "")


def test_an_interrupted_rewrite_in_place_refuses_to_load(tmp_path):
    """A folder saved again over itself (a model) is rewritten file by file, its manifest last: a
    failure in between leaves a folder that names the file that no longer matches, never a mix that loads."""
    folder = write_thing(tmp_path / "f", {"a.txt": "old a", "b.txt": "old b"})

    def fail(s):
        if s == "file:b.txt":
            raise OSError("killed")

    with fault_hook(fail), pytest.raises(OSError):
        write_thing(folder, {"a.txt": "new a", "b.txt": "new b"})
    with pytest.raises(IntegrityError, match=r"a.txt: checksum mismatch"):
        verify(folder, "thing", "")
    write_thing(folder, {"a.txt": "new a", "b.txt": "new b"})  # saving again repairs it
    verify(folder, "thing", "")
