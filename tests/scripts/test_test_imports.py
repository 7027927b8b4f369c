"""The tests' own scripts (benchmarks, the subprocess probes of tests/support) import pack modules that
exist. They run outside pytest's collection (a benchmark by hand, a probe in a subprocess), so a module
renamed or split (nodes/pipeline_nodes.py became one module per node) left their imports failing only
when someone ran them."""

from __future__ import annotations

import ast

from headseg.tests.support.server import REPO_ROOT


def _pack_modules(source: str) -> list[tuple[int, str]]:
    """(line, dotted path below the pack) of every `import headseg.x.y` / `from headseg.x import y` in
    ``source``; a `from headseg.x import y` gives 'x.y' (y may be a module or a name in x)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("headseg."):
            base = node.module.split(".", 1)[1]
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".", 1)[1]) for a in node.names if a.name.startswith("headseg.")]
    return found


def _module_file(parts: list[str]):
    """The checkout's file of module or package ``parts`` (['nodes', 'kmeans_node']), or None."""
    path = REPO_ROOT.joinpath(*parts)
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(source: str) -> set[str]:
    """The names a module's source binds at its top level: functions, classes, assignments, imports."""
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _exists(dotted: str) -> bool:
    """Whether 'nodes.kmeans_node' names a module or package of the checkout, or 'nodes.kmeans_node.MultiKMeans'
    a name that module binds at its top level."""
    parts = dotted.split(".")
    if _module_file(parts) is not None:
        return True
    parent = _module_file(parts[:-1])
    return parent is not None and parts[-1] in _top_level_names(parent.read_text(encoding="utf-8"))


def test_the_benchmarks_and_probes_import_pack_modules_that_exist():
    scripts = sorted((REPO_ROOT / "tests" / "bench").glob("*.py")) + sorted((REPO_ROOT / "tests" / "support").glob("*.py"))
    assert any(p.name == "text_encoding_probe.py" for p in scripts)
    missing = [
        f"{path.relative_to(REPO_ROOT)}:{line}: headseg.{dotted}"
        for path in scripts
        for line, dotted in _pack_modules(path.read_text(encoding="utf-8"))
        if not _exists(dotted)
    ]
    assert missing == [], "imports of pack modules the checkout lacks: " + ", ".join(missing)
