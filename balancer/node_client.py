"""The balancer's HTTP client for GPU nodes: health, the node job API, and forwarding A1111 calls.

One Protocol (`NodeClient`) with the real pooled implementation (`HttpNodeClient`); tests may swap the process
singleton for a fake. Transport errors are `NodeUnreachable`, which says whether a retry is safe.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from http.cookiejar import DefaultCookiePolicy
from typing import Any, Protocol
from urllib.parse import quote

import requests
from django.conf import settings
from requests.adapters import HTTPAdapter
from urllib3.exceptions import (
    ConnectTimeoutError,
    MaxRetryError,
    NameResolutionError,
    NewConnectionError,
    ReadTimeoutError,
)

from balancer.transport import ConnectFailed, ExchangeFailed, NodeConnections
from gpu_node.identity import sign_user_header

CONNECT_TIMEOUT = 2.0
HEALTH_TIMEOUT = 2.0
JOBS_TIMEOUT = 10.0
POOL_SIZE = 64
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

# Headers that describe one connection, not the message (RFC 9110 §7.6.1); a proxy drops them both ways.
HOP_BY_HOP_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    }
)


class NodeUnreachable(Exception):
    """A call to a node failed in transport. `retry_safe` is True only when the request surely never reached the
    node (connection refused, name resolution, connect timeout), so sending it elsewhere cannot run it twice."""

    def __init__(self, url: str, reason: str, *, retry_safe: bool) -> None:
        super().__init__(f"node {url} unreachable: {reason}")
        self.url = url
        self.reason = reason
        self.retry_safe = retry_safe


@dataclass(frozen=True, kw_only=True)
class ForwardedResponse:
    """A node's answer to a forwarded call, hop-by-hop headers already removed."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    node_url: str

    def header(self, name: str) -> str | None:
        lowered = name.lower()
        return next((value for key, value in self.headers if key.lower() == lowered), None)


class NodeClient(Protocol):
    def health(self, url: str) -> dict[str, Any]: ...

    def submit_job(
        self, url: str, *, job_id: str, api: str, payload: Mapping[str, Any], user: str
    ) -> dict[str, Any]: ...

    def get_job(self, url: str, job_id: str) -> dict[str, Any] | None: ...

    def cancel_job(self, url: str, job_id: str) -> dict[str, Any] | None: ...

    def forward(
        self,
        url: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        query: str,
        timeout: float,
    ) -> ForwardedResponse: ...


def user_headers(user: str, *, is_staff: bool = False) -> dict[str, str]:
    """How a node learns who the user is: X-User-Id (open nodes) and, with SD_NODE_SECRET, the signed X-SD-User."""
    headers = {"X-User-Id": user}
    if settings.SD_NODE_SECRET:
        headers["X-SD-User"] = sign_user_header(user, is_staff=is_staff, secret=settings.SD_NODE_SECRET)
    return headers


def node_secret_headers() -> dict[str, str]:
    return {"X-SD-Node-Secret": settings.SD_NODE_SECRET} if settings.SD_NODE_SECRET else {}


def unreachable(url: str, error: Exception) -> NodeUnreachable:
    """Classify a transport error (from requests or urllib3): did the request surely never reach the node?"""
    if isinstance(error, requests.ConnectionError | requests.Timeout):
        cause = error.args[0] if error.args else None
        error = cause if isinstance(cause, Exception) else error
    if isinstance(error, MaxRetryError) and error.reason is not None:
        error = error.reason
    if isinstance(error, NameResolutionError):
        return NodeUnreachable(url, "name resolution failed", retry_safe=True)
    if isinstance(error, NewConnectionError):
        return NodeUnreachable(url, "connection refused", retry_safe=True)
    if isinstance(error, ConnectTimeoutError | requests.ConnectTimeout):
        return NodeUnreachable(url, "connect timeout", retry_safe=True)
    if isinstance(error, ReadTimeoutError | requests.ReadTimeout):
        return NodeUnreachable(url, "read timeout", retry_safe=False)
    return NodeUnreachable(url, f"connection lost ({type(error).__name__})", retry_safe=False)


