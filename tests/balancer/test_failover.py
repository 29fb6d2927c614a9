"""Nodes failing under a real balancer: a node killed (SIGKILL) or hung (SIGSTOP) mid-generation fails the waiting
call with a JSON error within the detection time, the user is re-pinned, progress says the job was lost; a hung
node comes back after rise checks; with every node down the balancer answers 503 at once."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from balancer.health import FALL, RISE
from balancer.pinning import LOST_JOB_TEXT
from tests.balancer.conftest import (
    HEALTH_INTERVAL,
    as_user,
    drain,
    in_background,
    node_entry,
    start_node,
    status,
    txt2img,
    unique_user,
    wait_until,
)
from tests.processes import ServerProcess

LONG = 1500  # steps: ~15 s on a CPU core with the tiny model; the node dies long before
# A hung node is down after FALL failed checks, each taking at most the health timeout (2 intervals) plus an interval.
DETECTION_S = FALL * 3 * float(HEALTH_INTERVAL) + 2.0


@pytest.fixture
def victim(tiny_models_dir: Path) -> Iterator[ServerProcess]:
    """A node of its own for the test to kill."""
    node = start_node(tiny_models_dir)
    yield node
    node.kill(signal.SIGCONT)
    node.kill()


@pytest.fixture
def pair(
    victim: ServerProcess, two_nodes: list[ServerProcess], balancers: Callable[..., ServerProcess]
) -> tuple[ServerProcess, ServerProcess, ServerProcess]:
    """(balancer, victim, survivor): a balancer in front of the victim and one session node."""
    survivor = two_nodes[0]
    balancer = balancers([victim, survivor])
    wait_until(lambda: status(balancer.url)["up"] == 2, what="both nodes up")
    return balancer, victim, survivor


def pin_to(balancer: ServerProcess, node: ServerProcess, others: list[ServerProcess], user: str) -> str:
    """Pin `user` to `node` (the others drained while the cycle starts); returns the node's id."""
    for other in others:
        drain(balancer.url, other.url)
    try:
        response = txt2img(balancer.url, user)
    finally:
        for other in others:
            drain(balancer.url, other.url, draining=False)
    assert response.status_code == 200, response.text
    assert response.headers["X-SD-Node"] == node_entry(balancer.url, node.url)["node_id"]
    return response.headers["X-SD-Node"]


def progress(balancer: ServerProcess, user: str) -> dict[str, object]:
    return dict(requests.get(f"{balancer.url}/sdapi/v1/progress", headers=as_user(user), timeout=30).json())


def start_long_job(balancer: ServerProcess, user: str) -> Callable[[], requests.Response]:
    pending = in_background(lambda: txt2img(balancer.url, user, steps=LONG, timeout=300))
    wait_until(lambda: progress(balancer, user)["state"]["sampling_step"], timeout=60, what="the job to run")  # type: ignore[index]
    return pending


def test_it_fails_the_waiting_call_at_once_when_its_node_is_killed_and_repins(
    pair: tuple[ServerProcess, ServerProcess, ServerProcess],
) -> None:
    balancer, victim, survivor = pair
    alice = unique_user("alice")
    victim_id = pin_to(balancer, victim, [survivor], alice)
    pending = start_long_job(balancer, alice)

    killed_at = time.monotonic()
    victim.kill(signal.SIGKILL)
    response = pending()
    assert time.monotonic() - killed_at < DETECTION_S
    assert response.status_code == 502
    error = response.json()
    assert set(error) == {"error", "detail", "body", "errors"}
    assert victim_id in error["detail"]

    assert progress(balancer, alice)["textinfo"] == LOST_JOB_TEXT
    assert progress(balancer, alice)["textinfo"] is None, "the loss is told once"
    again = txt2img(balancer.url, alice)
    assert again.status_code == 200, again.text
    assert again.headers["X-SD-Node"] == node_entry(balancer.url, survivor.url)["node_id"]
    assert status(balancer.url, alice)["pin"]["url"] == survivor.url
    wait_until(lambda: not node_entry(balancer.url, victim.url)["healthy"], timeout=DETECTION_S, what="down")
    assert node_entry(balancer.url, victim.url)["status"] == "down"


def test_it_fails_the_waiting_call_when_its_node_hangs_and_takes_the_node_back_after_rise(
    pair: tuple[ServerProcess, ServerProcess, ServerProcess],
) -> None:
    balancer, victim, survivor = pair
    bob = unique_user("bob")
    pin_to(balancer, victim, [survivor], bob)
    pending = start_long_job(balancer, bob)

    stopped_at = time.monotonic()
    victim.kill(signal.SIGSTOP)
    response = pending()
    assert time.monotonic() - stopped_at < DETECTION_S
    assert response.status_code == 502
    assert "went down" in response.json()["detail"]
    assert not node_entry(balancer.url, victim.url)["healthy"]

    assert progress(balancer, bob)["textinfo"] == LOST_JOB_TEXT
    again = txt2img(balancer.url, bob)
    assert again.status_code == 200
    assert again.headers["X-SD-Node"] == node_entry(balancer.url, survivor.url)["node_id"]

    victim.kill(signal.SIGCONT)
    resumed_at = time.monotonic()
    wait_until(lambda: node_entry(balancer.url, victim.url)["healthy"], timeout=20, what="the node back")
    assert time.monotonic() - resumed_at >= (RISE - 1) * float(HEALTH_INTERVAL), f"back after {RISE} good checks"


def test_it_answers_503_with_retry_after_at_once_when_every_node_is_down(
    victim: ServerProcess, balancers: Callable[..., ServerProcess]
) -> None:
    balancer = balancers([victim])
    wait_until(lambda: status(balancer.url)["up"] == 1, what="the node up")
    carol = unique_user("carol")
    assert txt2img(balancer.url, carol).status_code == 200
    victim.kill(signal.SIGKILL)
    wait_until(lambda: status(balancer.url)["up"] == 0, timeout=DETECTION_S, what="the node down")
    started = time.monotonic()
    response = txt2img(balancer.url, carol)
    assert time.monotonic() - started < 1.0
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) >= 1
    assert set(response.json()) == {"error", "detail", "body", "errors"}
    listing = requests.get(f"{balancer.url}/sdapi/v1/sd-models", timeout=10)
    assert listing.status_code == 503
