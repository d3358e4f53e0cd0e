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
