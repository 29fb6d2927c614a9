"""Balancer benchmark: the latency the balancer adds to a call, and how many progress polls per second it serves.

    python -m bench.balancer [--workers 2] [--threads 4] [--pollers 64] [--seconds 10] [--cache redis://...]

Both are measured against a fake node (tests/balancer/fake_node.py: an asyncio server that answers instantly), so
the figures are the balancer's own cost, not a GPU's:
- added_p50_ms / added_p99_ms: `GET /sdapi/v1/progress` of a pinned user, one call at a time, through the balancer
  minus straight to the node, interleaved in one run (percentile of each side, then the difference).
- polls_per_s: pinned users (one per poller) polling progress through the balancer as fast as they can on keep-alive
  connections, counted over --seconds after a warm-up.
The balancer runs under gunicorn like production (gthread workers); with more than one worker the pins must live in
a shared cache, so --cache defaults to SD_TEST_REDIS_URL (or redis://127.0.0.1:6379/15) when --workers > 1.
Prints progress to stderr and ends with: RESULT added_p50_ms=... added_p99_ms=... polls_per_s=...
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests

from tests.balancer.fake_node import FakeNodeProcess
from tests.processes import GUNICORN, REPO, clean_environment, free_port

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Balancer:
    """A balancer under gunicorn in front of `node_url`, with its own SQLite database."""

    def __init__(self, *, node_url: str, workers: int, threads: int, cache_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir = Path(tempfile.mkdtemp(prefix="bench-balancer-"))
        self.env = clean_environment({
            "SD_ROLE": "balancer", "SD_NODES": node_url, "SD_LOG_LEVEL": "warning",
            "DATABASE_URL": f"sqlite:///{data_dir / 'db.sqlite3'}", "SD_HEALTH_INTERVAL": "1.0",
            **({"REDIS_URL": cache_url} if cache_url else {}),
        })  # fmt: skip
        self.command = [
            str(GUNICORN), "sd_multi.wsgi:application", "--bind", f"127.0.0.1:{self.port}", "--workers", str(workers),
            "--threads", str(threads), "--worker-class", "gthread", "--keep-alive", "30", "--backlog", "2048",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Balancer:
        subprocess.run([sys.executable, "manage.py", "migrate", "--no-input", "-v", "0"], cwd=REPO, env=self.env,
                       check=True)  # fmt: skip
        self.process = subprocess.Popen(self.command, cwd=REPO, env=self.env, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/balancer/status", timeout=5).json()["up"] == 1:
                    return self
            except (requests.RequestException, ValueError):
                pass
            time.sleep(0.3)
        raise RuntimeError("the balancer did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            self.process.wait(timeout=30)


def pin(balancer_url: str, user: str) -> None:
    response = requests.post(f"{balancer_url}/sdapi/v1/txt2img", json={"prompt": "pin"}, headers={"X-User-Id": user},
                             timeout=30)  # fmt: skip
    response.raise_for_status()


def added_latency(balancer_url: str, node_url: str, *, calls: int) -> tuple[float, float, float, float]:
    """p50 and p99 of one pinned progress call through the balancer and straight to the node, interleaved (ms)."""
    user = "bench-latency"
    pin(balancer_url, user)
    connections = {}
    for name, url in (("balancer", balancer_url), ("node", node_url)):
        parts = urlsplit(url)
        connections[name] = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    timings: dict[str, list[float]] = {"balancer": [], "node": []}
    for number in range(calls + 50):
        for name, connection in connections.items():
            started = time.perf_counter()
            connection.request("GET", "/sdapi/v1/progress", headers={"X-User-Id": user})
            response = connection.getresponse()
            response.read()
            elapsed = (time.perf_counter() - started) * 1000
            if response.status != 200:
                raise RuntimeError(f"{name} answered {response.status}")
            if number >= 50:  # warm-up: connection pools, first-call imports
                timings[name].append(elapsed)
    through, direct = timings["balancer"], timings["node"]
    return percentile(through, 0.5), percentile(through, 0.99), percentile(direct, 0.5), percentile(direct, 0.99)


async def _poller(host: str, port: int, user: str, stop_at: float, counting_from: float, counts: list[int]) -> None:
    """One keep-alive connection polling progress; counts the answers completed after `counting_from`."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET /sdapi/v1/progress HTTP/1.1\r\nHost: {host}:{port}\r\nX-User-Id: {user}\r\n\r\n".encode()
    done = 0
    try:
        while (now := time.monotonic()) < stop_at:
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"poll answered {status_line!r}")
            if now >= counting_from:
                done += 1
    finally:
        writer.close()
    counts.append(done)


async def _poll(balancer_url: str, users: list[str], *, warmup: float, seconds: float) -> float:
    parts = urlsplit(balancer_url)
    host, port = parts.hostname or "127.0.0.1", int(parts.port or 80)
    counting_from = time.monotonic() + warmup
    stop_at = counting_from + seconds
    counts: list[int] = []
    await asyncio.gather(*(_poller(host, port, user, stop_at, counting_from, counts) for user in users))
    return sum(counts) / seconds


def polls_per_second(balancer_url: str, *, pollers: int, warmup: float, seconds: float) -> float:
    users = [f"bench-poller-{number}" for number in range(pollers)]
    for user in users:
        pin(balancer_url, user)
    return asyncio.run(_poll(balancer_url, users, warmup=warmup, seconds=seconds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pollers", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--calls", type=int, default=1000, help="sequential calls per side for the latency")
    parser.add_argument("--cache", default=None, help="cache URL (default: Redis when --workers > 1, else LocMem)")
    options = parser.parse_args()
    cache_url = options.cache
    if cache_url is None:
        cache_url = (os.environ.get("SD_TEST_REDIS_URL") or DEFAULT_REDIS_URL) if options.workers > 1 else ""

    node = FakeNodeProcess(node_id="fake-bench-node", log_requests=False).start()
    log(f"fake node at {node.url}; starting the balancer ({options.workers} workers x {options.threads} threads, "
        f"cache {cache_url or 'LocMem'})")  # fmt: skip
    balancer = Balancer(node_url=node.url, workers=options.workers, threads=options.threads, cache_url=cache_url)
    try:
        balancer.start()
        log(f"latency: {options.calls} pinned progress calls each way, interleaved")
        through_p50, through_p99, direct_p50, direct_p99 = added_latency(balancer.url, node.url, calls=options.calls)
        log(f"  through the balancer p50 {through_p50:.2f} ms p99 {through_p99:.2f} ms; "
            f"straight to the node p50 {direct_p50:.2f} ms p99 {direct_p99:.2f} ms")  # fmt: skip
        log(f"throughput: {options.pollers} pinned pollers for {options.seconds:.0f} s (after 2 s of warm-up)")
        rate = polls_per_second(balancer.url, pollers=options.pollers, warmup=2.0, seconds=options.seconds)
        log(f"  {rate:.0f} polls/s")
    finally:
        balancer.stop()
        node.kill()
    added_p50 = through_p50 - direct_p50
    added_p99 = through_p99 - direct_p99
    print(f"RESULT added_p50_ms={added_p50:.2f} added_p99_ms={added_p99:.2f} polls_per_s={rate:.0f} "
          f"through_p50_ms={through_p50:.2f} direct_p50_ms={direct_p50:.2f} workers={options.workers} "
          f"threads={options.threads}")  # fmt: skip


if __name__ == "__main__":
    main()
