"""Prometheus metrics of the balancer: nodes up and draining, pins, proxied requests by status and latency, tasks by
status and queue depth per model (enough to drive an autoscaler on queue depth).

Gauges that describe shared state are set at scrape time by the functions in COLLECTORS; other modules append
theirs (`COLLECTORS.append(fn)`), and `collect()` runs them all before the registry is rendered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from balancer import pinning, routing

log = logging.getLogger(__name__)

NODES = Gauge("sd_balancer_nodes", "Known GPU nodes")
NODES_UP = Gauge("sd_balancer_nodes_up", "Nodes passing their health checks")
NODES_DRAINING = Gauge("sd_balancer_nodes_draining", "Nodes draining (no new pins)")
NODE_QUEUE_DEPTH = Gauge("sd_balancer_node_queue_depth", "Jobs waiting or running on a node", ["node"])
PINS = Gauge("sd_balancer_pins", "Users pinned to a node")
PROXIED_REQUESTS = Counter(
    "sd_balancer_proxied_requests_total",
    "API calls served through the balancer, by kind and status",
    ["kind", "status"],
)
PROXY_SECONDS = Histogram(
    "sd_balancer_proxy_seconds",
    "Time to answer a proxied API call, by kind",
    ["kind"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TASKS = Gauge("sd_balancer_tasks", "Async tasks by status", ["status"])
QUEUE_DEPTH = Gauge("sd_balancer_queue_depth", "Async tasks waiting, by model", ["model"])

COLLECTORS: list[Callable[[], None]] = []


def collect() -> None:
    """Refresh the scrape-time gauges; one failing collector does not hide the others' metrics."""
    for collector in COLLECTORS:
        try:
            collector()
        except Exception:
            log.exception("metrics collector %s failed", getattr(collector, "__name__", collector))


def render() -> tuple[bytes, str]:
    collect()
    return generate_latest(), CONTENT_TYPE_LATEST


def _collect_nodes() -> None:
    nodes = routing.known_nodes()
    NODES.set(len(nodes))
    NODES_UP.set(sum(node.healthy for node in nodes))
    NODES_DRAINING.set(sum(node.draining for node in nodes))
    NODE_QUEUE_DEPTH.clear()
    for node in nodes:
        NODE_QUEUE_DEPTH.labels(node=node.node_id or node.url).set(node.queue_depth)
    PINS.set(pinning.count_pins())


COLLECTORS.append(_collect_nodes)
