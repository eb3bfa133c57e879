"""Each subpackage imports only what its ``__init__`` docstring allows (read from the source, not run)."""

import ast
import pathlib

import pytest

import lib_lightning

ROOT = pathlib.Path(lib_lightning.__file__).parent
# package folder -> module prefixes its files must not import
FORBIDDEN = {
    "core": ("lightning", "callbacks", "lib_lightning.tasks", "lib_lightning.cli", "lib_lightning.data"),
    "core/lib": ("lib_lightning.core.metrics", "lib_lightning.core.interpret", "lib_lightning.core.llc"),
    "core/metrics": ("lib_lightning.core.interpret", "lib_lightning.core.llc"),
    "core/interpret": ("lib_lightning.core.metrics", "lib_lightning.core.llc"),
    "tasks/modadd": ("lightning", "callbacks", "lib_lightning.data", "lib_lightning.models"),
}


def _imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def _violations(root: pathlib.Path, folder: str, forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((root / folder).rglob("*.py")):
        for name in _imports(path):
            if any(name == prefix or name.startswith(prefix + ".") for prefix in forbidden):
                bad.append(f"{path.relative_to(root)} imports {name}")
    return bad


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_subpackage_imports_stay_within_its_layer(folder):
    assert list((ROOT / folder).rglob("*.py")), f"no modules in {folder}/"  # not vacuous
    assert _violations(ROOT, folder, FORBIDDEN[folder]) == []


def test_the_check_sees_a_forbidden_import(tmp_path):
    (tmp_path / "core").mkdir()
    (tmp_path / "core" / "bad.py").write_text("import lightning.pytorch as pl\nfrom lib_lightning.tasks import x\n")
    assert _violations(tmp_path, "core", FORBIDDEN["core"]) == [
        "core/bad.py imports lightning.pytorch",
        "core/bad.py imports lib_lightning.tasks",
    ]
