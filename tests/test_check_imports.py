"""``scripts/check_imports.py`` finds circles hidden in functions and upward imports, and passes the
package as it is (CI runs it through ``scripts/test.sh``)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("check_imports", REPO / "scripts" / "check_imports.py")
assert spec is not None and spec.loader is not None
check_imports = importlib.util.module_from_spec(spec)
sys.modules["check_imports"] = check_imports
spec.loader.exec_module(check_imports)


def package(root: Path, files: dict[str, str]) -> Path:
    for name, text in {"__init__.py": "", **files}.items():
        path = root / "radiodiff_resume" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_circle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    root = package(tmp_path, {
        "a.py": "from radiodiff_resume import b\n",
        "b.py": "def f():\n    from radiodiff_resume.a import x\n    return x\n",
        "c.py": "import typing as tp\nif tp.TYPE_CHECKING:\n    from radiodiff_resume.a import x\n",
    })
    [found] = check_imports.problems(root)
    assert found.startswith("import circle: radiodiff_resume.a → radiodiff_resume.b; radiodiff_resume.b → "
                            "radiodiff_resume.a"), found


def test_a_lower_layer_importing_the_trainer_is_found(tmp_path: Path) -> None:
    root = package(tmp_path, {"guard/__init__.py": "", "guard/x.py": "from .. import run\n",
                              "run.py": "", "checkpoint/__init__.py": "", "checkpoint/y.py": "import json\n"})
    assert check_imports.problems(root) == [
        "upward import: radiodiff_resume.guard.x → radiodiff_resume.run (guard/ never imports trainer, run, "
        "cli)"]


def test_the_package_has_no_circle_and_no_upward_import() -> None:
    assert check_imports.problems(REPO) == []
