"""Test-wide setup: offline Hugging Face libraries, no outbound network, service URLs, the tiny model fixtures."""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from typing import Any

import pytest

from sd_multi.env import env_bool, env_str

# Before the model fixtures and test modules import huggingface_hub/transformers/diffusers, which read these once.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DO_NOT_TRACK"):
    os.environ.setdefault(_name, "1")
TORCH_THREADS = min(os.cpu_count() or 1, 4)
os.environ.setdefault("OMP_NUM_THREADS", str(TORCH_THREADS))

pytest_plugins = ["tests.model_fixtures"]


class OutboundNetworkError(RuntimeError):
    """A test tried to reach beyond this machine. Not an OSError, so no retry loop can swallow it."""


def is_loopback(family: int, address: Any) -> bool:
    """True for anything that stays on this machine: loopback IPs, "localhost", and non-IP sockets (AF_UNIX)."""
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, bytes):
        host = host.decode()
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_sendto = socket.socket.sendto


def _check(sock: socket.socket, address: Any) -> None:
    if not is_loopback(sock.family, address):
        raise OutboundNetworkError(f"tests may not connect outside loopback: {address!r}")


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    _real_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _real_connect_ex(self, address)


def _guarded_sendto(self: socket.socket, data: Any, *args: Any) -> int:
    _check(self, args[-1])
    return _real_sendto(self, data, *args)


# Patched at import, so collection (module-level code in test files) is covered too; setattr because typeshed
# types these as C methods that a plain function may not replace.
setattr(socket.socket, "connect", _guarded_connect)  # noqa: B010
setattr(socket.socket, "connect_ex", _guarded_connect_ex)  # noqa: B010
setattr(socket.socket, "sendto", _guarded_sendto)  # noqa: B010


@pytest.fixture(autouse=True, scope="session")
def _torch_threads() -> None:
    """Tests that imported torch run with a few threads: CI has 2 cores, and tiny models gain nothing from more."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(TORCH_THREADS)


def _unavailable(service: str, reason: str) -> None:
    """Under CI a missing service is a failure; on a developer's machine the tests that need it are skipped."""
    message = f"{service} is not available ({reason}); `./setup.sh test` starts or installs it"
    if env_bool("CI", False):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A reachable PostgreSQL URL from SD_TEST_POSTGRES_URL (exported by `./setup.sh test`)."""
    url = env_str("SD_TEST_POSTGRES_URL")
    if not url:
        _unavailable("PostgreSQL", "SD_TEST_POSTGRES_URL is not set")
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.Error as exc:
        _unavailable("PostgreSQL", str(exc).strip())
    return url


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A reachable Redis URL from SD_TEST_REDIS_URL (exported by `./setup.sh test`)."""
    url = env_str("SD_TEST_REDIS_URL")
    if not url:
        _unavailable("Redis", "SD_TEST_REDIS_URL is not set")
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=5).ping()
    except redis.RedisError as exc:
        _unavailable("Redis", str(exc))
    return url
