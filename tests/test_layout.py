"""The layout is the architecture: a plane imports `services`, never another plane; the
core (`services/`) imports no plane, except its entry points (`services/launch/`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLANES = ("streaming", "training", "serving")
MAX_MODULE_LINES = 300


def imported_modules(source: str) -> set[str]:
    """Every module a source file imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def package_of(module: str) -> str:
    """"services.launch.cli" -> "services.launch"; "training.step" -> "training"."""
    parts = module.split(".")
    return "services.launch" if parts[:2] == ["services", "launch"] else parts[0]


def forbidden(importer: str, imported: str) -> bool:
    """Whether module `importer` may not import module `imported`."""
    source, target = package_of(importer), package_of(imported)
    if source in PLANES:
        return target != source and target in (*PLANES, "bench", "services.launch")
    if source == "services":
        return target in (*PLANES, "bench", "services.launch")
    return False  # the entry points, bench and tests may use everything


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


def source_files() -> list[Path]:
    return sorted(p for package in ("services", *PLANES) for p in (ROOT / package).rglob("*.py"))


def test_no_plane_imports_another_plane_and_the_core_imports_none():
    violations = [f"{module_name(path)} imports {imported}"
                  for path in source_files()
                  for imported in sorted(imported_modules(path.read_text()))
                  if forbidden(module_name(path), imported)]
    assert len(source_files()) > 20  # the walk found the tree
    assert not violations, violations


def test_the_import_rule_catches_each_kind_of_violation():
    lazy = "def f():\n    from serving.app import build_app\n"
    assert "serving.app" in imported_modules(lazy)  # imports inside functions count too
    assert forbidden("streaming.shard", "training.step")
    assert forbidden("serving.app", "bench.check")
    assert forbidden("services.model", "streaming.replay")
    assert forbidden("training.round", "services.launch.stack")
    assert not forbidden("services.launch.stack", "serving.app")
    assert not forbidden("training.round", "services.registry")
    assert not forbidden("bench.serve", "serving.app")


def test_every_module_does_one_job_in_at_most_300_lines():
    modules = [p for p in sorted(ROOT.glob("*/**/*.py"))
               if p.relative_to(ROOT).parts[0] in ("services", *PLANES, "bench", "deploy")]
    long = {module_name(p): n for p in modules
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


def test_every_module_imports():
    """A module no test imports (a benchmark, an entry point) still has to load: a stale
    import after a move fails here rather than when someone runs it."""
    import importlib

    modules = [module_name(p) for p in sorted(ROOT.glob("*/**/*.py"))
               if p.relative_to(ROOT).parts[0] in ("services", *PLANES, "bench")
               and p.name != "__init__.py"]
    assert len(modules) > 50
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001 - report every module that fails
            failed[name] = f"{type(err).__name__}: {err}"
    assert not failed, failed
