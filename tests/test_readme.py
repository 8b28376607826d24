"""The README's Python snippets run as written, in order."""

import re
import socket
from pathlib import Path

import torch.distributed as dist


def test_readme_snippets_run(monkeypatch):
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    # the expert-parallel snippet is a torchrun script: here it runs as a world of one process
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(k, v)
    try:
        exec(compile("\n".join(blocks), "README.md", "exec"), {})
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
