"""Fixtures for balancer tests: real node processes serving the tiny models, balancer processes in front of them,
fake nodes for routing-only tests, and the PostgreSQL/Redis services.

Stable names other test modules import: `two_nodes`, `three_nodes`, `balancer_server`, `balancers`,
`start_balancer(nodes, env=...)`, `start_node(...)`, `wait_until(...)`.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import pytest
import requests

from sd_multi.env import env_bool, env_str
from tests.balancer.fake_node import FakeNodeProcess
from tests.processes import ServerProcess

NODE_SECRET = "balancer-tests-node-secret"
HEALTH_INTERVAL = "0.5"
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"

T = TypeVar("T")


class HasUrl(Protocol):
    url: str


def _url(node: HasUrl | str) -> str:
    return node if isinstance(node, str) else node.url


def wait_until(predicate: Callable[[], Any], *, timeout: float = 20.0, interval: float = 0.05, what: str = "") -> Any:
    """Poll `predicate` until it returns something truthy (returned), failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what or predicate}")
        time.sleep(interval)


def unique_user(name: str) -> str:
    """Persona names made unique per test, so pins left by one test never meet another."""
    return f"{name}-{uuid.uuid4().hex[:8]}"


# ----------------------------------------------------------------------------------------------------- nodes


def start_node(
    models_dir: Path, *, env: Mapping[str, str] | None = None, data_dir: Path | None = None
) -> ServerProcess:
    """A real node process (gunicorn, tiny models) sharing the tests' node secret."""
    node = ServerProcess(
        role="node",
        data_dir=data_dir or Path(tempfile.mkdtemp(prefix="balancer-node-")),
        env={
            "SD_MODELS_DIR": str(models_dir), "SD_NODE_SECRET": NODE_SECRET, "SD_MAX_QUEUED_PER_USER": "60",
            "SD_MAX_STEPS": "5000", "SD_DEVICE": "cpu", **(env or {}),
        },
    )  # fmt: skip
    return node.start()


def start_nodes(models_dir: Path, count: int) -> list[ServerProcess]:
    """Several nodes started side by side (a node takes seconds to import torch)."""
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(lambda _: start_node(models_dir), range(count)))


@pytest.fixture(scope="session")
def two_nodes(tiny_models_dir: Path) -> Iterator[list[ServerProcess]]:
    nodes = start_nodes(tiny_models_dir, 2)
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def three_nodes(two_nodes: list[ServerProcess], tiny_models_dir: Path) -> Iterator[list[ServerProcess]]:
    """The two session nodes and a third one for this module (at most three node processes run at once)."""
    third = start_node(tiny_models_dir)
    yield [*two_nodes, third]
    third.stop()


@pytest.fixture
def fake_nodes() -> Iterator[Callable[..., FakeNodeProcess]]:
    """Start fake nodes (routing tests only: they answer instantly and never make images)."""
    started: list[FakeNodeProcess] = []

    def start(node_id: str, **options: Any) -> FakeNodeProcess:
        node = FakeNodeProcess(node_id=node_id, **options).start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.kill()


# ------------------------------------------------------------------------------------------------- balancers


def start_balancer(
    nodes: Iterable[HasUrl | str], *, env: Mapping[str, str] | None = None, data_dir: Path | None = None
) -> ServerProcess:
    """A balancer process (gunicorn) in front of `nodes`, checking them every HEALTH_INTERVAL seconds. It runs as
    behind Apache (SD_BEHIND_PROXY): tests play different client machines with X-Forwarded-For."""
    balancer = ServerProcess(
        role="balancer",
        data_dir=data_dir or Path(tempfile.mkdtemp(prefix="balancer-")),
        env={
            "SD_NODES": ",".join(_url(node) for node in nodes), "SD_NODE_SECRET": NODE_SECRET,
            "SD_HEALTH_INTERVAL": HEALTH_INTERVAL, "SD_BEHIND_PROXY": "1", **(env or {}),
        },
    )  # fmt: skip
    return balancer.start(wait_for="/balancer/status")


