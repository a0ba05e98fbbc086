"""The test suite needs nothing beside the clone: CI names no path of one machine, and the tests of
the full reference files skip, saying why, where ../shared/data is absent, while their fixture
twins in tests/fixtures/ still run.

    python -m pytest tests/test_clone.py -q
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from conftest import FIXTURES, ROOT


def test_ci_names_no_absolute_path():
    body = (ROOT / ".ci" / "run").read_text().splitlines()[1:]  # past the #! line
    # An absolute path starts a word: after a space, quote, `=` or `(`; `$(dirname "$0")/..` is relative.
    found = [m for line in body for m in re.findall(r"""(?:^|[\s"'=(])(/[A-Za-z][^\s"';)]*)""", line)]
    assert [p for p in found if p != "/dev/null"] == []


def test_fixtures_are_small_and_say_where_they_come_from():
    files = [p for p in FIXTURES.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 100_000
    readme = (FIXTURES / "README.md").read_text()
    for p in files:
        if p.name != "README.md":
            assert p.name.split(".")[0] in readme or p.parent.name in readme, f"{p} is not in tests/fixtures/README.md"
    assert "MIT License" in readme and "our own words" in readme


def test_reference_tests_skip_without_shared_data(tmp_path):
    """A copy of the tests with no ../shared beside it: the full-file tests skip, the rest pass."""
    clone = tmp_path / "clone"
    (clone / "tests").mkdir(parents=True)
    shutil.copy(ROOT / "pyproject.toml", clone)
    shutil.copy(ROOT / "tests" / "conftest.py", clone / "tests")
    shutil.copy(ROOT / "tests" / "test_data.py", clone / "tests")
    shutil.copytree(FIXTURES, clone / "tests" / "fixtures")
    env = {k: v for k, v in os.environ.items() if k not in ("CAI_LITE_SHARED_DATA", "PYTEST_ADDOPTS")}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_data.py"],
                       cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout and "full reference data absent" in r.stdout
    assert re.search(r"\b[1-9]\d* passed", r.stdout)
