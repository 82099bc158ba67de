"""dvc.yaml's code deps are exactly what each stage script imports, transitively.

DVC re-runs a stage when one of its deps changes, so a missing module means stale cached outputs
after a code change, and an extra one means needless re-runs. `minigpt/config.py` (with the
loader it builds on, `minigpt/schema.py`) is the one deliberate exception: its schema is checked
against params.yaml (tests/test_config.py), and listing it would re-run the whole pipeline for a
new knob in one section.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOT_A_DEP = {"minigpt/config.py", "minigpt/schema.py", "minigpt/__init__.py"}


def _imports(path: Path) -> set[str]:
    """minigpt modules (as repo paths) imported anywhere in `path`, including inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "minigpt":
            if node.module == "minigpt":  # `from minigpt import sft`
                found |= {f"minigpt/{a.name}.py" for a in node.names}
            else:
                found.add(node.module.replace(".", "/") + ".py")
        elif isinstance(node, ast.Import):
            found |= {a.name.replace(".", "/") + ".py" for a in node.names
                      if a.name.split(".")[0] == "minigpt" and "." in a.name}
    return {p for p in found if (ROOT / p).is_file()}


def transitive_imports(script: str) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for dep in _imports(ROOT / todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def _stages() -> list[tuple[str, str, set[str]]]:
    """(stage name, script, code deps) for every stage; foreach stages once (deps are per item)."""
    out = []
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        body = stage.get("do", stage)
        deps = {d if isinstance(d, str) else next(iter(d)) for d in body["deps"]}
        script = next(w for w in body["cmd"].split() if w.startswith("stages/") and w.endswith(".py"))
        out.append((name, script, {d for d in deps if d.endswith(".py")}))
    return out


@pytest.mark.parametrize("name,script,deps", _stages(), ids=[s[0] for s in _stages()])
def test_code_deps_are_the_transitive_imports(name, script, deps):
    assert script in deps, f"{name}: its own script {script} is not a dep"
    expected = (transitive_imports(script) - NOT_A_DEP) | {script}
    assert deps == expected, (f"{name}: missing {sorted(expected - deps)}, "
                              f"not imported {sorted(deps - expected)}")


def test_transitive_imports_follow_function_level_imports(tmp_path):
    # checkpoint.load_model imports model lazily; the walk must see it.
    assert "minigpt/model.py" in transitive_imports("minigpt/checkpoint.py")