class HttpNodeClient:
    """A pooled `requests` session for health and the job API, and keep-alive connections (balancer.transport) for
    forwarded calls; connect timeout CONNECT_TIMEOUT."""

    def __init__(self, *, health_timeout: float = HEALTH_TIMEOUT, jobs_timeout: float = JOBS_TIMEOUT) -> None:
        self.health_timeout = health_timeout
        self.jobs_timeout = jobs_timeout
        self.session = requests.Session()
        # No urllib3 retries: whether a retry is safe is decided by the caller from NodeUnreachable.retry_safe.
        adapter = HTTPAdapter(pool_connections=POOL_SIZE, pool_maxsize=POOL_SIZE, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.connections = NodeConnections(max_idle_per_node=POOL_SIZE, connect_timeout=CONNECT_TIMEOUT)
        # Never pick up proxies or .netrc credentials from the environment for node-internal calls, and never keep
        # a cookie a node sets: the session is shared by every user.
        self.session.trust_env = False
        self.session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))

    def health(self, url: str) -> dict[str, Any]:
        response = self._call(url, "GET", "/node/health", timeout=self.health_timeout)
        response.raise_for_status()
        document = response.json()
        if not isinstance(document, dict):
            raise ValueError(f"node {url} answered /node/health with {type(document).__name__}, not an object")
        return document

    def submit_job(self, url: str, *, job_id: str, api: str, payload: Mapping[str, Any], user: str) -> dict[str, Any]:
        body = {"id": job_id, "api": api, "payload": dict(payload), "user": user}
        response = self._call(url, "POST", "/node/jobs", json=body, headers=user_headers(user))
        response.raise_for_status()
        return dict(response.json())

    def get_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        response = self._call(url, "GET", f"/node/jobs/{quote(job_id, safe='')}")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    def cancel_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        response = self._call(url, "POST", f"/node/jobs/{quote(job_id, safe='')}/cancel")
        if response.status_code == 404:
            return None
        response.raise_for_status()
        return dict(response.json())

    def forward(
        self,
        url: str,
        method: str,
        path: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None,
        query: str,
        timeout: float,
    ) -> ForwardedResponse:
        """Send one proxied call (balancer.transport). The body goes back byte for byte, with its Content-Encoding.

        1. Idempotent calls use a pooled keep-alive connection; when it turns out the node had closed that idle
           connection (no byte of an answer came back), the call is sent once more on a new connection.
        2. Other calls (a generation) get a connection of their own: a failure is then never a stale connection,
           so a refused one surely did not reach the node and anything later surely did.
        """
        target = f"{path}?{query}" if query else path
        idempotent = method.upper() in IDEMPOTENT_METHODS
        for attempt in range(2):
            try:
                answer = self.connections.exchange(
                    url, method, target, headers=headers, body=body, timeout=timeout, reuse=idempotent
                )
            except ConnectFailed as error:
                raise NodeUnreachable(url, error.reason, retry_safe=True) from error
            except ExchangeFailed as error:
                if idempotent and error.before_answer and attempt == 0:
                    continue
                raise NodeUnreachable(url, error.reason, retry_safe=False) from error
            kept = tuple((key, value) for key, value in answer.headers if key.lower() not in HOP_BY_HOP_HEADERS)
            return ForwardedResponse(status=answer.status, headers=kept, body=answer.body, node_url=url)
        raise AssertionError("the loop returns or raises")

    def _call(
        self,
        url: str,
        method: str,
        path: str,
        *,
        timeout: float | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        try:
            return self.session.request(
                method,
                url + path,
                json=json,
                headers={**node_secret_headers(), **(headers or {})},
                timeout=(CONNECT_TIMEOUT, timeout or self.jobs_timeout),
                allow_redirects=False,
            )
        except requests.RequestException as error:
            raise unreachable(url, error) from error


_client: NodeClient | None = None
_client_lock = threading.Lock()


def get_node_client() -> NodeClient:
    """The process's node client. Health checks time out within two check intervals (at most HEALTH_TIMEOUT)."""
    global _client
    if _client is None:
        with _client_lock:
            if _client is None:
                _client = HttpNodeClient(health_timeout=min(HEALTH_TIMEOUT, 2 * settings.SD_HEALTH_INTERVAL))
    return _client


def set_node_client(client: NodeClient | None) -> None:
    """Swap the process singleton (tests install a fake; None restores the real one on next use)."""
    global _client
    _client = client
