"""setup.sh and .ci/run: valid bash, a help that lists every mode, and a refusal of unknown modes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODES = ("demo", "test", "dev", "venv", "env", "sd_model", "apache", "node", "lb", "help")


@pytest.mark.parametrize("script", ["setup.sh", ".ci/run"])
def test_it_is_valid_bash(script: str) -> None:
    result = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)

    assert result.returncode == 0, result.stderr


def test_it_lists_every_mode_in_its_help() -> None:
    result = subprocess.run(["./setup.sh", "help"], cwd=REPO, capture_output=True, text=True, timeout=30)

    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ") and line.split()}
    assert set(MODES) <= listed


def test_it_refuses_an_unknown_mode() -> None:
    result = subprocess.run(["./setup.sh", "bogus"], cwd=REPO, capture_output=True, text=True, timeout=30)

    assert result.returncode != 0
    assert "unknown mode 'bogus'" in result.stderr


def test_ci_runs_exactly_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    readme = (REPO / "README.md").read_text()

    assert ci.rstrip().endswith("exec ./setup.sh test")
    assert "./setup.sh test" in readme
