"""Health checks with a fake node client and an injected clock: rise/fall, node statuses, boot changes, passive
failures, and the one-checker-per-cluster lock. Real nodes going down are in test_failover.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from django.core.cache import cache
from django.test import override_settings

from balancer import health, registry, routing
from balancer.health import FALL, RISE, HealthChecker, NodeStatus, observe
from balancer.node_client import ForwardedResponse, NodeUnreachable

NODE_A = "http://node-a.test:7860"
NODE_B = "http://node-b.test:7860"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeNodeClientForHealthTests:
    """Answers /node/health from a table: a document, or a transport failure for nodes marked down."""

    def __init__(self) -> None:
        self.documents: dict[str, dict[str, Any]] = {}
        self.down: set[str] = set()

    def set(self, url: str, **values: Any) -> None:
        document = {"status": "ready", "node_id": url[7:13], "boot_id": "boot-1", "queue_depth": 0,
                    "running_jobs": [], "capacity": 2, "loaded_models": [], "models": []}  # fmt: skip
        self.documents[url] = {**document, **self.documents.get(url, {}), **values}

    def health(self, url: str) -> dict[str, Any]:
        if url in self.down:
            raise NodeUnreachable(url, "connection refused", retry_safe=True)
        return dict(self.documents[url])

    def submit_job(self, url: str, *, job_id: str, api: str, payload: Mapping[str, Any], user: str) -> dict[str, Any]:
        raise AssertionError("health checks never submit jobs")

    def get_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        raise AssertionError("health checks never read jobs")

    def cancel_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        raise AssertionError("health checks never cancel jobs")

    def forward(self, url: str, method: str, path: str, *, headers: Mapping[str, str], body: bytes | None,
                query: str, timeout: float) -> ForwardedResponse:  # fmt: skip
        raise AssertionError("health checks never forward calls")


@pytest.fixture
def clean_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def fake_client() -> FakeNodeClientForHealthTests:
    client = FakeNodeClientForHealthTests()
    client.set(NODE_A)
    client.set(NODE_B)
    return client


@pytest.fixture
def checker(fake_client: FakeNodeClientForHealthTests, clean_cache: None) -> Iterator[HealthChecker]:
    clock = FakeClock()
    with override_settings(SD_NODES=[NODE_A, NODE_B], SD_ROLE="balancer"):
        registry.refresh()
        yield HealthChecker(client=fake_client, clock=clock, interval=1.0, owner="test-checker")


def healthy(url: str) -> bool:
    return bool(health.read_health([url])[url].healthy)


# ------------------------------------------------------------------------------------------- the state machine


def test_it_takes_a_node_down_after_fall_failures_and_back_after_rise_passes() -> None:
    clock = FakeClock()
    ready = {"status": "ready", "boot_id": "b1"}
    record = observe(None, url=NODE_A, document=ready, now=clock())
    assert record.healthy, "a node seen for the first time is up after one good check"
    for failure in range(1, FALL + 1):
        clock.advance(1)
        record = observe(record, url=NODE_A, document=None, failure="connection refused", now=clock())
        assert record.healthy is (failure < FALL)
    assert record.status == NodeStatus.DOWN
    assert record.reason == "connection refused"
    for good in range(1, RISE + 1):
        clock.advance(1)
        record = observe(record, url=NODE_A, document=ready, now=clock())
        assert record.healthy is (good >= RISE)
    assert record.checked_at == clock()


def test_it_resets_the_fall_count_on_a_good_check() -> None:
    record = observe(None, url=NODE_A, document={"status": "ready", "boot_id": "b1"}, now=0)
    for second in range(1, 10):
        record = observe(record, url=NODE_A, document=None, failure="timeout", now=second)
        record = observe(record, url=NODE_A, document={"status": "busy", "boot_id": "b1"}, now=second + 0.5)
    assert record.healthy
    assert record.status == NodeStatus.BUSY


@pytest.mark.parametrize("status", ["starting", "unhealthy", "nonsense"])
def test_it_counts_a_node_that_answers_but_cannot_serve_as_failing(status: str) -> None:
    record = observe(None, url=NODE_A, document={"status": "ready", "boot_id": "b1"}, now=0)
    for second in range(1, FALL + 1):
        record = observe(record, url=NODE_A, document={"status": status, "boot_id": "b1"}, now=second)
    assert not record.healthy
    assert record.status in (NodeStatus.STARTING, NodeStatus.UNHEALTHY), "it answered: not shown as down"


def test_it_treats_a_new_boot_id_as_a_new_node() -> None:
    record = observe(None, url=NODE_A, document={"status": "ready", "boot_id": "b1"}, now=0)
    for second in range(1, FALL + 1):
        record = observe(record, url=NODE_A, document=None, failure="refused", now=second)
    assert not record.healthy
    restarted = observe(record, url=NODE_A, document={"status": "ready", "boot_id": "b2"}, now=10)
    assert restarted.healthy, "a restarted node is a new node: up after its first good check"
    assert restarted.boot_id == "b2"
    assert (restarted.passes, restarted.fails) == (1, 0)


def test_it_counts_load_as_queued_plus_running_jobs() -> None:
    document = {"status": "busy", "boot_id": "b1", "queue_depth": 3, "running_jobs": ["j1"], "capacity": 4}
    record = observe(None, url=NODE_A, document=document, now=0)
    assert (record.queue_depth, record.capacity) == (4, 4)


# ---------------------------------------------------------------------------------------------------- checker


@pytest.mark.django_db
def test_it_checks_every_known_node_and_shares_the_result_through_the_cache(
    checker: HealthChecker, fake_client: FakeNodeClientForHealthTests
) -> None:
    fake_client.set(NODE_B, loaded_models=["tiny.safetensors [0123456789]"], queue_depth=2)
    records = checker.check_round()
    assert {record.url for record in records} == {NODE_A, NODE_B}
    nodes = {node.url: node for node in routing.known_nodes()}
    assert nodes[NODE_A].healthy and nodes[NODE_B].healthy
    assert nodes[NODE_B].loaded_models == ("tiny.safetensors [0123456789]",)
    assert nodes[NODE_B].queue_depth == 2
    assert nodes[NODE_A].checked_at == checker.clock()


@pytest.mark.django_db
def test_it_marks_a_silent_node_down_after_fall_rounds_and_up_after_rise(
    checker: HealthChecker, fake_client: FakeNodeClientForHealthTests
) -> None:
    checker.check_round()
    fake_client.down.add(NODE_A)
    for _ in range(FALL - 1):
        checker.check_round()
        assert healthy(NODE_A)
    checker.check_round()
    assert not healthy(NODE_A)
    assert [node.url for node in routing.healthy_nodes()] == [NODE_B]
    fake_client.down.clear()
    checker.check_round()
    assert not healthy(NODE_A), f"back after {RISE} good checks, not one"
    checker.check_round()
    assert healthy(NODE_A)


@pytest.mark.django_db
def test_it_counts_a_passive_failure_as_a_failed_check_at_once(
    checker: HealthChecker, fake_client: FakeNodeClientForHealthTests
) -> None:
    checker.check_round()
    for _ in range(FALL):
        routing.report_failure(NODE_A)
    assert not healthy(NODE_A)
    assert health.read_health([NODE_A])[NODE_A].reason.startswith("passive")
    assert healthy(NODE_B)


@pytest.mark.django_db
def test_it_lets_one_process_per_cluster_check(
    checker: HealthChecker, fake_client: FakeNodeClientForHealthTests
) -> None:
    other = HealthChecker(client=fake_client, clock=checker.clock, interval=1.0, owner="other-process")
    assert checker.hold_lock()
    assert checker.hold_lock(), "the holder renews its lock"
    assert not other.hold_lock()
    cache.delete(registry.cluster_key("checker-lock"))  # the holder died and its lock expired
    assert other.hold_lock()
    assert not checker.hold_lock()


@pytest.mark.django_db
def test_a_checker_started_at_boot_leaves_its_first_round_to_its_thread(
    monkeypatch: pytest.MonkeyPatch, clean_cache: None
) -> None:
    """At boot (sd_multi/wsgi.py) a process may be its own node (SD_ROLE=all) and cannot answer a check before it
    serves: the check must not run in the importing thread. A request that starts the checker does check at once."""
    rounds: list[str] = []

    def check_round(self: HealthChecker, urls: Any = None) -> list[Any]:
        rounds.append(threading.current_thread().name)
        return []

    monkeypatch.setattr(HealthChecker, "check_round", check_round)
    monkeypatch.setattr(HealthChecker, "start", lambda self: None)  # no thread in the test process
    with override_settings(SD_NODES=[NODE_A], SD_ROLE="balancer"):
        registry.refresh()
        monkeypatch.setattr(health, "_checker", None)
        health.ensure_health_checker(check_now=False)
        assert rounds == []
        monkeypatch.setattr(health, "_checker", None)
        health.ensure_health_checker()
        assert rounds == [threading.current_thread().name]
