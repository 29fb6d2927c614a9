"""Two balancer processes of one cluster (one database, one Redis) agree on pins, drains and node health, on SQLite
and on PostgreSQL: a user may reach either balancer mid-cycle."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import requests

from tests.balancer.conftest import (
    as_user,
    drain,
    fresh_postgres_database,
    node_entry,
    start_balancer,
    status,
    txt2img,
    unique_user,
    wait_until,
)
from tests.processes import ServerProcess


@pytest.fixture(scope="module", params=["sqlite-redis", "postgres-redis"])
def two_balancers(
    request: pytest.FixtureRequest, two_nodes: list[ServerProcess], redis_url: str
) -> Iterator[list[ServerProcess]]:
    """Two balancers of one cluster: they share the database (SQLite file or a fresh PostgreSQL database) and Redis.
    Started side by side, once per module and backend; tests use their own users and undo their drains."""
    with ExitStack() as stack:
        if request.param == "sqlite-redis":
            shared = Path(tempfile.mkdtemp(prefix="balancer-cluster-")) / "db.sqlite3"
            database_url = f"sqlite:///{shared}"
        else:
            database_url = stack.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_url")))
        env = {"DATABASE_URL": database_url, "REDIS_URL": redis_url}
        ServerProcess(role="balancer", data_dir=Path(tempfile.mkdtemp(prefix="balancer-")), env=env).migrate()

        def start(_: int) -> ServerProcess:  # the database is migrated: starting both at once is safe
            return start_balancer(two_nodes, env=env)

        with ThreadPoolExecutor(max_workers=2) as pool:
            pair = list(pool.map(start, range(2)))
        for balancer in pair:
            stack.callback(balancer.stop)
        wait_until(lambda: all(status(balancer.url)["up"] == 2 for balancer in pair), what="both nodes up")
        yield pair


def test_it_keeps_a_users_pin_whichever_balancer_they_reach(two_balancers: list[ServerProcess]) -> None:
    first, second = two_balancers
    alice = unique_user("alice")
    generated = txt2img(first.url, alice)
    assert generated.status_code == 200
    node_id = generated.headers["X-SD-Node"]
    assert status(second.url, alice)["pin"]["node_id"] == node_id
    progress = requests.get(f"{second.url}/sdapi/v1/progress", headers=as_user(alice), timeout=30)
    assert progress.headers["X-SD-Node"] == node_id
    for _ in range(3):
        assert txt2img(second.url, alice).headers["X-SD-Node"] == node_id
        assert txt2img(first.url, alice).headers["X-SD-Node"] == node_id


def test_it_shows_a_drain_made_on_one_balancer_on_the_other_at_once(
    two_balancers: list[ServerProcess], two_nodes: list[ServerProcess]
) -> None:
    first, second = two_balancers
    drained = two_nodes[0]
    drain(second.url, drained.url)
    try:
        assert node_entry(first.url, drained.url)["draining"] is True
        drained_id = node_entry(first.url, drained.url)["node_id"]
        for number in range(4):
            assert txt2img(first.url, unique_user(f"new{number}")).headers["X-SD-Node"] != drained_id
    finally:
        drain(second.url, drained.url, draining=False)
    assert node_entry(first.url, drained.url)["draining"] is False


def test_it_shares_one_view_of_node_health(two_balancers: list[ServerProcess]) -> None:
    first, second = two_balancers
    seen = [{node["url"]: node["checked_at"] for node in status(balancer.url)["nodes"]} for balancer in (first, second)]
    assert seen[0] == seen[1] or wait_until(
        lambda: (
            {n["url"]: n["checked_at"] for n in status(first.url)["nodes"]}
            == {n["url"]: n["checked_at"] for n in status(second.url)["nodes"]}
        ),
        timeout=5,
        interval=0.01,
        what="one checker's records, read by both",
    )
