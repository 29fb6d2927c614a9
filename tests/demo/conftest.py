"""Fixtures for the /multi_demo/ browser tests: one server process in `all` (tiny models), Debian's headless Chromium,
and pages, one browser context each (a context is a browser of its own: a new cookie, so a new user), that record
console errors and uncaught exceptions; a test fails on any of them."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Error, sync_playwright

from sd_multi.env import env_bool
from tests.demo.browser import (
    CHROMIUM,
    CHROMIUM_INSTALL,
    DESKTOP,
    STAFF_USER,
    DemoPage,
    chromium_available,
    create_staff_user,
    launch_chromium,
    start_demo_server,
)
from tests.processes import ServerProcess


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if not chromium_available():
        message = f"{CHROMIUM} is missing; `./setup.sh test` installs it ({CHROMIUM_INSTALL})"
        if env_bool("CI", False):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        chromium = launch_chromium(playwright)
        yield chromium
        chromium.close()


@dataclass(frozen=True, kw_only=True)
class RunningDemo:
    server: ServerProcess
    staff_creation: subprocess.Popen[bytes]  # started with the server, so the staff test rarely waits for it


@pytest.fixture(scope="session")
def running_demo(tiny_models_dir: Path) -> Iterator[RunningDemo]:
    server = start_demo_server(tiny_models_dir, Path(tempfile.mkdtemp(prefix="multi-demo-")))
    demo = RunningDemo(server=server, staff_creation=create_staff_user(server))
    yield demo
    demo.staff_creation.wait(timeout=120)
    server.stop()


@pytest.fixture(scope="session")
def demo_server(running_demo: RunningDemo) -> ServerProcess:
    """The open-mode server (SD_AUTH=open): each browser context is a user of its own."""
    return running_demo.server


@pytest.fixture(scope="session")
def token_server(tiny_models_dir: Path) -> Iterator[ServerProcess]:
    """A second server, in token mode (logins only), with the staff user."""
    server = start_demo_server(
        tiny_models_dir,
        Path(tempfile.mkdtemp(prefix="multi-demo-token-")),
        env={"SD_AUTH": "token", "DJANGO_SECRET_KEY": "multi-demo-tests-" + "x" * 40, "SD_NODE_SECRET": "demo-secret"},
    )
    try:
        assert create_staff_user(server).wait(timeout=120) == 0, "createsuperuser failed"
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def balancer_server(tiny_models_dir: Path) -> Iterator[ServerProcess]:
    """The deployed shape: the page served by a balancer (SD_ROLE=balancer) in front of a separate node process."""
    secret = {"SD_NODE_SECRET": "demo-cluster-secret", "SD_HEALTH_INTERVAL": "0.5"}
    node = ServerProcess(
        role="node",
        data_dir=Path(tempfile.mkdtemp(prefix="multi-demo-node-")),
        env={"SD_MODELS_DIR": str(tiny_models_dir), "SD_DEVICE": "cpu", **secret},
    ).start()
    balancer = ServerProcess(
        role="balancer", data_dir=Path(tempfile.mkdtemp(prefix="multi-demo-balancer-")),
        env={"SD_NODES": node.url, **secret},
    )  # fmt: skip
    try:
        yield balancer.start(wait_for="/balancer/status")
    finally:
        balancer.stop()
        node.stop()


@pytest.fixture(scope="session")
def staff_user(running_demo: RunningDemo) -> str:
    """The staff user's name, once it exists in the open-mode server's database."""
    assert running_demo.staff_creation.wait(timeout=120) == 0, "createsuperuser failed"
    return STAFF_USER


class PageErrors:
    """Console errors and uncaught exceptions of the pages of one test."""

    def __init__(self) -> None:
        self.entries: list[str] = []

    def console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.entries.append(f"console error: {message.text} at {message.location.get('url', '')}")

    def exception(self, error: Error) -> None:
        self.entries.append(f"uncaught exception: {error}")


@pytest.fixture
def open_page(browser: Browser, demo_server: ServerProcess) -> Iterator[Callable[..., DemoPage]]:
    """open_page(viewport=DESKTOP, load=True, server=demo_server) -> a DemoPage of a new browser context (a new user),
    loaded unless told."""
    errors = PageErrors()
    contexts = []

    def open_(
        viewport: dict[str, int] | None = None, *, load: bool = True, server: ServerProcess | None = None
    ) -> DemoPage:
        context = browser.new_context(viewport=viewport or DESKTOP)  # type: ignore[arg-type]
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.on("console", errors.console)
        page.on("pageerror", errors.exception)
        demo = DemoPage(page, (server or demo_server).url)
        return demo.open() if load else demo

    yield open_
    for context in contexts:
        context.close()
    assert not errors.entries, "the page logged errors:\n" + "\n".join(errors.entries)
