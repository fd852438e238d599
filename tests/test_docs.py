"""docs/configuration.md's settings tables are generated from the settings classes and must match."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_configuration_settings_tables_match_the_code():
    generated = subprocess.run(
        [sys.executable, "tools/settings_table.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    readme = (REPO / "docs" / "configuration.md").read_text()
    begin, end = "<!-- SETTINGS:BEGIN -->\n", "<!-- SETTINGS:END -->"
    documented = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert documented == generated, (
        "docs/configuration.md settings are stale: run `make docs` or paste `python tools/settings_table.py` between "
        "the markers"
    )


def test_api_reference_matches_the_proto_comments():
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "gen_api_docs.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_relative_links_in_the_readme_and_docs_point_to_files():
    import re

    broken = []
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "clients" / "python" / "README.md"]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken
