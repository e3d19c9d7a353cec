"""DeepSpeed is imported in megalm.engine only, and the DeepSpeed range megalm tests with is the
one pyproject.toml requires and start-up checks."""

from __future__ import annotations

import ast
import pathlib
import tomllib

import pytest

from megalm.engine.version import REQUIREMENT, TESTED, check_deepspeed, parse
from megalm.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGES = ("megalm", "data_prep", "launcher")


def deepspeed_imports(path: pathlib.Path) -> list[int]:
    """Line numbers of every `import deepspeed...` / `from deepspeed... import` in a file."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "deepspeed" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "deepspeed":
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and str(node.args[0].value).split(".")[0] == "deepspeed":
            lines.append(node.lineno)
    return lines


def test_deepspeed_is_imported_in_megalm_engine_only():
    outside = [f"{p.relative_to(ROOT)}:{line}" for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
               if p.parent != ROOT / "megalm" / "engine" for line in deepspeed_imports(p)]
    assert outside == [], f"DeepSpeed imported outside megalm/engine/: {outside}"
    inside = [p.name for p in sorted((ROOT / "megalm" / "engine").glob("*.py")) if deepspeed_imports(p)]
    assert {"runtime.py", "checkpoint_engine.py", "layout.py", "muon.py", "universal.py"} <= set(inside)


def test_the_check_finds_each_spelling(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\nimport deepspeed\nfrom deepspeed.pipe import X\ndef f():\n"
                   "    import deepspeed.comm as c\n    importlib.import_module('deepspeed.utils')\n"
                   "from .deepspeed import y\n")
    assert deepspeed_imports(src) == [2, 3, 5, 6]


def test_pyproject_requires_the_tested_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert REQUIREMENT in deps
    low, high = TESTED
    assert REQUIREMENT == f"deepspeed>={'.'.join(map(str, low))},<{high[0]}.{high[1]}" and high[2] == 0


def test_installed_deepspeed_is_in_range_and_others_are_refused_in_one_line():
    assert parse(check_deepspeed()) >= TESTED[0]  # what CI installs passes
    for version in ("0.16.0", "0.19.7", "0.20.0", "1.0.0rc1"):
        with pytest.raises(UserError) as info:
            check_deepspeed(version)
        msg = str(info.value)
        assert "\n" not in msg and version in msg and REQUIREMENT in msg
    assert check_deepspeed("0.19.9+cu130") == "0.19.9+cu130"
