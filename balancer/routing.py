"""Routing: the nodes as routing sees them (registry + health), the node choice for a new cycle or task, passive
failures, and each user's model choice (shared through the cache by every balancer process).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Collection
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from balancer import health, registry

USER_MODEL_TTL = 30 * 24 * 3600  # a user's model choice outlives pins: like A1111's saved option


@dataclass(frozen=True, kw_only=True)
class NodeState:
    """One node for routing. `queue_depth` counts the node's jobs waiting or running; `healthy` is after rise/fall."""

    url: str
    node_id: str
    boot_id: str
    status: str
    healthy: bool
    draining: bool
    queue_depth: int
    capacity: int
    loaded_models: tuple[str, ...]
    models: tuple[str, ...]
    checked_at: float
    id: int = 0
    name: str = ""

    @property
    def load(self) -> float:
        return self.queue_depth / max(self.capacity, 1)

    @property
    def routable(self) -> bool:
        return self.healthy and not self.draining

    def holds_model(self, model: str) -> bool:
        return holds_model(self.loaded_models, model)

    def can_load(self, model: str) -> bool:
        """Has the model on disk (a node that lists no models is given the benefit of the doubt)."""
        return not self.models or holds_model(self.models, model)


# Every proxied call reads the nodes; within one process a view at most MEMO_SECONDS old is reused, which saves two
# cache round trips per progress poll. The checker writes only once per interval anyway; what this process changes
# itself (passive failures, drains) is seen at once.
MEMO_SECONDS = 0.2
_memo: tuple[float, list[NodeState]] | None = None


def known_nodes(*, fresh: bool = False) -> list[NodeState]:
    """Every known node with its health; `fresh` skips the process's short-lived copy."""
    global _memo
    memo = _memo
    now = time.monotonic()
    if not fresh and memo is not None and now - memo[0] < min(MEMO_SECONDS, settings.SD_HEALTH_INTERVAL / 4):
        return memo[1]
    entries = registry.nodes()
    records = health.read_health(entry.url for entry in entries)
    nodes = [_state(entry, records.get(entry.url)) for entry in entries]
    _memo = (now, nodes)
    return nodes


def forget_nodes() -> None:
    """Drop the process's copy: the next read sees the cache (after a change this process made)."""
    global _memo
    _memo = None


registry.CHANGE_LISTENERS.append(forget_nodes)


def healthy_nodes() -> list[NodeState]:
    return [node for node in known_nodes() if node.routable]


def node_state(url: str, *, fresh: bool = False) -> NodeState | None:
    return next((node for node in known_nodes(fresh=fresh) if node.url == url), None)


def _state(entry: registry.NodeEntry, record: health.NodeHealth | None) -> NodeState:
    record = record or health.NodeHealth(url=entry.url)
    return NodeState(
        url=entry.url,
        node_id=record.node_id or entry.name,
        boot_id=record.boot_id,
        status=record.status,
        healthy=record.healthy,
        draining=entry.draining,
        queue_depth=record.queue_depth,
        capacity=record.capacity,
        loaded_models=record.loaded_models,
        models=record.models,
        checked_at=record.checked_at,
        id=entry.id,
        name=entry.name,
    )


def choose_node(*, user_key: str, model: str | None, exclude: Collection[str] = ()) -> NodeState | None:
    """The node for a new cycle (or task) of `user_key`.

    1. Candidates: healthy, not draining, not in `exclude`; None when there are none.
    2. Nodes that already hold `model` (loaded, by title or name) come first: no model load for the user; then
       nodes that have it on disk; nodes without it come last.
    3. Then the least loaded: jobs waiting or running per unit of capacity.
    4. Ties go by a stable hash of the user and the node (rendezvous hashing): one user keeps landing on the same
       node while users spread evenly over equal nodes.
    """
    candidates = [node for node in known_nodes() if node.routable and node.url not in exclude]
    if not candidates:
        return None
    return min(
        candidates,
        key=lambda node: (_model_rank(node, model), node.load, _tie_breaker(user_key, node.url)),
    )


def _model_rank(node: NodeState, model: str | None) -> int:
    if not model or node.holds_model(model):
        return 0
    return 1 if node.can_load(model) else 2


def _tie_breaker(user_key: str, url: str) -> bytes:
    return hashlib.sha256(f"{user_key}\n{url}".encode()).digest()


def holds_model(titles: Collection[str], model: str) -> bool:
    """Does one of the checkpoint `titles` ("name.safetensors [hash]") name `model` (a title, name or stem)?"""
    wanted = model.strip()
    for title in titles:
        name = title.split(" [", 1)[0]
        if wanted in (title, name, name.rsplit(".", 1)[0]):
            return True
    return False


def report_failure(url: str) -> None:
    """A passive failure: a call to `url` could not reach it, which counts as a failed health check at once."""
    health.report_failure(url)


def _user_model_key(user_key: str) -> str:
    return registry.cluster_key(f"user-model:{hashlib.sha256(user_key.encode()).hexdigest()}")


def user_model(user_key: str) -> str | None:
    """The checkpoint the user chose with POST /sdapi/v1/options, if any."""
    model = cache.get(_user_model_key(user_key))
    return str(model) if model else None


def remember_user_model(user_key: str, model: str) -> None:
    cache.set(_user_model_key(user_key), model, USER_MODEL_TTL)
