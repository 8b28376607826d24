"""Whole folders: never written into or removed from what moekit did not write; complete or absent when
a write fails or is killed; stale temporaries repaired or removed only when their writer is gone."""

import os
import subprocess
import sys

import pytest

from moekit import io as mio
from moekit.io import (
    check_target,
    clean_stale,
    fault_hook,
    remove_folder,
    verify,
)
from tests.io.folder import tree, write_thing


def test_writing_into_a_folder_moekit_did_not_write_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my work")
    with pytest.raises(FileExistsError, match=r"--out .*mine: exists and holds 1 entries not written by moekit "
                                              r"\(e.g. 'notes.txt'\), not a moekit thing; .*choose another path"):
        write_thing(mine)
    assert tree(mine) == ["notes.txt"] and (mine / "notes.txt").read_text() == "my work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # nothing written beside it either
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a folder"):
        write_thing(tmp_path / "file")
    other = write_thing(tmp_path / "other", kind="model")
    with pytest.raises(FileExistsError, match="holds a moekit model, not a moekit thing"):
        write_thing(other)
    assert check_target(tmp_path / "new", "thing", "--out") is False
    (tmp_path / "empty").mkdir()
    write_thing(tmp_path / "empty")  # an empty folder is fine
    assert verify(tmp_path / "empty", "thing", "")


def test_rewriting_in_place_keeps_foreign_files_and_drops_what_it_no_longer_writes(tmp_path):
    folder = write_thing(tmp_path / "f")
    (folder / "notes.txt").write_text("mine")
    write_thing(folder, {"a.txt": "ALPHA", "c.txt": "gamma"})
    assert tree(folder) == ["a.txt", "c.txt", "moekit.json", "notes.txt", "sub"]
    assert (folder / "notes.txt").read_text() == "mine" and (folder / "a.txt").read_text() == "ALPHA"
    verify(folder, "thing", "")


def test_a_whole_folder_is_swapped_in_and_refuses_foreign_entries(tmp_path):
    folder = write_thing(tmp_path / "f", whole=True)
    write_thing(folder, {"a.txt": "new"}, whole=True)
    assert tree(folder) == ["a.txt", "moekit.json"] and (folder / "a.txt").read_text() == "new"
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds \['notes.txt'\] which moekit did not write"):
        write_thing(folder, {"a.txt": "newer"}, whole=True)
    assert (folder / "a.txt").read_text() == "new" and (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


STAGES_NEW = ["file:a.txt", "file:sub/b.bin", "manifest", "publish"]


@pytest.mark.parametrize("stage", STAGES_NEW)
def test_a_new_folder_is_complete_or_absent_when_a_write_fails(tmp_path, stage):
    def fail(s):
        if s == stage:
            raise OSError(f"disk full at {s}")

    with fault_hook(fail), pytest.raises(OSError, match="disk full"):
        write_thing(tmp_path / "f")
    assert list(tmp_path.iterdir()) == []  # nothing under the name, no temporary left


@pytest.mark.parametrize("exchange", [True, False])
@pytest.mark.parametrize("stage", ["manifest", "publish", "exchanged"])
def test_a_replaced_whole_folder_is_old_or_new_when_a_write_fails(tmp_path, monkeypatch, stage, exchange):
    if not exchange:  # the two-rename path of systems without renameat2
        monkeypatch.setattr(mio.folders, "_exchange", lambda a, b: False)
    folder = write_thing(tmp_path / "f", {"a.txt": "old"}, whole=True)

    def fail(s):
        if s == stage:
            raise OSError("crash")

    with fault_hook(fail), pytest.raises(OSError):
        write_thing(folder, {"a.txt": "new"}, whole=True)
    assert (folder / "a.txt").read_text() == ("new" if stage == "exchanged" and exchange else "old")
    verify(folder, "thing", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


_KILL = """
import os, sys
from moekit import io as mio
mio.folders._exchange = lambda a, b: False  # the two renames, killed between them
with mio.fault_hook(lambda s: os._exit(9) if s == "exchanged" else None):
    with mio.write_folder(sys.argv[1], "thing", whole=True) as w:
        w.write_text("a.txt", "new")
"""


def test_a_kill_between_the_two_renames_is_repaired_on_the_next_write(tmp_path):
    folder = write_thing(tmp_path / "f", {"a.txt": "old"}, whole=True)
    r = subprocess.run([sys.executable, "-c", _KILL, str(folder)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr
    assert not folder.exists()  # the window: the old version aside, the new one staged
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and all(".f.moekit-" in n for n in names)
    clean_stale(tmp_path)  # its writer is gone: the old version goes back, the staged copy is removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"] and (folder / "a.txt").read_text() == "old"


def test_clean_stale_removes_only_dead_writers_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid, host = int(dead.stdout), mio.files.host_tag()
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
    folder = write_thing(tmp_path / "f")
    (folder / "sub" / "mine.txt").write_text("keep")
    remove_folder(folder, "thing")
    assert tree(folder) == ["sub", "sub/mine.txt"]


def test_a_symlinked_folder_is_written_where_it_points_and_outputs_keep_usual_permissions(tmp_path):
    real = write_thing(tmp_path / "real", whole=True)
    (tmp_path / "link").symlink_to(real)
    write_thing(tmp_path / "link", {"a.txt": "through the link"}, whole=True)
    assert (tmp_path / "link").is_symlink() and (real / "a.txt").read_text() == "through the link"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (real.stat().st_mode & 0o777) == 0o777 & ~umask
    assert ((real / "a.txt").stat().st_mode & 0o777) == 0o666 & ~umask


