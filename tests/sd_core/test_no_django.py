"""sd_core is plain Python: every one of its modules imports without Django (STYLE.md rule 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent

IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
import sd_core
names = [info.name for info in pkgutil.walk_packages(sd_core.__path__, "sd_core.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(name for name in sys.modules if name == "django" or name.startswith("django."))
print(len(names), "modules imported;", "django modules loaded:", leaked)
sys.exit(1 if leaked else 0)
"""


def test_it_imports_every_sd_core_module_without_django() -> None:
    environment = {name: value for name, value in os.environ.items() if name != "DJANGO_SETTINGS_MODULE"}

    result = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE],
        cwd=REPO,
        env={**environment, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "django modules loaded: []" in result.stdout
