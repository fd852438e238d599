"""The README's configuration tables are generated from the settings classes and must match."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_readme_settings_tables_match_the_code():
    generated = subprocess.run([sys.executable, "tools/settings_table.py"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    readme = (REPO / "README.md").read_text()
    begin, end = "<!-- SETTINGS:BEGIN -->\n", "<!-- SETTINGS:END -->"
    documented = readme[readme.index(begin) + len(begin) : readme.index(end)]
    assert documented == generated, "README settings are stale: paste `python tools/settings_table.py` between the markers"


def test_api_reference_matches_the_proto_comments():
    result = subprocess.run([sys.executable, str(REPO / "tools" / "gen_api_docs.py"), "--check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
