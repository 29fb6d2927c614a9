"""Pinning with real nodes (tiny models) behind a real balancer: a whole cycle on one node, on SQLite/LocMem and on
PostgreSQL/Redis; model affinity; the least-loaded choice; draining. Then the pin rules in the process: restarted
nodes, reuse, and two processes pinning one user at once."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any
from unittest.mock import patch

import pytest
import requests
from django.core.cache import cache
from django.test import override_settings

from balancer import health, pinning, registry, routing
from balancer.health import NodeHealth, NodeStatus
from balancer.models import Node
from balancer.pinning import Pin, PinState
from tests.balancer.conftest import (
    NODE_SECRET,
    as_user,
    drain,
    in_background,
    node_entry,
    status,
    txt2img,
    unique_user,
    wait_until,
)
from tests.processes import ServerProcess

LONG = 1500  # steps: ~15 s on a CPU core with the tiny model, always cut short by the test


def progress(balancer_url: str, user: str) -> requests.Response:
    return requests.get(f"{balancer_url}/sdapi/v1/progress", headers=as_user(user), timeout=30)


def test_it_keeps_a_whole_cycle_on_the_pinned_node(
    two_nodes: list[ServerProcess], balancers: Callable[..., ServerProcess], backend_env: dict[str, str]
) -> None:
    balancer = balancers(two_nodes, env=backend_env)
    wait_until(lambda: status(balancer.url)["up"] == 2, what="both nodes up")
    alice = unique_user("alice")
    first = txt2img(balancer.url, alice)
    assert first.status_code == 200, first.text
    node_id = first.headers["X-SD-Node"]
    assert status(balancer.url, alice)["pin"]["node_id"] == node_id

    pending = in_background(lambda: txt2img(balancer.url, alice, steps=LONG))
    running = wait_until(lambda: _running(progress(balancer.url, alice)), timeout=60, what="the job to run")
    assert running.headers["X-SD-Node"] == node_id
    assert (
        requests.post(f"{balancer.url}/sdapi/v1/skip", headers=as_user(alice), timeout=30).headers["X-SD-Node"]
        == node_id
    )
    interrupted = requests.post(f"{balancer.url}/sdapi/v1/interrupt", headers=as_user(alice), timeout=30)
    assert interrupted.json() == {} and interrupted.headers["X-SD-Node"] == node_id
    finished = pending()
    assert finished.status_code == 200, "an interrupted job returns what it made, like A1111"
    assert finished.headers["X-SD-Node"] == node_id
    other = next(node for node in two_nodes if node.url != _url_of(balancer.url, node_id))
    assert f"user={alice}" not in other.log_tail(2000), "the other node never saw the cycle"


def _running(response: requests.Response) -> requests.Response | None:
    return response if response.json()["state"]["sampling_step"] > 0 else None


def _url_of(balancer_url: str, node_id: str) -> str:
    return str(next(node["url"] for node in status(balancer_url)["nodes"] if node["node_id"] == node_id))


def test_it_pins_new_cycles_to_a_node_that_holds_the_model(
    three_nodes: list[ServerProcess], balancers: Callable[..., ServerProcess]
) -> None:
    balancer = balancers(three_nodes)
    wait_until(lambda: status(balancer.url)["up"] == 3, what="three nodes up")
    nodes = status(balancer.url)["nodes"]
    loaded_elsewhere = {title for node in nodes if node["url"] != three_nodes[2].url for title in node["loaded_models"]}
    model = next((title for title in nodes[0]["models"] if title not in loaded_elsewhere), None)
    assert model is not None, f"every tiny model is loaded on the session nodes already: {loaded_elsewhere}"
    holder = three_nodes[2]
    assert txt2img(holder.url, "loader", override_settings={"sd_model_checkpoint": model}).status_code == 200
    wait_until(lambda: model in node_entry(balancer.url, holder.url)["loaded_models"], what="the load to be seen")
    for number in range(4):
        user = unique_user(f"user{number}")
        response = txt2img(balancer.url, user, override_settings={"sd_model_checkpoint": model})
        assert response.status_code == 200
        assert response.headers["X-SD-Node"] == node_entry(balancer.url, holder.url)["node_id"]


def test_it_pins_new_cycles_to_the_least_loaded_node(
    two_nodes: list[ServerProcess], balancer_server: ServerProcess
) -> None:
    busy, idle = two_nodes
    jobs = [_submit_node_job(busy.url, steps=LONG) for _ in range(3)]
    try:
        wait_until(lambda: node_entry(balancer_server.url, busy.url)["queue_depth"] >= 2, what="the load to be seen")
        idle_id = node_entry(balancer_server.url, idle.url)["node_id"]
        for number in range(4):
            response = txt2img(balancer_server.url, unique_user(f"user{number}"))
            assert response.status_code == 200
            assert response.headers["X-SD-Node"] == idle_id
    finally:
        for job in jobs:
            requests.post(f"{busy.url}/node/jobs/{job}/cancel", headers={"X-SD-Node-Secret": NODE_SECRET}, timeout=30)


def _submit_node_job(node_url: str, **fields: Any) -> str:
    job_id = str(uuid.uuid4())
    body: dict[str, Any] = {"id": job_id, "api": "/sdapi/v1/txt2img", "user": "load-maker",
            "payload": {"prompt": "load", "width": 64, "height": 64, **fields}}  # fmt: skip
    response = requests.post(f"{node_url}/node/jobs", json=body, headers={"X-SD-Node-Secret": NODE_SECRET}, timeout=30)
    assert response.status_code == 202, response.text
    return job_id


def test_it_gives_a_draining_node_no_new_pins_but_lets_pinned_users_finish(
    two_nodes: list[ServerProcess], balancer_server: ServerProcess
) -> None:
    draining = two_nodes[0]
    draining_id = node_entry(balancer_server.url, draining.url)["node_id"]
    pinned = next(
        user for user in (unique_user("pinned") for _ in range(40))
        if txt2img(balancer_server.url, user).headers["X-SD-Node"] == draining_id
    )  # fmt: skip
    drain(balancer_server.url, draining.url)
    try:
        assert node_entry(balancer_server.url, draining.url)["draining"] is True
        for number in range(5):
            assert txt2img(balancer_server.url, unique_user(f"new{number}")).headers["X-SD-Node"] != draining_id
        assert txt2img(balancer_server.url, pinned).headers["X-SD-Node"] == draining_id, "finishes its cycle there"
        assert progress(balancer_server.url, pinned).headers["X-SD-Node"] == draining_id
    finally:
        drain(balancer_server.url, draining.url, draining=False)
    assert node_entry(balancer_server.url, draining.url)["draining"] is False


# ------------------------------------------------------------------------------------------------ in the process


@pytest.fixture
def pinned_nodes() -> Iterator[list[str]]:
    """Two nodes known to routing through records written straight into the cache (no processes)."""
    urls = ["http://gpu-1.test:7860", "http://gpu-2.test:7860"]
    cache.clear()
    with override_settings(SD_NODES=urls, SD_ROLE="balancer"):
        registry.refresh()
        for url in urls:
            health.write_health(NodeHealth(url=url, node_id=url[7:12], boot_id="boot-1", status=NodeStatus.READY,
                                           healthy=True))  # fmt: skip
        yield urls
    cache.clear()


@pytest.mark.django_db
def test_it_drops_the_pins_of_a_node_that_restarted(pinned_nodes: list[str]) -> None:
    decision, _ = pinning.start_cycle("user:alice", model=None)
    assert decision is not None and not decision.reused
    pinning.mark("user:alice", generating=True)
    record = health.read_health([decision.node.url])[decision.node.url]
    health.write_health(replace(record, boot_id="boot-2"))
    found = pinning.lookup("user:alice")
    assert found.state is PinState.LOST, "its job died with the old boot"
    assert pinning.lookup("user:alice").state is PinState.NONE
    assert pinning.current_pin("user:alice", fresh=True) is None


@pytest.mark.django_db
def test_it_reuses_a_live_pin_and_keeps_a_pinned_user_on_a_draining_node(pinned_nodes: list[str]) -> None:
    first, _ = pinning.start_cycle("user:bob", model=None)
    assert first is not None
    Node.objects.get(url=first.node.url).drain()
    again, _ = pinning.start_cycle("user:bob", model=None)
    assert again is not None and again.reused and again.node.url == first.node.url
    newcomer, _ = pinning.start_cycle("user:carol", model=None)
    assert newcomer is not None and newcomer.node.url != first.node.url


@pytest.mark.django_db
def test_it_uses_the_pin_another_process_wrote_first(pinned_nodes: list[str]) -> None:
    other = Pin(node_url=pinned_nodes[1], node_id="gpu-2", boot_id="boot-1", pinned_at=0.0)
    key = registry.cluster_key(f"pin:{hashlib.sha256(b'user:dave').hexdigest()}")
    with patch.object(routing, "choose_node", return_value=routing.node_state(pinned_nodes[0], fresh=True)):
        cache_add = cache.add

        def add_after_the_other_process(name: str, value: object, timeout: float) -> bool:
            cache.set(key, other, timeout)  # the other process pinned dave a moment earlier
            return bool(cache_add(name, value, timeout))

        with patch.object(cache, "add", side_effect=add_after_the_other_process):
            decision, _ = pinning.start_cycle("user:dave", model=None)
    assert decision is not None and decision.node.url == pinned_nodes[1] and decision.reused
