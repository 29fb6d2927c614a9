"""Two balancer processes of one cluster (one database, one Redis) agree on pins, drains and node health, on SQLite
and on PostgreSQL: a user may reach either balancer mid-cycle."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.balancer.conftest import (
    as_user,
    drain,
    fresh_postgres_database,
    node_entry,
    status,
    txt2img,
    unique_user,
    wait_until,
)
from tests.processes import ServerProcess


@pytest.fixture(params=["sqlite-redis", "postgres-redis"])
def cluster_env(request: pytest.FixtureRequest, redis_url: str) -> Iterator[dict[str, str]]:
    """What two balancers of one cluster share: the database and Redis."""
    if request.param == "sqlite-redis":
        shared = Path(tempfile.mkdtemp(prefix="balancer-cluster-")) / "db.sqlite3"
        yield {"DATABASE_URL": f"sqlite:///{shared}", "REDIS_URL": redis_url}
        return
    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as database_url:
        yield {"DATABASE_URL": database_url, "REDIS_URL": redis_url}


@pytest.fixture
def two_balancers(
    two_nodes: list[ServerProcess], balancers: Callable[..., ServerProcess], cluster_env: dict[str, str]
) -> list[ServerProcess]:
    pair = [balancers(two_nodes, env=cluster_env), balancers(two_nodes, env=cluster_env)]
    for balancer in pair:
        url = balancer.url
        wait_until(lambda url=url: bool(status(url)["up"] == 2), what="both nodes up")  # type: ignore[misc]
    return pair


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
