"""Real server processes for tests: gunicorn running the project on 127.0.0.1, started, killed and restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
GUNICORN = Path(sys.executable).with_name("gunicorn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without the project's settings, plus `extra`."""
    prefixes = ("SD_", "DJANGO_", "DATABASE_URL", "CACHE_URL", "REDIS_URL", "MEDIA_ROOT")
    env = {key: value for key, value in os.environ.items() if not key.startswith(prefixes)}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
            "DJANGO_SETTINGS_MODULE": "sd_multi.settings",
            "OMP_NUM_THREADS": "1",
        }
    )
    env.update(extra)
    return env


class ServerProcess:
    """One gunicorn process (1 worker, many threads, like a node in production) with its own data folder."""

    def __init__(self, *, role: str, data_dir: Path, env: Mapping[str, str] | None = None, threads: int = 16) -> None:
        self.role = role
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads = threads
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = clean_environment(
            {
                "SD_ROLE": role,
                "DATABASE_URL": f"sqlite:///{data_dir / 'db.sqlite3'}",
                "MEDIA_ROOT": str(data_dir / "media"),
                "SD_NODE_ID": f"{role}-{self.port}",
                "SD_LOG_LEVEL": "info",
                **(env or {}),
            }
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"server-{self.port}.log"

    def migrate(self) -> None:
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"],
            cwd=REPO,
            env=self.env,
            check=True,
            timeout=120,
        )

    def start(self, *, wait_for: str = "/node/health", timeout: float = 60.0) -> ServerProcess:
        self.migrate()
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                str(GUNICORN),
                "sd_multi.wsgi:application",
                "--bind",
                f"127.0.0.1:{self.port}",
                "--workers",
                "1",
                "--threads",
                str(self.threads),
                "--timeout",
                "0",
                "--graceful-timeout",
                "2",
            ],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + wait_for, timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not answer {wait_for} within {timeout}s:\n{self.log_tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Kill the whole process group (gunicorn master and its worker)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(timeout=30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
