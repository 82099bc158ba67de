"""The docs stay true to the package: the README's Layout names every module, module docstrings
say what and why, with measured figures in docs/EXPERIMENTS.md instead, and the README's test
command is what CI runs, the whole suite.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(p for p in (ROOT / "minigpt").glob("*.py") if p.name != "__init__.py")
# machine names and speed units: what a measurement looks like, not a design reason
MEASURED = re.compile(r"EPYC|Zen ?\d|Milan|Xeon|H100|H200|AVX2 box|\d-core|"
                      r"\d[\d,.]*k? ?(?:tok/s|tokens/s|ms|GB/s|GFLOP/s)\b")


def test_readme_layout_names_every_module():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n```", layout.index("```") + 3)]
    named = set(re.findall(r"^  (\w+)(?:, (\w+))?\s", layout, re.M))
    named = {n for pair in named for n in pair if n}
    missing = [p.stem for p in MODULES if p.stem not in named]
    assert not missing, f"README Layout does not name: {missing}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_module_docstring_holds_no_measurements(path):
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    found = MEASURED.findall(doc)
    assert not found, f"{path.name}: {found} belongs in docs/EXPERIMENTS.md or beside its bench"


def test_ci_runs_the_readmes_test_command_and_it_runs_every_test():
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index("Run the tests"):]
    command = block[block.index("```bash\n") + 8:].splitlines()[0]
    assert command == "python -m pytest -q"
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, ".ci/run must run the README's test command"
    addopts = re.findall(r"^addopts\s*=(.*)$", (ROOT / "pyproject.toml").read_text(), re.M)
    assert not any(re.search(r"(^|\W)-m\b", a) for a in addopts), "the README's command deselects nothing"
    assert 'python -m pytest -q -m "not slow"' in readme  # the quick loop, documented
