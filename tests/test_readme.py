"""The README's Python snippets run as written, in order."""

import re
from pathlib import Path


def test_readme_snippets_run():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    exec(compile("\n".join(blocks), "README.md", "exec"), {})