@pytest.fixture
def balancers() -> Iterator[Callable[..., ServerProcess]]:
    """start_balancer, with every balancer it started stopped after the test."""
    started: list[ServerProcess] = []

    def start(nodes: Iterable[HasUrl | str], **options: Any) -> ServerProcess:
        balancer = start_balancer(nodes, **options)
        started.append(balancer)
        return balancer

    yield start
    for balancer in started:
        balancer.stop()


@pytest.fixture(scope="session")
def balancer_server(two_nodes: list[ServerProcess]) -> Iterator[ServerProcess]:
    """One balancer in front of the two session nodes; tests that drain a node undrain it before they end."""
    balancer = start_balancer(two_nodes)
    wait_until(lambda: status(balancer.url)["up"] == 2, what="both nodes up")
    yield balancer
    balancer.stop()


def status(balancer_url: str, user: str | None = None) -> dict[str, Any]:
    headers = {"X-User-Id": user} if user else {}
    return dict(requests.get(f"{balancer_url}/balancer/status", headers=headers, timeout=10).json())


def node_entry(balancer_url: str, node_url: str) -> dict[str, Any]:
    return next(node for node in status(balancer_url)["nodes"] if node["url"] == node_url)


def as_user(user: str) -> dict[str, str]:
    return {"X-User-Id": user}


def txt2img(url: str, user: str, *, timeout: float = 120, **fields: Any) -> requests.Response:
    """A tiny txt2img (64x64, 2 steps unless told) through `url` (a balancer or a node) as `user`."""
    body: dict[str, Any] = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "seed": 1, **fields}
    return requests.post(f"{url}/sdapi/v1/txt2img", json=body, headers=as_user(user), timeout=timeout)


def drain(balancer_url: str, node_url: str, *, draining: bool = True) -> None:
    node_id = node_entry(balancer_url, node_url)["id"]
    action = "drain" if draining else "undrain"
    response = requests.post(f"{balancer_url}/balancer/nodes/{node_id}/{action}", timeout=10)
    assert response.status_code == 200, response.text


def in_background(function: Callable[[], T]) -> Callable[[], T]:
    """Run `function` on a thread now; calling the result waits for its value (or raises its exception)."""
    pool = ThreadPoolExecutor(max_workers=1)
    future = pool.submit(function)
    pool.shutdown(wait=False)
    return lambda: future.result(timeout=300)


# -------------------------------------------------------------------------------------------------- services


def _unavailable(service: str, reason: str) -> None:
    message = f"{service} is not available ({reason}); `./setup.sh test` starts or installs it"
    if env_bool("CI", False):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def redis_url() -> str:
    """SD_TEST_REDIS_URL (default: db 15 on the local Redis). Balancer keys are private to each test cluster (they
    carry its database's identity), so nothing needs flushing."""
    url = env_str("SD_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        _unavailable("Redis", str(exc))
    return url


@pytest.fixture(scope="session")
def postgres_url() -> str:
    url = env_str("SD_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        _unavailable("PostgreSQL", str(exc).strip())
    return url


@contextmanager
def fresh_postgres_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of `server_url` for one test; dropped afterwards."""
    import psycopg

    name = f"sd_balancer_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    parts = urlsplit(server_url)
    try:
        yield urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))
    finally:
        with psycopg.connect(server_url, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite-locmem", "postgres-redis"])
def backend_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The balancer's database and cache: the defaults (SQLite, LocMem), or PostgreSQL (a fresh database) and Redis,
    as production runs them."""
    if request.param == "sqlite-locmem":
        yield {}
        return
    server_url = request.getfixturevalue("postgres_url")
    redis = request.getfixturevalue("redis_url")
    with fresh_postgres_database(server_url) as database_url:
        yield {"DATABASE_URL": database_url, "REDIS_URL": redis}
