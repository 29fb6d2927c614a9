"""What the /multi_demo/ browser tests and `bench.screenshots` share: a server process in `all` with the tiny models,
Debian's headless Chromium (never a downloaded browser), and a driver for the page."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Locator, Page, Playwright

from tests.processes import REPO, ServerProcess

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"
# Root in a container without internet: no sandbox, and none of Chromium's own connections (updates, sync, QUIC).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

STAFF_USER = "staff"
STAFF_PASSWORD = "staff-password-for-tests"

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}


def launch_chromium(playwright: Playwright) -> Browser:
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)


def start_demo_server(models_dir: Path, data_dir: Path, *, env: Mapping[str, str] | None = None) -> ServerProcess:
    """One process serving node and balancer (SD_ROLE=all); the balancer knows its node by the process's own URL."""
    server = ServerProcess(
        role="all",
        data_dir=data_dir,
        env={
            "SD_MODELS_DIR": str(models_dir), "SD_DEVICE": "cpu", "SD_MAX_STEPS": "1000",
            "SD_HEALTH_INTERVAL": "0.5", **(env or {}),
        },
    )  # fmt: skip
    server.env["SD_NODES"] = server.url
    return server.start(wait_for="/node/health")


def create_staff_user(server: ServerProcess) -> subprocess.Popen[bytes]:
    """Start creating the staff user in the server's database (a Django command; the caller waits for it)."""
    env = {**server.env, "DJANGO_SUPERUSER_PASSWORD": STAFF_PASSWORD}
    command = [sys.executable, "manage.py", "createsuperuser", "--no-input", "--username", STAFF_USER,
               "--email", "staff@example.com"]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def chromium_available() -> bool:
    return CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK)


class DemoPage:
    """Drives /multi_demo/ as a user would: fill the form, generate, watch progress, read results and the gallery."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url

    def open(self) -> DemoPage:
        self.page.goto(f"{self.base_url}/multi_demo/")
        self.wait_until_ready()
        return self

    def log_in(self, user: str, password: str) -> None:
        """From the login page (where token mode sends a visitor) back to the demo."""
        self.page.fill("#id_username", user)
        self.page.fill("#id_password", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(f"{self.base_url}/multi_demo/")
        self.wait_until_ready()

    def wait_until_ready(self) -> None:
        """The choices came from the API and the status strip has answered."""
        self.page.wait_for_function(
            "() => document.querySelector('#model').value !== ''"
            " && document.querySelector('#status-nodes').textContent.includes('up')"
        )

    def fill(self, *, prompt: str, steps: int, size: int = 64, images: int = 1, seed: int | None = None) -> None:
        self.page.fill("#prompt", prompt)
        self.page.fill("#steps", str(steps))
        self.page.fill("#width", str(size))
        self.page.fill("#height", str(size))
        self.page.locator("#batch-size").fill(str(images))
        if seed is not None:
            self.page.uncheck("#seed-random")
            self.page.fill("#seed", str(seed))

    def generate(self) -> None:
        self.page.click("#generate")

    def wait_for_task(self) -> str:
        """The id of the task the page follows (it keeps it for reloads)."""
        task_id: str = self.page.wait_for_function("() => sessionStorage.getItem('sd_demo_last_task')").json_value()
        return task_id

    def results(self, *, timeout: float = 60) -> Locator:
        """The result cards, once their images are shown."""
        self.page.wait_for_selector("#results .result-card img[src]", timeout=timeout * 1000)
        return self.page.locator("#results .result-card")

    def progress(self) -> float:
        value: Any = self.page.eval_on_selector("#progress", "bar => bar.value")
        return float(value)

    def progress_text(self) -> str:
        return self.page.inner_text("#progress-text")

    def message(self) -> str:
        return self.page.inner_text("#message") if self.page.is_visible("#message") else ""

    def user_id(self) -> str:
        """This browser's open-mode identity (the cookie the page made)."""
        cookies = self.page.context.cookies(self.base_url)
        return next(cookie["value"] for cookie in cookies if cookie["name"] == "sd_demo_user")

    def gallery_texts(self, *, timeout: float = 30) -> list[str]:
        self.page.wait_for_selector("#gallery .gallery-card img[src], #gallery .empty", timeout=timeout * 1000)
        return [text.strip() for text in self.page.locator("#gallery .gallery-card").all_inner_texts()]


def wait_for(predicate: Any, *, timeout: float = 30, interval: float = 0.1, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)
