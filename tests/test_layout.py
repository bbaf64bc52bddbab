"""The layout's rules, read from the code: data flows one way between the packages, and the
serving path imports no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _imports(package: str) -> dict[str, set[str]]:
    """file -> the top-level names of every module it imports (anywhere in the file)."""
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package,forbidden", [
    ("training", {"bench"}),
    ("app", {"torch", "transformers"}),
])
def test_no_package_imports_upstream(package, forbidden):
    offenders = {f: sorted(names & forbidden) for f, names in _imports(package).items() if names & forbidden}
    assert not offenders


def test_serving_code_imports_no_training_except_the_cli_that_registers_its_commands():
    offenders = [f for f, names in _imports("app").items() if "training" in names and f != "app/cli.py"]
    assert not offenders


def test_the_offramp_command_loads_no_torch_unless_it_trains():
    code = ("import sys\nfrom app.cli import main\n"
            "for argv in (['serve', '--help'], ['predict', '--help'], ['--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' in sys.modules\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
