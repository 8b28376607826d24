"""moekit.io: atomic folders, checksums verified on load, nothing written into or removed from what
moekit did not write, paths read from files kept inside their folder."""

import hashlib
import json
import os
import subprocess
import sys

import pytest

from moekit import io as mio
from moekit.io import (
    IntegrityError,
    check_report_target,
    check_target,
    clean_stale,
    dumps,
    fault_hook,
    inside,
    remove_folder,
    verify,
    write_folder,
)
from tests.faults import flip_byte, resign, truncate


def _write(folder, files=None, kind="thing", **kw):
    files = files or {"a.txt": "alpha", "sub/b.bin": "beta"}
    with write_folder(folder, kind, "--out", **kw) as w:
        for name, text in files.items():
            w.write_text(name, text)
    return folder


def _tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    folder = _write(tmp_path / "f")
    m = json.loads((folder / "moekit.json").read_text())
    assert m["kind"] == "thing" and m["format"] == "moekit"
    assert m["files"] == {"a.txt": {"bytes": 5, "sha256": hashlib.sha256(b"alpha").hexdigest()},
                          "sub/b.bin": {"bytes": 4, "sha256": hashlib.sha256(b"beta").hexdigest()}}
    assert verify(folder, "thing", "fix")["files"] == m["files"]
    assert _tree(tmp_path) == ["f", "f/a.txt", "f/moekit.json", "f/sub", "f/sub/b.bin"]  # no temporary left


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "extend"])
def test_verify_names_the_damaged_file(tmp_path, damage):
    folder = _write(tmp_path / "f")
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
    folder = _write(tmp_path / "f")
    (folder / "moekit.json").write_text(text)
    with pytest.raises(IntegrityError, match=match):
        verify(folder, "thing", "fix")


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "a/../../outside.txt", "", "a//b", "./a.txt"])
def test_paths_read_from_a_manifest_stay_inside_the_folder(tmp_path, name):
    folder = _write(tmp_path / "f")
    (tmp_path / "outside.txt").write_text("alpha")
    m = json.loads((folder / "moekit.json").read_text())
    m["files"] = {name: {"bytes": 5, "sha256": hashlib.sha256(b"alpha").hexdigest()}}
    (folder / "moekit.json").write_text(json.dumps(m))
    with pytest.raises(IntegrityError, match="leads outside"):
        verify(folder, "thing", "fix")


def test_a_symlink_out_of_the_folder_is_refused(tmp_path):
    folder = _write(tmp_path / "f")
    (tmp_path / "secret").write_text("beta")
    (folder / "sub" / "b.bin").unlink()
    (folder / "sub" / "b.bin").symlink_to(tmp_path / "secret")
    with pytest.raises(IntegrityError, match="leads outside"):
        verify(folder, "thing", "fix")
    with pytest.raises(IntegrityError, match="leads outside"):
        inside(folder, "sub/b.bin")


def test_writing_into_a_folder_moekit_did_not_write_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my work")
    with pytest.raises(FileExistsError, match=r"--out .*mine: exists and holds 1 entries not written by moekit "
                                              r"\(e.g. 'notes.txt'\), not a moekit thing; .*choose another path"):
        _write(mine)
    assert _tree(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written beside it either
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        _write(tmp_path / "file")
    other = _write(tmp_path / "other", kind="model")
    with pytest.raises(FileExistsError, match="holds a moekit model, not a moekit thing"):
        _write(other)
    assert check_target(tmp_path / "new", "thing", "--out") is False
    (tmp_path / "empty").mkdir()
    _write(tmp_path / "empty")  # an empty folder is fine
    assert verify(tmp_path / "empty", "thing", "")


def test_rewriting_in_place_keeps_foreign_files_and_drops_what_it_no_longer_writes(tmp_path):
    folder = _write(tmp_path / "f")
    (folder / "notes.txt").write_text("mine")
    _write(folder, {"a.txt": "ALPHA", "c.txt": "gamma"})
    assert _tree(folder) == ["a.txt", "c.txt", "moekit.json", "notes.txt", "sub"]
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "a.txt").read_text() == "ALPHA"
    verify(folder, "thing", "")


