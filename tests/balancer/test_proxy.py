"""The proxy in a real balancer process in front of fake nodes (routing only, never images): what a node receives,
listings merged over nodes, the user's model choice, anonymous callers, failover of refused calls, loop guard,
metrics. The same flows against real nodes are in test_pinning.py and test_failover.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import requests
from django.test import RequestFactory, override_settings

from balancer.views import client_address
from tests.balancer.conftest import in_background, status, unique_user, wait_until
from tests.balancer.fake_node import FakeNodeProcess
from tests.processes import ServerProcess

MODEL_A = "tiny-a.safetensors [aaaaaaaaaa]"
MODEL_B = "tiny-b.safetensors [bbbbbbbbbb]"
MODEL_C = "tiny-c.safetensors [cccccccccc]"


@pytest.fixture
def fakes(fake_nodes: Callable[..., FakeNodeProcess]) -> list[FakeNodeProcess]:
    return [
        fake_nodes("fake-a", models=(MODEL_A, MODEL_B)),
        fake_nodes("fake-b", models=(MODEL_B, MODEL_C)),
    ]


@pytest.fixture
def balancer(fakes: list[FakeNodeProcess], balancers: Callable[..., ServerProcess]) -> ServerProcess:
    server = balancers(fakes)
    wait_until(lambda: status(server.url)["up"] == 2, what="both fake nodes up")
    return server


def call(balancer: ServerProcess, method: str, endpoint: str, user: str | None, **options: Any) -> requests.Response:
    headers = {"X-User-Id": user} if user else {}
    headers.update(options.pop("headers", {}))
    return requests.request(method, f"{balancer.url}{endpoint}", headers=headers, timeout=30, **options)


def by_id(fakes: list[FakeNodeProcess], node_id: str) -> FakeNodeProcess:
    return next(fake for fake in fakes if fake.node_id == node_id)


def test_it_sends_a_whole_cycle_to_the_pinned_node(balancer: ServerProcess, fakes: list[FakeNodeProcess]) -> None:
    alice = unique_user("alice")
    generated = call(balancer, "POST", "/sdapi/v1/txt2img", alice, json={"prompt": "a lighthouse"})
    assert generated.status_code == 200
    node_id = generated.headers["X-SD-Node"]
    cycle = [("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/interrupt"), ("POST", "/sdapi/v1/skip"),
             ("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/memory")]  # fmt: skip
    for method, endpoint in cycle:
        response = call(balancer, method, endpoint, alice)
        assert response.headers.get("X-SD-Node") == node_id, endpoint
    assert status(balancer.url, alice)["pin"]["node_id"] == node_id
    paths = [seen["path"] for seen in by_id(fakes, node_id).received() if seen["headers"].get("x-user-id") == alice]
    assert paths == ["/sdapi/v1/txt2img", "/sdapi/v1/progress", "/sdapi/v1/interrupt", "/sdapi/v1/skip",
                     "/sdapi/v1/options", "/sdapi/v1/memory"]  # fmt: skip


def test_it_answers_progress_interrupt_and_skip_itself_without_a_pin(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    bob = unique_user("bob")
    progress = call(balancer, "GET", "/sdapi/v1/progress", bob)
    assert progress.status_code == 200
    assert progress.json()["progress"] == 0.0 and progress.json()["state"]["job_count"] == 0
    assert "X-SD-Node" not in progress.headers
    assert call(balancer, "POST", "/sdapi/v1/interrupt", bob).json() == {}
    assert call(balancer, "POST", "/sdapi/v1/skip", bob).content == b"null"
    assert not [seen for fake in fakes for seen in fake.received() if seen["headers"].get("x-user-id") == bob]


def test_it_forwards_the_signed_user_and_client_but_no_connection_or_credentials(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    carol = unique_user("carol")
    headers = {"Cookie": "sessionid=secret", "X-Forwarded-For": "203.0.113.9", "Connection": "keep-alive, X-Private",
               "Keep-Alive": "timeout=5", "X-Custom": "kept"}  # fmt: skip
    response = call(balancer, "POST", "/sdapi/v1/txt2img", carol, json={"prompt": "x"}, headers=headers)
    assert response.status_code == 200
    assert "keep-alive" not in {key.lower() for key in response.headers}
    seen = next(s for s in by_id(fakes, response.headers["X-SD-Node"]).received() if s["path"] == "/sdapi/v1/txt2img"
                and s["headers"].get("x-user-id") == carol)  # fmt: skip
    forwarded = seen["headers"]
    assert forwarded["x-custom"] == "kept"
    assert "cookie" not in forwarded and "keep-alive" not in forwarded and "authorization" not in forwarded
    assert forwarded["x-sd-user"].startswith(f"{carol}|0|"), "signed by the balancer"
    assert forwarded["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    forged = call(balancer, "POST", "/sdapi/v1/txt2img", None, json={"prompt": "x"},
                  headers={"X-SD-User": "mallory|1|0|forged"})  # fmt: skip
    assert forged.status_code == 401 and forged.json()["error"] == "HTTPException"


def test_it_merges_listings_over_healthy_nodes(balancer: ServerProcess) -> None:
    response = call(balancer, "GET", "/sdapi/v1/sd-models", unique_user("dave"))
    assert response.status_code == 200
    assert sorted(model["title"] for model in response.json()) == [MODEL_A, MODEL_B, MODEL_C], "each once"
    samplers = call(balancer, "GET", "/sdapi/v1/samplers", None).json()
    assert [sampler["name"] for sampler in samplers] == ["Euler"]


def test_it_remembers_the_model_choice_and_applies_it_on_any_node(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    erin = unique_user("erin")
    refused = call(balancer, "POST", "/sdapi/v1/options", erin, json={"sd_model_checkpoint": "missing.safetensors"})
    assert refused.status_code == 422, "the node's answer passes through"
    chosen = call(balancer, "POST", "/sdapi/v1/options", erin, json={"sd_model_checkpoint": MODEL_C})
    assert chosen.status_code == 200 and chosen.content == b"null"
    assert chosen.headers["X-SD-Node"] == "fake-b", "pinned to the only node that has the model"
    assert call(balancer, "GET", "/sdapi/v1/options", erin).json()["sd_model_checkpoint"] == MODEL_C
    generated = call(balancer, "POST", "/sdapi/v1/txt2img", erin, json={"prompt": "x"})
    assert json.loads(generated.json()["info"])["sd_model_checkpoint"] == MODEL_C
    explicit = call(balancer, "POST", "/sdapi/v1/txt2img", erin,
                    json={"prompt": "x", "override_settings": {"sd_model_checkpoint": MODEL_B}})  # fmt: skip
    assert json.loads(explicit.json()["info"])["sd_model_checkpoint"] == MODEL_B, "the body's own choice wins"


def test_it_prefers_the_node_that_holds_the_requested_model(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    fakes[0].set_state(loaded_models=[MODEL_A], queue_depth=3)
    fakes[1].set_state(loaded_models=[MODEL_B], queue_depth=0)
    wait_until(lambda: status(balancer.url)["queue_depth"] == 3, what="the load to be seen")
    for number in range(6):
        user = unique_user(f"user{number}")
        body = {"prompt": "x", "override_settings": {"sd_model_checkpoint": MODEL_A}}
        assert call(balancer, "POST", "/sdapi/v1/txt2img", user, json=body).headers["X-SD-Node"] == "fake-a"
        plain = call(balancer, "POST", "/sdapi/v1/txt2img", unique_user(f"plain{number}"), json={"prompt": "x"})
        assert plain.headers["X-SD-Node"] == "fake-b", "no model asked: the least loaded node"


def test_it_pins_callers_without_a_user_by_their_address(balancer: ServerProcess) -> None:
    first = {"X-Forwarded-For": "198.51.100.1"}
    second = {"X-Forwarded-For": "198.51.100.2"}
    assert call(balancer, "POST", "/sdapi/v1/txt2img", None, json={"prompt": "x"}, headers=first).status_code == 200
    pinned = requests.get(f"{balancer.url}/balancer/status", headers=first, timeout=10).json()["pin"]
    assert pinned is not None
    assert requests.get(f"{balancer.url}/balancer/status", headers=second, timeout=10).json()["pin"] is None
    progress = call(balancer, "GET", "/sdapi/v1/progress", None, headers=first)
    assert progress.headers["X-SD-Node"] == pinned["node_id"]
    assert "X-SD-Node" not in call(balancer, "GET", "/sdapi/v1/progress", None, headers=second).headers


def test_it_sends_a_refused_call_to_another_node(balancer: ServerProcess, fakes: list[FakeNodeProcess]) -> None:
    frank = unique_user("frank")
    first = call(balancer, "POST", "/sdapi/v1/txt2img", frank, json={"prompt": "x"})
    victim = by_id(fakes, first.headers["X-SD-Node"])
    victim.kill()
    again = call(balancer, "POST", "/sdapi/v1/txt2img", frank, json={"prompt": "x"})
    assert again.status_code == 200, again.text
    assert again.headers["X-SD-Node"] != victim.node_id
    assert status(balancer.url, frank)["pin"]["node_id"] == again.headers["X-SD-Node"]


def test_it_fails_a_generation_whose_node_dies_with_a_json_502_and_repins(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    grace = unique_user("grace")
    for fake in fakes:
        fake.set_state(delay=30)
    node_id = call(balancer, "POST", "/sdapi/v1/txt2img", grace, json={"prompt": "x", "fake_delay": 0}).headers[
        "X-SD-Node"
    ]
    victim = by_id(fakes, node_id)
    with requests.Session() as session:
        pending = in_background(lambda: session.post(f"{balancer.url}/sdapi/v1/txt2img", json={"prompt": "x"},
                                                      headers={"X-User-Id": grace}, timeout=60))  # fmt: skip
        wait_until(lambda: any(s["path"] == "/sdapi/v1/txt2img" for s in victim.received()[1:]), what="the call")
        victim.kill()
        response = pending()
    assert response.status_code == 502
    assert set(response.json()) == {"error", "detail", "body", "errors"}
    assert node_id in response.json()["detail"]
    lost = call(balancer, "GET", "/sdapi/v1/progress", grace).json()
    assert lost["textinfo"] == "the node serving your job went down; submit again"
    assert call(balancer, "GET", "/sdapi/v1/progress", grace).json()["textinfo"] is None, "said once"
    survivor = next(fake for fake in fakes if fake is not victim)
    survivor.set_state(delay=0)
    again = call(balancer, "POST", "/sdapi/v1/txt2img", grace, json={"prompt": "x"})
    assert again.status_code == 200 and again.headers["X-SD-Node"] == survivor.node_id


def test_it_answers_503_with_retry_after_when_no_node_is_up(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    for fake in fakes:
        fake.kill()
    wait_until(lambda: status(balancer.url)["up"] == 0, timeout=10, what="both nodes down")
    response = call(balancer, "POST", "/sdapi/v1/txt2img", unique_user("heidi"), json={"prompt": "x"})
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"] == "NoNodeAvailable"
    assert call(balancer, "GET", "/sdapi/v1/sd-models", None).status_code == 503


def test_it_refuses_to_forward_a_call_that_already_went_through_a_balancer(balancer: ServerProcess) -> None:
    response = call(balancer, "GET", "/sdapi/v1/sd-models", None, headers={"X-SD-Via": "balancer"})
    assert response.status_code == 404 and response.json() == {"detail": "Not Found"}


def test_it_publishes_node_and_proxy_metrics(balancer: ServerProcess) -> None:
    call(balancer, "GET", "/sdapi/v1/progress", unique_user("ivan"))
    for path in ("/metrics", "/balancer/metrics"):
        text = requests.get(f"{balancer.url}{path}", timeout=10).text
        assert "sd_balancer_nodes_up 2.0" in text
        assert 'sd_balancer_proxied_requests_total{kind="progress",status="200"}' in text
        assert "sd_balancer_proxy_seconds_bucket" in text


def test_it_passes_node_errors_through_without_counting_them_against_the_node(
    balancer: ServerProcess, fakes: list[FakeNodeProcess]
) -> None:
    judy = unique_user("judy")
    node_id = call(balancer, "POST", "/sdapi/v1/txt2img", judy, json={"prompt": "x"}).headers["X-SD-Node"]
    by_id(fakes, node_id).set_state(generation_error=503)
    for _ in range(5):
        response = call(balancer, "POST", "/sdapi/v1/txt2img", judy, json={"prompt": "x"})
        assert response.status_code == 503 and response.json()["error"] == "DeviceOutOfMemoryError"
        assert response.headers["X-SD-Node"] == node_id, "the same node: an answer is no failure"
        assert (
            call(balancer, "POST", "/sdapi/v1/options", judy, json={"sd_model_checkpoint": "nope"}).status_code == 422
        )
    assert all(node["healthy"] for node in status(balancer.url)["nodes"])
    assert status(balancer.url, judy)["pin"]["node_id"] == node_id


@pytest.mark.parametrize(
    ("behind_proxy", "forwarded", "address"),
    [
        (False, "", "192.0.2.7"),
        (False, "198.51.100.1", "192.0.2.7"),  # a direct client's claim is ignored
        (True, "198.51.100.1", "198.51.100.1"),  # what Apache appended
        (True, "203.0.113.66, 198.51.100.1", "198.51.100.1"),  # a forged first hop is not the client
        (True, "", "192.0.2.7"),
    ],
)
def test_it_knows_an_unnamed_caller_by_the_address_it_can_trust(behind_proxy: bool, forwarded: str, address: str):
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    request = RequestFactory().get("/sdapi/v1/progress", REMOTE_ADDR="192.0.2.7", headers=headers)
    with override_settings(SD_BEHIND_PROXY=behind_proxy):
        assert client_address(request) == address
