"""Every bench script imports: a name moved in the product breaks its bench here, not at the next run."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO

IMPORT_ALL = """
import importlib.util, sys
sys.path.insert(0, "bench")
for path in sorted(__import__("pathlib").Path("bench").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    # Registered under its name: dataclasses look the module up.
    module = sys.modules[f"bench_{path.stem}"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # top level only: each runs under __main__ alone
"""


def test_every_bench_script_imports():
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_every_project_import_in_the_benches_resolves_also_inside_functions():
    """Imports inside functions run only when a bench reaches them: check each names a real module and attribute."""
    import ast
    import importlib

    missing = []
    for path in sorted((REPO / "bench").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.split(".")[0] in ("rm_service", "rm_client", "policy_trainer")
            ):
                try:
                    module = importlib.import_module(node.module)
                except ImportError as exc:
                    missing.append(f"{path.name}:{node.lineno} {node.module}: {exc}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}:{node.lineno} {node.module}.{alias.name}")
    assert not missing, missing
