"""The node registry: SD_NODES, the local node of `all`, self-registration with heartbeats (the balancer's endpoint
and the node's Registrar), forgetting silent nodes, and the admin's node list with health and drain actions."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from unittest.mock import patch

import pytest
import requests
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client, override_settings
from django.utils import timezone
from rest_framework.authtoken.models import Token

from balancer import dispatcher, health, registry
from balancer.health import NodeHealth, NodeStatus
from balancer.models import Node, NodeSource
from gpu_node.registration import Registrar
from tests.balancer.conftest import NODE_SECRET, node_entry, status, wait_until
from tests.balancer.fake_node import FakeNodeProcess
from tests.processes import ServerProcess


@pytest.fixture
def clean_cache() -> Iterator[None]:
    cache.clear()
    yield
    cache.clear()


# --------------------------------------------------------------------------------------------- in the process


@pytest.mark.django_db
def test_it_knows_the_nodes_listed_in_sd_nodes(clean_cache: None) -> None:
    urls = ["http://gpu-1.test:7860", "http://gpu-2.test:7860"]
    with override_settings(SD_NODES=urls, SD_ROLE="balancer"):
        assert [entry.url for entry in registry.refresh()] == urls
    assert set(Node.objects.values_list("source", flat=True)) == {NodeSource.STATIC}


@pytest.mark.django_db
def test_it_knows_the_local_node_in_all_mode_without_sd_nodes(clean_cache: None) -> None:
    with override_settings(SD_NODES=[], SD_ROLE="all"):
        assert [entry.url for entry in registry.refresh()] == ["http://127.0.0.1:7860"]
    with override_settings(SD_NODES=[], SD_ROLE="all", SD_LOCAL_NODE_URL="http://127.0.0.1:8000/"):
        assert [entry.url for entry in registry.refresh()] == ["http://127.0.0.1:8000"]
    with override_settings(SD_NODES=[], SD_ROLE="balancer"):
        assert registry.refresh() == ()


@pytest.mark.django_db
def test_it_forgets_a_registered_node_that_stopped_heartbeating(clean_cache: None) -> None:
    with override_settings(SD_NODES=[], SD_ROLE="balancer"):
        registry.register("http://scaled-1.test:7860", node_id="scaled-1")
        assert [entry.url for entry in registry.nodes()] == ["http://scaled-1.test:7860"]
        silent_since = timezone.now() - registry.registration_expiry() - timedelta(seconds=1)
        Node.objects.update(last_heartbeat=silent_since)
        assert registry.refresh() == ()
        registry.register("http://scaled-1.test:7860", node_id="scaled-1")
        assert [entry.url for entry in registry.nodes()] == ["http://scaled-1.test:7860"], "a heartbeat brings it back"


@pytest.mark.django_db
def test_it_lists_nodes_with_their_health_in_the_admin_and_drains_them(clean_cache: None) -> None:
    urls = ["http://gpu-1.test:7860", "http://gpu-2.test:7860"]
    with override_settings(SD_NODES=urls, SD_ROLE="balancer"):
        registry.refresh()
        health.write_health(NodeHealth(url=urls[0], node_id="gpu-1", status=NodeStatus.BUSY, healthy=True,
                                       queue_depth=3, loaded_models=("tiny.safetensors [0123456789]",)))  # fmt: skip
        client = Client()
        client.force_login(User.objects.create_superuser("staff", "staff@example.com", "password"))
        page = client.get("/admin/balancer/node/")
        assert page.status_code == 200
        html = page.content.decode()
        assert "busy" in html and "tiny.safetensors [0123456789]" in html and "down" in html
        first = Node.objects.get(url=urls[0])
        drained = client.post("/admin/balancer/node/", {"action": "drain", "_selected_action": [first.pk]})
        assert drained.status_code == 302
        assert [entry.draining for entry in registry.nodes()] == [True, False], "routing sees the drain at once"


# -------------------------------------------------------------------------------------------- real processes


@pytest.fixture
def lonely_balancer(balancers: Callable[..., ServerProcess]) -> ServerProcess:
    """A balancer that starts with no node at all."""
    return balancers([])


def test_it_takes_a_node_that_registers_itself_and_checks_its_health(
    lonely_balancer: ServerProcess, fake_nodes: Callable[..., FakeNodeProcess]
) -> None:
    fake = fake_nodes("scaled-fake")
    assert status(lonely_balancer.url)["total"] == 0
    registrar = Registrar(balancer_url=lonely_balancer.url, node_url=fake.url, node_id="scaled-fake",
                          secret=NODE_SECRET, interval=1.0)  # fmt: skip
    assert registrar.register_once()
    entry = wait_until(lambda: node_entry(lonely_balancer.url, fake.url)["healthy"] and node_entry(
        lonely_balancer.url, fake.url), what="the registered node up")  # fmt: skip
    assert entry["node_id"] == "scaled-fake"
    assert registrar.register_once(), "a heartbeat re-registers the same node"
    assert status(lonely_balancer.url)["total"] == 1


def test_it_refuses_registrations_without_the_node_secret_or_with_a_bad_url(lonely_balancer: ServerProcess) -> None:
    endpoint = f"{lonely_balancer.url}/balancer/nodes/register"
    body = {"url": "http://127.0.0.1:9", "node_id": "intruder"}
    assert requests.post(endpoint, json=body, timeout=10).status_code == 403
    assert requests.post(endpoint, json=body, headers={"X-SD-Node-Secret": "wrong"}, timeout=10).status_code == 403
    bad = requests.post(endpoint, json={"url": "ftp://x"}, headers={"X-SD-Node-Secret": NODE_SECRET}, timeout=10)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "url"]
    assert status(lonely_balancer.url)["total"] == 0


def test_it_takes_a_real_node_started_with_sd_balancer_url(
    lonely_balancer: ServerProcess, tiny_models_dir: Path
) -> None:
    node = ServerProcess(role="node", data_dir=lonely_balancer.data_dir / "node", env={
        "SD_MODELS_DIR": str(tiny_models_dir), "SD_NODE_SECRET": NODE_SECRET, "SD_DEVICE": "cpu",
        "SD_BALANCER_URL": lonely_balancer.url, "SD_HEALTH_INTERVAL": "0.5",
    })  # fmt: skip
    node.env["SD_NODE_URL"] = node.url
    node.start()
    try:
        entry = wait_until(lambda: status(lonely_balancer.url)["up"] == 1 and status(lonely_balancer.url)["nodes"][0],
                           timeout=30, what="the node registered and up")  # fmt: skip
        assert entry["url"] == node.url
        response = requests.post(f"{lonely_balancer.url}/sdapi/v1/txt2img", headers={"X-User-Id": "alice"},
                                 json={"prompt": "x", "steps": 1, "width": 64, "height": 64}, timeout=120)  # fmt: skip
        assert response.status_code == 200 and response.json()["images"]
    finally:
        node.kill(signal.SIGKILL)


@pytest.mark.django_db
def test_it_lets_only_staff_drain_a_node_in_token_mode(clean_cache: None) -> None:
    with override_settings(SD_NODES=["http://gpu-1.test:7860"], SD_ROLE="balancer", SD_AUTH="token"):
        node = Node.objects.get(url=registry.refresh()[0].url)
        staff = Token.objects.create(user=User.objects.create_user("staff", is_staff=True)).key
        alice = Token.objects.create(user=User.objects.create_user("alice")).key
        endpoint = f"/balancer/nodes/{node.pk}/drain"
        client = Client()
        assert client.post(endpoint).status_code == 401
        refused = client.post(endpoint, HTTP_AUTHORIZATION=f"Bearer {alice}")
        assert refused.status_code == 403 and refused.json()["error"] == "HTTPException"
        drained = client.post(endpoint, HTTP_AUTHORIZATION=f"Bearer {staff}")
        assert drained.status_code == 200 and drained.json()["draining"] is True
        assert registry.nodes()[0].draining
        assert (
            client.post(f"/balancer/nodes/{node.pk}/undrain", HTTP_AUTHORIZATION=f"Bearer {staff}").json()["draining"]
            is False
        )
        with patch.object(dispatcher, "ensure_balancer_threads"):  # no background threads in the test process
            unauthenticated = client.get("/sdapi/v1/progress")
        assert unauthenticated.status_code == 401 and unauthenticated.json()["detail"] == "Not authenticated"
