"""Task webhooks: which callback URLs are allowed (http(s), no private targets), how a delivery is signed
(HMAC-SHA256 of the raw body), and one delivery with exponential backoff kept in Task.webhook_*."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import requests

from balancer.models import Task

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-SD-Signature"
TIMESTAMP_HEADER = "X-SD-Timestamp"
MAX_ATTEMPTS = 6  # 1 + 2 + 4 + 8 + 16 s of backoff: about half a minute of receiver downtime is absorbed
DELIVERY_TIMEOUT = 5.0  # seconds; deliveries run on the dispatcher's loop, a slow receiver must not stall it
MAX_URL_LENGTH = 2000

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackURLError(ValueError):
    """A callback URL we will not call; the message says why (it becomes a 422 naming `callback_url`)."""


@dataclass(frozen=True, kw_only=True)
class Delivery:
    """What one POST to a callback URL gave."""

    delivered: bool
    status_code: int | None
    error: str


def check_callback_url(url: str, *, allow_private: bool) -> str:
    """The URL when it may be called, else CallbackURLError.

    1. http or https with a host, at most MAX_URL_LENGTH characters.
    2. Unless `allow_private`, every address the host resolves to must be public: no loopback, RFC 1918,
       link-local (cloud metadata), shared, reserved or multicast target (server-side request forgery).
    """
    if len(url) > MAX_URL_LENGTH:
        raise CallbackURLError(f"must be at most {MAX_URL_LENGTH} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CallbackURLError("must be an http:// or https:// URL with a host")
    try:
        port = parts.port
    except ValueError:
        raise CallbackURLError("has an invalid port") from None
    if not allow_private:
        for address in resolve(parts.hostname, port or (443 if parts.scheme == "https" else 80)):
            if not is_public(address):
                raise CallbackURLError(
                    f"points to a private or local address ({address}); set SD_WEBHOOK_ALLOW_PRIVATE=1 to allow it"
                )
    return url


def resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as error:
        raise CallbackURLError(f"host {host!r} cannot be resolved ({error})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def is_public(address: IPAddress) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved)


def sign(body: bytes, secret: str) -> str:
    """The X-SD-Signature value: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def retry_delay(failed_attempts: int) -> timedelta:
    """Backoff after the n-th failed delivery: 1, 2, 4, 8, 16 s."""
    return timedelta(seconds=2 ** (failed_attempts - 1))


def post(url: str, body: bytes, *, secret: str, now: datetime, session: requests.Session) -> Delivery:
    """POST `body` once; redirects are not followed (they could lead to a private target)."""
    headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(int(now.timestamp()))}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    try:
        response = session.post(url, data=body, headers=headers, timeout=DELIVERY_TIMEOUT, allow_redirects=False)
    except requests.RequestException as error:
        return Delivery(delivered=False, status_code=None, error=f"{type(error).__name__}: {error}")
    ok = 200 <= response.status_code < 300
    return Delivery(delivered=ok, status_code=response.status_code, error="" if ok else f"HTTP {response.status_code}")


def deliver(
    task: Task, body: bytes, *, secret: str, allow_private: bool, now: datetime, session: requests.Session
) -> Delivery:
    """One delivery attempt of a task's webhook, recorded on the task: delivered, retried later, or given up."""
    try:
        check_callback_url(task.callback_url, allow_private=allow_private)  # again: DNS may have changed
    except CallbackURLError as error:
        delivery = Delivery(delivered=False, status_code=None, error=f"callback_url {error}")
        task.webhook_retry_at(None)
        log.warning("task %s: webhook refused: %s", task.id, delivery.error)
        return delivery
    delivery = post(task.callback_url, body, secret=secret, now=now, session=session)
    if delivery.delivered:
        task.webhook_delivered()
        log.info("task %s: webhook delivered to %s", task.id, task.callback_url)
        return delivery
    failed = task.webhook_attempts + 1
    next_at = now + retry_delay(failed) if failed < MAX_ATTEMPTS else None
    task.webhook_retry_at(next_at)
    log.warning(
        "task %s: webhook delivery %d/%d to %s failed (%s)%s",
        task.id, failed, MAX_ATTEMPTS, task.callback_url, delivery.error, "; giving up" if next_at is None else "",
    )  # fmt: skip
    return delivery
