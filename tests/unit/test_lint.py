"""The linters as tests: ruff on all Python in the repo, mypy strict on the package.

Both read their configuration from pyproject.toml and run from the repo root,
with the tools installed in the interpreter running the tests.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )


def test_ruff() -> None:
    res = _run("ruff", "check", "--no-fix", "autogentoo", "tests", "bench")
    assert res.returncode == 0, f"ruff check found problems:\n{res.stdout}{res.stderr}"


def test_mypy() -> None:
    # No paths: pyproject's [tool.mypy] packages = ["autogentoo"], strict.
    res = _run("mypy")
    assert res.returncode == 0, f"mypy found problems:\n{res.stdout}{res.stderr}"
