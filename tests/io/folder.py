"""A small moekit folder of kind ``thing`` for the io tests."""

from moekit.io import write_folder


def write_thing(folder, files=None, kind="thing", **kw):
    files = files or {"a.txt": "alpha", "sub/b.bin": "beta"}
    with write_folder(folder, kind, "--out", **kw) as w:
        for name, text in files.items():
            w.write_text(name, text)
    return folder


def tree(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
