"""The README's core example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_core_example_runs(capsys):
    text = README.read_text()
    block = re.search(r"<!-- example: core -->\n```python\n(.*?)```", text, re.S)
    assert block, "the core example is missing from the README"
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[") and "torch.Size" in out[2]
