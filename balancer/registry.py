"""The node registry: which GPU nodes the balancer knows (SD_NODES, self-registered nodes, the local node in `all`),
and which of them are draining.

Node rows live in the database (the admin edits them); a snapshot of them lives in the cache, so routing reads one
cache key per request and every balancer process sees a drain at once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.cache import cache
from django.db import connections
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from django.utils import timezone

from balancer.models import Node, NodeSource

CHANGE_LISTENERS: list[Callable[[], None]] = []  # told when a node or its health changes (routing drops its memo)
SNAPSHOT_TTL = 10.0  # seconds; writers refresh it at once, the TTL only bounds how stale an outside edit can be


@dataclass(frozen=True, kw_only=True)
class NodeEntry:
    """A node as configured: where it is and whether an operator drains it (its health is in balancer.health)."""

    id: int
    url: str
    name: str
    source: str
    draining: bool


def cluster_key(name: str) -> str:
    """A cache key private to this cluster: balancers that share a database form one cluster, and several clusters
    (or test runs) may share one Redis without seeing each other's nodes, pins or checker lock."""
    return f"balancer:{_cluster_id()}:{name}"


_cluster: str | None = None


def _cluster_id() -> str:
    global _cluster
    if _cluster is None:
        database = connections.databases["default"]
        identity = "|".join(str(database.get(part, "")) for part in ("ENGINE", "HOST", "PORT", "NAME"))
        _cluster = hashlib.sha256(identity.encode()).hexdigest()[:12]
    return _cluster


def local_node_url() -> str:
    return str(settings.SD_LOCAL_NODE_URL).rstrip("/")


def static_urls() -> list[str]:
    """SD_NODES; in `all` with none listed, the node this process serves itself."""
    if settings.SD_NODES:
        return list(settings.SD_NODES)
    if settings.SD_ROLE == "all":
        return [local_node_url()]
    return []


def checked_node_url(value: object) -> str:
    """A node's base URL as given at registration: http(s), a host, no trailing slash."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("url is required: the node's base URL, e.g. http://10.0.0.5:7860")
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.strip().rstrip("/")


def registration_expiry() -> timedelta:
    """A registered node that stopped heartbeating (every 2 intervals) for this long is forgotten."""
    return timedelta(seconds=max(30.0, 10 * settings.SD_HEALTH_INTERVAL))


def nodes() -> tuple[NodeEntry, ...]:
    """The known nodes, from the cached snapshot (rebuilt from the database when missing)."""
    snapshot: tuple[NodeEntry, ...] | None = cache.get(cluster_key("registry"))
    if snapshot is None:
        snapshot = refresh()
    return snapshot


def refresh() -> tuple[NodeEntry, ...]:
    """Read the node rows (creating the static ones), store the snapshot in the cache, and return it.

    1. Every static URL has a row (source static); an operator may drain it in the admin.
    2. Known: static rows whose URL is still configured, and registered rows with a recent heartbeat.
    """
    static = static_urls()
    existing = set(Node.objects.filter(url__in=static).values_list("url", flat=True))
    for url in static:
        if url not in existing:
            Node.objects.get_or_create(url=url, defaults={"source": NodeSource.STATIC})
    fresh_after = timezone.now() - registration_expiry()
    entries = tuple(
        NodeEntry(id=node.id, url=node.url, name=node.name, source=node.source, draining=node.draining)
        for node in Node.objects.all()
        if node.url in static
        or (node.source == NodeSource.REGISTERED and node.last_heartbeat and node.last_heartbeat >= fresh_after)
    )
    cache.set(cluster_key("registry"), entries, SNAPSHOT_TTL)
    changed()
    return entries


def changed() -> None:
    """This process changed a node or its health: whatever it keeps of them must be read again."""
    for listener in CHANGE_LISTENERS:
        listener()


def register(url: str, *, node_id: str) -> Node:
    """A node announced itself (or heartbeats): upsert its row and make it known at once."""
    node, created = Node.objects.get_or_create(
        url=url, defaults={"source": NodeSource.REGISTERED, "name": node_id, "last_heartbeat": timezone.now()}
    )
    if not created:
        # Only the heartbeat (and a changed node id) are written: draining is the operator's.
        Node.objects.filter(pk=node.pk).update(last_heartbeat=timezone.now(), name=node_id or node.name)
        node.refresh_from_db()
    if created or url not in {entry.url for entry in nodes()}:
        refresh()
    return node


@receiver(post_save, sender=Node)
@receiver(post_delete, sender=Node)
def _node_changed(sender: type[Node], instance: Node, **kwargs: Any) -> None:
    """A drain, an edit or a removal (admin or API) reaches routing at once, not after SNAPSHOT_TTL."""
    cache.delete(cluster_key("registry"))
    changed()
