"""The README's Python snippets run as written, in order."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path


def test_readme_snippets_run(tmp_path):
    """In a fresh process, so that what the snippets register (a router, an FFN kind, a cache policy,
    methods) stays out of the other tests."""
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    # the expert-parallel snippet is a torchrun script: here it runs as a world of one process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    script = tmp_path / "readme_snippets.py"
    end = "import torch.distributed as dist\nif dist.is_initialized():\n    dist.destroy_process_group()\n"
    script.write_text("\n".join([*blocks, end]))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_every_test_the_readme_names_exists():
    """The guarantees section backs each claim with a named test: the names must be real."""
    import re

    root = Path(__file__).parent
    text = (root.parent / "README.md").read_text()
    found, current = [], None
    for file, name, prefix in re.findall(r"`((?:\w+/)?test_\w+\.py)?(?:::(test_\w+)(…)?)?`", text):
        current = file or current
        if name:
            found.append((current, name, bool(prefix)))
        elif file:
            assert (root / file).exists(), file
    assert len(found) >= 20
    for file, name, prefix in found:
        source = (root / file).read_text()
        end = "" if prefix else r"\b"
        assert re.search(rf"def {name}{end}", source), f"{file}::{name}"