def test_a_whole_folder_is_swapped_in_and_refuses_foreign_entries(tmp_path):
    folder = _write(tmp_path / "f", whole=True)
    _write(folder, {"a.txt": "new"}, whole=True)
    assert _tree(folder) == ["a.txt", "moekit.json"] and (folder / "a.txt").read_text() == "new"
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\] which moekit did not write"):
        _write(folder, {"a.txt": "newer"}, whole=True)
    assert (folder / "a.txt").read_text() == "new" and (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


STAGES_NEW = ["file:a.txt", "file:sub/b.bin", "manifest", "publish"]


@pytest.mark.parametrize("stage", STAGES_NEW)
def test_a_new_folder_is_complete_or_absent_when_a_write_fails(tmp_path, stage):
    def fail(s):
        if s == stage:
            raise OSError(f"disk full at {s}")

    with fault_hook(fail), pytest.raises(OSError, match="disk full"):
        _write(tmp_path / "f")
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no temporary left


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("stage", ["manifest", "publish", "exchanged"])
def test_a_replaced_whole_folder_is_old_or_new_when_a_write_fails(tmp_path, monkeypatch, stage, exchange):
    if not exchange:  # the two-rename path of systems without renameat2
        monkeypatch.setattr(mio, "_exchange", lambda a, b: False)
    folder = _write(tmp_path / "f", {"a.txt": "old"}, whole=True)

    def fail(s):
        if s == stage:
            raise OSError("crash")

    with fault_hook(fail), pytest.raises(OSError):
        _write(folder, {"a.txt": "new"}, whole=True)
    assert (folder / "a.txt").read_text() == ("new" if stage == "exchanged" and exchange else "old")
    verify(folder, "thing", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


_KILL = """
import os, sys
from moekit import io as mio
mio._exchange = lambda a, b: False  # the two renames, killed between them
with mio.fault_hook(lambda s: os._exit(9) if s == "exchanged" else None):
    with mio.write_folder(sys.argv[1], "thing", whole=True) as w:
        w.write_text("a.txt", "new")
"""


def test_a_kill_between_the_two_renames_is_repaired_on_the_next_write(tmp_path):
    folder = _write(tmp_path / "f", {"a.txt": "old"}, whole=True)
    r = subprocess.run([sys.executable, "-c", _KILL, str(folder)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert not folder.exists()  # the window: the old version aside, the new one staged
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(".f.moekit-" in n for n in names)
    clean_stale(tmp_path)  # its writer is gone: the old version goes back, the staged copy is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (folder / "a.txt").read_text() == "old"


def test_clean_stale_removes_only_dead_writers_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(dead.stdout), mio._host()
    (tmp_path / f".x.moekit-tmp-{host}-{pid}-abc").mkdir()
    (tmp_path / f".y.moekit-tmp-{host}-{pid}-abc").write_text("a half-written file")
    (tmp_path / f".x.moekit-tmp-{host}-{os.getpid()}-abc").mkdir()  # a writer alive (this process)
    (tmp_path / f".x.moekit-tmp-0badc0de-{pid}-abc").mkdir()  # another machine's (a shared file system)
    (tmp_path / ".x.tmp-123-abc").mkdir()  # not moekit's naming
    (tmp_path / "mine").mkdir()
    (tmp_path / f".z.moekit-tmp-{host}-{pid}-abc").symlink_to(tmp_path / "mine")  # a link: never followed
    assert [p.name for p in clean_stale(tmp_path)] == [f".x.moekit-tmp-{host}-{pid}-abc",
                                                        f".y.moekit-tmp-{host}-{pid}-abc"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".x.moekit-tmp-{host}-{os.getpid()}-abc", f".x.moekit-tmp-0badc0de-{pid}-abc", ".x.tmp-123-abc", "mine",
         f".z.moekit-tmp-{host}-{pid}-abc"])


def test_remove_folder_removes_only_listed_files(tmp_path):
    folder = _write(tmp_path / "f")
    (folder / "sub" / "mine.txt").write_text("keep")
    remove_folder(folder, "thing")
    assert _tree(folder) == ["sub", "sub/mine.txt"]


def test_strict_json_and_reports(tmp_path):
    assert json.loads(dumps({"loss": float("nan"), "x": [float("inf"), 1.5]})) == {"loss": None, "x": [None, 1.5]}
    with pytest.raises(ValueError):
        json.dumps(float("nan"), allow_nan=False)  # what dumps avoids
    for text in ('{"mine": 1}', '"notes on my benchmark runs"', '["benchmark"]', '{"benchmark": "mine"}', "{"):
        (tmp_path / "notes.json").write_text(text)
        with pytest.raises(FileExistsError, match="exists and is not a moekit layer report"):
            check_report_target(tmp_path / "notes.json", "--out", "layer")
    with pytest.raises(FileExistsError, match="give a file path ending in .json"):
        check_report_target(tmp_path / "figure.png", "--out", "layer")
    (tmp_path / "bench.json").write_text('{"benchmark": "layer"}')
    check_report_target(tmp_path / "bench.json", "--out", "layer")
    check_report_target(tmp_path / "new.json", "--out", "layer")


def test_a_symlinked_folder_is_written_where_it_points_and_outputs_keep_usual_permissions(tmp_path):
    real = _write(tmp_path / "real", whole=True)
    (tmp_path / "link").symlink_to(real)
    _write(tmp_path / "link", {"a.txt": "through the link"}, whole=True)
    assert (tmp_path / "link").is_symlink() and (real / "a.txt").read_text() == "through the link"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (real.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((real / "a.txt").stat().st_mode & 0o777) == 0o666 & ~umask


def test_resign_helper_is_independent(tmp_path):
    folder = _write(tmp_path / "f")
    (folder / "a.txt").write_text("edited")
    with pytest.raises(IntegrityError):
        verify(folder, "thing", "")
    resign(folder)
    verify(folder, "thing", "")


def test_an_interrupted_rewrite_in_place_refuses_to_load(tmp_path):
    """A folder saved again over itself (a model) is rewritten file by file, its manifest last: a
    failure in between leaves a folder that names the file that no longer matches, never a mix that loads."""
    folder = _write(tmp_path / "f", {"a.txt": "old a", "b.txt": "old b"})

    def fail(s):
        if s == "file:b.txt":
            raise OSError("killed")

    with fault_hook(fail), pytest.raises(OSError):
        _write(folder, {"a.txt": "new a", "b.txt": "new b"})
    with pytest.raises(IntegrityError, match=r"a.txt: checksum mismatch"):
        verify(folder, "thing", "")
    _write(folder, {"a.txt": "new a", "b.txt": "new b"})  # saving again repairs it
    verify(folder, "thing", "")
