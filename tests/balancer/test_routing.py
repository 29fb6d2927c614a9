"""choose_node's ordering (health, draining, model affinity, load, the user's stable tie-break) over health records
written straight into the cache, and the users' remembered models."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
from django.core.cache import cache
from django.test import override_settings

from balancer import health, registry, routing
from balancer.health import NodeHealth, NodeStatus
from balancer.models import Node

NODES = [f"http://node-{letter}.test:7860" for letter in "abc"]
TINY = "tiny-sd1.safetensors [0123456789]"
OTHER = "tiny-sdxl.safetensors [abcdef0123]"

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def three_fake_nodes() -> Iterator[None]:
    cache.clear()
    with override_settings(SD_NODES=NODES, SD_ROLE="balancer"):
        registry.refresh()
        for url in NODES:
            set_node(url)
        yield
    cache.clear()


def set_node(url: str, **values: object) -> None:
    record = NodeHealth(url=url, node_id=url[7:13], boot_id="b1", status=NodeStatus.READY, healthy=True, capacity=2)
    health.write_health(replace(record, **values))  # type: ignore[arg-type]


def choose(user: str = "alice", model: str | None = None, exclude: tuple[str, ...] = ()) -> str | None:
    node = routing.choose_node(user_key=user, model=model, exclude=exclude)
    return node.url if node else None


def test_it_skips_unhealthy_draining_and_excluded_nodes() -> None:
    set_node(NODES[0], healthy=False, status=NodeStatus.DOWN)
    Node.objects.filter(url=NODES[1]).get().drain()
    assert choose() == NODES[2]
    assert choose(exclude=(NODES[2],)) is None


def test_it_prefers_a_node_holding_the_model_over_a_less_loaded_one() -> None:
    set_node(NODES[0], queue_depth=1)
    set_node(NODES[1], queue_depth=5, loaded_models=(TINY,))
    set_node(NODES[2], queue_depth=0, loaded_models=(OTHER,))
    assert choose(model=TINY) == NODES[1]
    assert choose(model="tiny-sd1.safetensors") == NODES[1], "the name before ' [' matches"
    assert choose(model="tiny-sd1") == NODES[1], "so does the file stem"
    assert choose(model="unknown.safetensors") == NODES[2], "no holder: least loaded"


def test_it_picks_the_least_loaded_node_by_queue_per_capacity() -> None:
    set_node(NODES[0], queue_depth=2, capacity=2)
    set_node(NODES[1], queue_depth=3, capacity=8)
    set_node(NODES[2], queue_depth=1, capacity=1)
    assert choose() == NODES[1]
    assert all(choose(f"user-{number}") == NODES[1] for number in range(20))


def test_it_breaks_ties_by_user_stably_and_spreads_users() -> None:
    picks = {user: choose(user) for user in (f"user-{number}" for number in range(60))}
    assert picks == {user: choose(user) for user in picks}, "the same user lands on the same node"
    spread = Counter(picks.values())
    assert set(spread) == set(NODES)
    assert min(spread.values()) >= 10


def test_it_remembers_a_users_model_per_user() -> None:
    assert routing.user_model("alice") is None
    routing.remember_user_model("alice", TINY)
    assert routing.user_model("alice") == TINY
    assert routing.user_model("bob") is None


def test_it_ranks_nodes_without_the_model_on_disk_last() -> None:
    set_node(NODES[0], models=(TINY,), queue_depth=4)
    set_node(NODES[1], models=(OTHER,), queue_depth=0)
    set_node(NODES[2], models=(TINY, OTHER), loaded_models=(OTHER,), queue_depth=2)
    assert choose(model=TINY) == NODES[2], "on disk and less loaded than the other node that has it"
    assert choose(model=OTHER) == NODES[2], "loaded beats less loaded"
