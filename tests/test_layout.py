"""The library stands alone: no module under src/slimvlm imports the lab (experiments/), which is
not installed with it. What library code needs lives in the library."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "slimvlm"
LAB = "experiments"


def lab_imports(path: Path) -> list[str]:
    """'line: module' for each import of the lab in a source file (absolute imports; the lab is not
    inside the package, so no relative import can reach it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [f"{node.lineno}: {name}" for name in names if name == LAB or name.startswith(LAB + ".")]
    return found


def test_the_library_never_imports_the_lab():
    sources = sorted(SRC.rglob("*.py"))
    assert len(sources) > 20  # the package is where this test looks
    offenders = {str(path.relative_to(SRC)): found for path in sources if (found := lab_imports(path))}
    assert not offenders, f"library modules import the lab: {offenders}"


def test_the_check_sees_every_form_of_import(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nimport experiments.testbed\nfrom experiments import dualspeed\n"
                      "def f():\n    from experiments.testbed.train import train\nfrom .experiments import x\n")
    assert lab_imports(source) == ["2: experiments.testbed", "3: experiments", "5: experiments.testbed.train"]


def package_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports when it runs (at module level or inside functions,
    not under `if TYPE_CHECKING:`, which never runs); a package's own __init__ counts as the package. Parents a
    submodule import implies are left out: every module has them."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        tree = ast.parse(path.read_text(encoding="utf-8"))
        typing_only = {id(inner) for node in ast.walk(tree)
                       if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
                       for inner in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else (node.module or "")
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    found.add(target if target in modules else base)
            elif isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
        graph[name] = {target for target in found if target in modules and target != name}
    return graph


def import_loops(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or around a loop (strongly connected components)."""
    order, low, stack, loops, counter = {}, {}, [], [], [0]

    def visit(module: str) -> None:
        order[module] = low[module] = counter[0]
        counter[0] += 1
        stack.append(module)
        for target in graph[module]:
            if target not in order:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], order[target])
        if low[module] == order[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                loops.append(sorted(group))

    for module in sorted(graph):
        if module not in order:
            visit(module)
    return loops


def test_no_module_of_the_package_imports_itself_around_a_loop():
    graph = package_imports(SRC)
    assert len(graph) > 40 and graph["slimvlm.api"]  # the package, and its imports seen
    assert import_loops(graph) == []


def test_the_loop_check_finds_a_loop(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .sub import b\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (package / "c.py").write_text("import pkg.a\n")
    (package / "d.py").write_text("from . import a\nimport pkg.e\n")  # imports into the loop, is not part of it
    (package / "e.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import d\n")  # never runs
    assert import_loops(package_imports(package)) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
