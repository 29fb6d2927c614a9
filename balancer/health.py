"""Node health: active checks of `/node/health` with rise/fall counts, passive failures from proxied calls, and the
one checker per cluster that runs them. Health records live in the cache so every balancer process agrees.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import requests
from django.conf import settings
from django.core.cache import cache
from django.db import close_old_connections
from django.db.models import TextChoices

from balancer import registry
from balancer.node_client import NodeClient, NodeUnreachable, get_node_client

log = logging.getLogger(__name__)

RISE = 2  # good checks in a row that bring a down node back
FALL = 3  # failed checks in a row that take a node down
MAX_PARALLEL_CHECKS = 16

Clock = Callable[[], float]


class NodeStatus(TextChoices):
    READY = "ready"
    BUSY = "busy"
    STARTING = "starting"
    UNHEALTHY = "unhealthy"
    DOWN = "down"


SERVING_STATUSES = frozenset({NodeStatus.READY, NodeStatus.BUSY})


@dataclass(frozen=True, kw_only=True)
class NodeHealth:
    """What the checks know of one node: its last answer, and the rise/fall counters that decide `healthy`."""

    url: str
    node_id: str = ""
    boot_id: str = ""
    status: NodeStatus = NodeStatus.DOWN
    healthy: bool = False
    passes: int = 0
    fails: int = 0
    queue_depth: int = 0
    capacity: int = 1
    loaded_models: tuple[str, ...] = ()
    models: tuple[str, ...] = ()
    checked_at: float = 0.0
    reason: str = ""


def health_key(url: str) -> str:
    return registry.cluster_key(f"health:{url}")


def read_health(urls: Iterable[str]) -> dict[str, NodeHealth]:
    keys = {health_key(url): url for url in urls}
    found = cache.get_many(list(keys))
    return {keys[key]: record for key, record in found.items()}


def write_health(record: NodeHealth) -> None:
    cache.set(health_key(record.url), record, None)
    registry.changed()


def observe(
    previous: NodeHealth | None, *, url: str, document: Mapping[str, Any] | None, failure: str = "", now: float
) -> NodeHealth:
    """The next health record of a node after one check (or one passive failure when `document` is None).

    1. An answer from another boot (boot_id changed) is a new node: its counters start afresh.
    2. A check passes when the node answered with a serving status (ready, busy); `starting` and `unhealthy`
       answers, errors and passive failures fail it.
    3. Passes in a row reset the fails; the node turns healthy after RISE of them, or at once when it is seen for
       the first time (no earlier failure to distrust).
    4. Fails in a row reset the passes; the node turns unhealthy after FALL of them.
    5. The status shown is the node's own word while it answers; `down` once it is unhealthy and silent.
    """
    first_seen = previous is None or (document is not None and document.get("boot_id") != previous.boot_id)
    base = NodeHealth(url=url) if first_seen or previous is None else previous
    if document is not None:
        reported = _status(document.get("status"))
        base = replace(
            base,
            node_id=str(document.get("node_id") or ""),
            boot_id=str(document.get("boot_id") or ""),
            status=reported,
            queue_depth=_load(document),
            capacity=max(1, _int(document.get("capacity"), 1)),
            loaded_models=_titles(document.get("loaded_models")),
            models=_titles(document.get("models")),
        )
        passed = reported in SERVING_STATUSES
        failure = failure or ("" if passed else f"node reports {reported}")
    else:
        passed = False
    if passed:
        passes = base.passes + 1
        healthy = base.healthy or first_seen or passes >= RISE
        return replace(base, passes=passes, fails=0, healthy=healthy, checked_at=now, reason="")
    fails = base.fails + 1
    healthy = base.healthy and fails < FALL
    status = base.status if (healthy or document is not None) else NodeStatus.DOWN
    return replace(base, passes=0, fails=fails, healthy=healthy, status=status, checked_at=now, reason=failure)


def _status(value: Any) -> NodeStatus:
    return NodeStatus(value) if value in NodeStatus.values and value != NodeStatus.DOWN else NodeStatus.UNHEALTHY


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _load(document: Mapping[str, Any]) -> int:
    """Jobs waiting or running on the node: a node busy with one job is more loaded than an idle one."""
    running = document.get("running_jobs")
    return _int(document.get("queue_depth")) + (len(running) if isinstance(running, list) else 0)


def _titles(value: Any) -> tuple[str, ...]:
    return tuple(str(title) for title in value) if isinstance(value, list) else ()


def report_failure(url: str, reason: str = "proxied call failed", *, clock: Clock = time.time) -> NodeHealth | None:
    """A passive failure (a proxied call could not reach the node) counts as a failed check at once."""
    previous = read_health([url]).get(url)
    if previous is None:
        return None
    record = observe(previous, url=url, document=None, failure=f"passive: {reason}", now=clock())
    write_health(record)
    if previous.healthy and not record.healthy:
        log.warning("node %s is down: %s", url, record.reason)
    return record


class HealthChecker:
    """Checks every known node every SD_HEALTH_INTERVAL while this process holds the cluster's checker lock, so
    that several balancer processes share one checker (the lock moves on when its holder dies)."""

    def __init__(
        self,
        *,
        client: NodeClient | None = None,
        clock: Clock = time.time,
        interval: float | None = None,
        owner: str | None = None,
    ) -> None:
        self.client = client
        self.clock = clock
        self.interval = interval if interval is not None else settings.SD_HEALTH_INTERVAL
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.lock_ttl = max(3 * self.interval, 5.0)
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.pool = ThreadPoolExecutor(max_workers=MAX_PARALLEL_CHECKS, thread_name_prefix="health-check")

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="balancer-health", daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                if self.hold_lock():
                    self.check_round()
            except Exception:  # the checker must outlive a database or cache hiccup
                log.exception("health check round failed")
            finally:
                close_old_connections()
            # A full interval between rounds, however long the last one took (a hung node costs a whole health
            # timeout): a node coming back needs RISE answers spaced by the interval, never back-to-back ones.
            self.stop.wait(self.interval)

    def hold_lock(self) -> bool:
        """Take or renew the cluster's checker lock (cache.add is atomic in every backend)."""
        key = registry.cluster_key("checker-lock")
        if cache.get(key) == self.owner:
            cache.set(key, self.owner, self.lock_ttl)
            return True
        return bool(cache.add(key, self.owner, self.lock_ttl))

    def check_round(self, urls: Iterable[str] | None = None) -> list[NodeHealth]:
        """Check the given nodes (every known node by default) in parallel; store and return their records."""
        targets = list(urls) if urls is not None else [entry.url for entry in registry.refresh()]
        answers = list(self.pool.map(self._probe, targets))
        previous = read_health(targets)
        now = self.clock()
        records = []
        for url, (document, failure) in zip(targets, answers, strict=True):
            old = previous.get(url)
            record = observe(old, url=url, document=document, failure=failure, now=now)
            write_health(record)
            records.append(record)
            if old is not None and old.healthy != record.healthy:
                log.warning(
                    "node %s is %s%s",
                    url,
                    "up" if record.healthy else "down",
                    f": {record.reason}" if record.reason else "",
                )
        return records

    def _probe(self, url: str) -> tuple[dict[str, Any] | None, str]:
        client = self.client or get_node_client()
        try:
            return client.health(url), ""
        except NodeUnreachable as error:
            return None, error.reason
        except (requests.RequestException, ValueError) as error:
            return None, f"bad health answer ({error})"


_checker: HealthChecker | None = None
_checker_pid = 0
_checker_lock = threading.Lock()


def ensure_health_checker(*, check_now: bool = True) -> HealthChecker:
    """Start this process's checker thread once (from the WSGI entry point or the first balancer request, so
    management commands and tests that never serve requests start none). With `check_now`, nodes nobody checked yet
    are checked before returning, so the request that started the checker finds them up; at boot the thread's first
    round does it (a process that is its own node cannot answer its own check before it serves)."""
    global _checker, _checker_pid
    if _checker is not None and _checker_pid == os.getpid():
        return _checker
    with _checker_lock:
        if _checker is None or _checker_pid != os.getpid():
            checker = HealthChecker()
            unchecked = [entry.url for entry in registry.nodes()]
            known = read_health(unchecked)
            missing = [url for url in unchecked if url not in known]
            if missing and check_now:
                checker.check_round(missing)
            checker.start()
            _checker, _checker_pid = checker, os.getpid()
    return _checker
