"""The house's layers: arrows point down only, and no module imports itself in a circle.

The layer contract lives in pyproject.toml (``[tool.importlinter]``) and ``make lint`` runs it;
these tests show that the contract holds today, that it really fails on a wrong-way import,
and that the whole import graph (lazy imports inside functions included) has no cycle.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"})


def test_the_layer_contract_holds():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_a_core_module_importing_the_pipeline_breaks_the_contract(tmp_path):
    for name in ("bbadapt", "converters"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "data"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    spec = tmp_path / "bbadapt" / "core" / "spec.py"
    spec.write_text(spec.read_text() + "\n\ndef _wrong_way():\n    from bbadapt import pipeline  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "bbadapt.core is not allowed to import bbadapt.pipeline" in result.stdout


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("bbadapt", "converters")
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if state.get(imported) == 1:
                cycles.append(path[path.index(imported):] + [imported])
            elif imported not in state:
                visit(imported, path + [imported])
        state[module] = 2

    for module in sorted(graph.modules):
        if module not in state:
            visit(module, [module])
    # no exception, not even a package's __init__: the registry and its builders once formed one
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_architecture_registry_does_not_import_its_builders():
    """The builders' package imports the registry and registers itself; the reverse arrow made a circle."""
    graph = grimp.build_graph("bbadapt")
    assert "bbadapt.core.architectures" not in graph.find_modules_directly_imported_by("bbadapt.core.registry")
    assert graph.find_shortest_chain(importer="bbadapt.core.registry", imported="bbadapt.core.architectures") is None


def test_every_public_name_is_what_the_readme_says_even_after_its_subpackages_are_imported():
    """A subpackage named like a public function (bbadapt.check) would replace it once imported."""
    code = ("import bbadapt, bbadapt.verify.equivalence, bbadapt.pipeline, bbadapt.bundle.backbone\n"
            "assert callable(bbadapt.check) and bbadapt.check.__name__ == 'check'\n"
            "assert all(not isinstance(getattr(bbadapt, n), type(bbadapt)) for n in bbadapt.__all__), "
            "[n for n in bbadapt.__all__ if isinstance(getattr(bbadapt, n), type(bbadapt))]\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
