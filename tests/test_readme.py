"""The README's Python snippet runs, and its quick-start commands are the ones .ci/run executes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_readme_python_snippet_runs(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "README.md has no ```python block"
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        namespace = {"__name__": "__readme__"}
        exec(compile(code, "README.md", "exec"), namespace)
    out = capsys.readouterr().out
    assert "step 4: negative VLB per frame" in out
    assert "torch.Size([2, 30, 20]) torch.Size([8, 30, 20])" in out


def test_readme_quick_start_commands():
    assert "pip install -e . && pyro-dvae fit --model srnn" in README
    assert 'pip install -e ".[test]" && pytest -q' in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" && pytest -q' in ci
