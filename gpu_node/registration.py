"""Self-registration: a node started with SD_BALANCER_URL and SD_NODE_URL announces itself to the balancer
(`POST <balancer>/balancer/nodes/register`) and heartbeats every 2 health intervals, so a balancer learns about
nodes that scale up without editing SD_NODES."""

from __future__ import annotations

import logging
import threading

import requests
from django.conf import settings

log = logging.getLogger(__name__)

REGISTER_TIMEOUT = (2.0, 5.0)


class Registrar:
    """Registers one node with one balancer until stopped; a failed attempt is retried at the next heartbeat."""

    def __init__(self, *, balancer_url: str, node_url: str, node_id: str, secret: str, interval: float) -> None:
        self.endpoint = f"{balancer_url.rstrip('/')}/balancer/nodes/register"
        self.node_url = node_url.rstrip("/")
        self.node_id = node_id
        self.secret = secret
        self.interval = interval
        self.stop = threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False
        self.registered = False

    def run(self) -> None:
        while not self.stop.is_set():
            self.register_once()
            self.stop.wait(self.interval)

    def register_once(self) -> bool:
        headers = {"X-SD-Node-Secret": self.secret} if self.secret else {}
        body = {"url": self.node_url, "node_id": self.node_id}
        try:
            response = self.session.post(self.endpoint, json=body, headers=headers, timeout=REGISTER_TIMEOUT)
            ok = response.status_code == 200
            reason = "" if ok else f"HTTP {response.status_code}: {response.text[:200]}"
        except requests.RequestException as error:
            ok, reason = False, str(error)
        if ok != self.registered:
            # Log changes only: a heartbeat every few seconds would drown the log otherwise.
            if ok:
                log.info("registered as %s with the balancer at %s", self.node_url, self.endpoint)
            else:
                log.warning(
                    "registration with %s failed (retrying every %.0f s): %s", self.endpoint, self.interval, reason
                )
        self.registered = ok
        return ok


def start_registration() -> Registrar | None:
    """Start heartbeating on a daemon thread when this node knows both its own URL and a balancer's."""
    node_url = settings.SD_NODE_URL
    if not settings.SD_BALANCER_URL or not node_url:
        if settings.SD_BALANCER_URL:
            log.warning("SD_BALANCER_URL is set but SD_NODE_URL is not: this node cannot register itself")
        return None
    registrar = Registrar(
        balancer_url=settings.SD_BALANCER_URL,
        node_url=node_url,
        node_id=settings.SD_NODE_ID,
        secret=settings.SD_NODE_SECRET,
        interval=2 * settings.SD_HEALTH_INTERVAL,
    )
    threading.Thread(target=registrar.run, name="node-registration", daemon=True).start()
    return registrar
