"""Support for the task tests: balancer processes on SQLite or a fresh PostgreSQL database (in front of the
conftest's real nodes), a webhook receiver on 127.0.0.1, and helpers to submit, poll and download tasks. The test
modules take its fixtures by name."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image

from tests.balancer.conftest import fresh_postgres_database, start_balancer
from tests.processes import ServerProcess

WEBHOOK_SECRET = "webhook-secret-for-tests"
TERMINAL = ("succeeded", "failed", "interrupted")


# ---------------------------------------------------------------------------------------------------- processes


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """The balancer's database: "" (SQLite in the balancer's data folder) or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield ""
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield url


BalancerStarter = Callable[..., ServerProcess]


@pytest.fixture
def start_task_balancer(database_url: str) -> Iterator[BalancerStarter]:
    """Start balancers in front of given nodes on this test's database (webhooks signed, local receivers allowed);
    all are stopped at the end. The same `data_dir` again makes a restarted balancer: same database and media."""
    started: list[ServerProcess] = []

    def start(
        nodes: list[ServerProcess],
        *,
        data_dir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> ServerProcess:
        settings = {"SD_WEBHOOK_SECRET": WEBHOOK_SECRET, "SD_WEBHOOK_ALLOW_PRIVATE": "1", "SD_TASK_MAX_ATTEMPTS": "3"}
        if database_url:
            settings["DATABASE_URL"] = database_url
        settings.update(env or {})
        balancer = start_balancer(nodes, env=settings, data_dir=data_dir)
        started.append(balancer)
        return balancer

    yield start
    for balancer in started:
        balancer.stop()


# ------------------------------------------------------------------------------------------------------ helpers


def as_user(user: str) -> dict[str, str]:
    return {"X-User-Id": user}


def submit(
    url: str, user: str, payload: dict[str, Any], *, api: str = "/sdapi/v1/txt2img", callback_url: str | None = None
) -> str:
    body: dict[str, Any] = {"api": api, "payload": payload}
    if callback_url is not None:
        body["callback_url"] = callback_url
    response = requests.post(f"{url}/task", json=body, headers=as_user(user), timeout=30)
    assert response.status_code == 202, response.text
    return str(response.json()["taskId"])


def txt2img_payload(**fields: Any) -> dict[str, Any]:
    return {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1, **fields}


def get_task(url: str, user: str, task_id: str) -> requests.Response:
    return requests.get(f"{url}/task/{task_id}", headers=as_user(user), timeout=30)


def wait_for_tasks(url: str, user: str, task_ids: list[str], *, timeout: float = 120.0) -> dict[str, dict[str, Any]]:
    """Poll until every task is finished; their last documents by id."""
    deadline = time.monotonic() + timeout
    documents: dict[str, dict[str, Any]] = {}
    pending = list(task_ids)
    while pending:
        for task_id in list(pending):
            response = get_task(url, user, task_id)
            assert response.status_code == 200, response.text
            documents[task_id] = response.json()
            if documents[task_id]["status"] in TERMINAL:
                pending.remove(task_id)
        if pending:
            assert time.monotonic() < deadline, f"tasks not finished in {timeout}s: {[documents[t] for t in pending]}"
            time.sleep(0.2)
    return documents


def wait_until(condition: Callable[[], bool], *, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.1)


def download_image(image_url: str, user: str) -> Image.Image:
    response = requests.get(image_url, headers=as_user(user), timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def stored_image_files(balancer: ServerProcess, task_id: str) -> list[str]:
    """The files the balancer wrote for a task (default storage is MEDIA_ROOT in the tests)."""
    folder = balancer.data_dir / "media" / "tasks" / task_id
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


def node_load(node: ServerProcess) -> int:
    try:
        health = requests.get(f"{node.url}/node/health", timeout=5).json()
    except requests.RequestException:
        return 0
    return int(health["queue_depth"]) + len(health["running_jobs"])


# ------------------------------------------------------------------------------------------------ webhooks


@dataclass
class ReceivedWebhook:
    headers: dict[str, str]
    body: bytes

    @property
    def document(self) -> dict[str, Any]:
        return dict(json.loads(self.body))

    def signature_is_valid(self, secret: str = WEBHOOK_SECRET) -> bool:
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("X-SD-Signature", ""))


@dataclass
class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that records the webhooks it gets and answers with scripted statuses (then 200)."""

    statuses: list[int] = field(default_factory=list)
    received: list[ReceivedWebhook] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.arrived:
                    receiver.received.append(ReceivedWebhook(headers=dict(self.headers.items()), body=body))
                    status = receiver.statuses.pop(0) if receiver.statuses else 200
                    receiver.arrived.notify_all()
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait(self, count: int, timeout: float) -> list[ReceivedWebhook]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.received) >= count, timeout=timeout), (
                f"{len(self.received)} webhook(s) arrived, expected {count}"
            )
            return list(self.received)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()
