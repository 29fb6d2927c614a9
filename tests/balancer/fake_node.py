"""A fake GPU node for routing tests and the balancer benchmark: an asyncio HTTP server that answers the node's
health, progress, control, options and listing calls instantly (txt2img after an optional delay, with no images).

It never generates anything; tests about images use real nodes. Run it as its own process:
`python -m tests.balancer.fake_node --port 8001 --node-id fake-a --models a.safetensors`. Tests change its state
with `POST /fake/state` and read the requests it received with `GET /fake/requests`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[2]


class FakeNodeState:
    def __init__(self, *, node_id: str, models: list[str], delay: float) -> None:
        self.node_id = node_id
        self.boot_id = uuid.uuid4().hex
        self.status = "ready"
        self.queue_depth = 0
        self.capacity = 4
        self.models = models
        self.loaded_models: list[str] = []
        self.delay = delay
        self.generation_error: int = 0  # answer generations with this status (a node's own error) when set
        self.requests: deque[dict[str, Any]] = deque(maxlen=500)
        self.log_requests = True

    def health(self) -> dict[str, Any]:
        return {
            "status": self.status, "node_id": self.node_id, "boot_id": self.boot_id, "version": "fake",
            "devices": [], "queue_depth": self.queue_depth, "users_queued": 0, "running_job": None,
            "running_jobs": [], "loaded_models": self.loaded_models, "models": self.models,
            "capacity": self.capacity, "max_queue": 100,
        }  # fmt: skip


REASONS = {200: "OK", 404: "Not Found", 422: "Unprocessable Entity", 503: "Service Unavailable"}
IDLE_PROGRESS = json.dumps({
    "progress": 0.0, "eta_relative": 0.0,
    "state": {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0},
    "current_image": None, "textinfo": None,
}).encode()  # fmt: skip


class FakeNode:
    """The fake node's request handling: (method, path, headers, body) -> (status, JSON body)."""

    def __init__(self, state: FakeNodeState) -> None:
        self.state = state

    async def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        state = self.state
        route = path.split("?", 1)[0]
        if state.log_requests and not route.startswith("/fake/") and route != "/node/health":
            state.requests.append({"method": method, "path": route, "headers": headers, "at": time.time()})
        if route == "/node/health":
            return 200, json.dumps(state.health()).encode()
        if route == "/sdapi/v1/progress":
            return 200, IDLE_PROGRESS
        if route in ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/txt2img_v2/", "/img2img_v2/"):
            return await self._generate(headers, body)
        if route == "/sdapi/v1/interrupt":
            return 200, b"{}"
        if route == "/sdapi/v1/skip":
            return 200, b"null"
        if route == "/sdapi/v1/options":
            return self._options(method, body)
        if route == "/sdapi/v1/sd-models":
            return 200, json.dumps(
                [{"title": title, "model_name": title.split(".")[0]} for title in state.models]
            ).encode()
        if route == "/sdapi/v1/samplers":
            return 200, json.dumps([{"name": "Euler", "aliases": [], "options": {}}]).encode()
        if route == "/fake/state" and method == "POST":
            for key, value in json.loads(body or b"{}").items():
                setattr(state, key, value)
            return 200, json.dumps(state.health()).encode()
        if route == "/fake/requests":
            return 200, json.dumps(list(state.requests)).encode()
        return 404, b'{"detail": "Not Found"}'

    async def _generate(self, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
        if self.state.generation_error:
            error = {"error": "DeviceOutOfMemoryError", "detail": "the GPU ran out of memory", "body": "", "errors": ""}
            return self.state.generation_error, json.dumps(error).encode()
        payload = json.loads(body or b"{}")
        delay = float(payload.get("fake_delay", self.state.delay))
        if delay:
            await asyncio.sleep(delay)
        overrides = payload.get("override_settings") or {}
        model = overrides.get("sd_model_checkpoint")
        if model and model not in self.state.loaded_models:
            self.state.loaded_models.append(model)
        info = {"node": self.state.node_id, "user": headers.get("x-user-id"), "sd_model_checkpoint": model}
        return 200, json.dumps({"images": [], "parameters": payload, "info": json.dumps(info)}).encode()

    def _options(self, method: str, body: bytes) -> tuple[int, bytes]:
        if method != "POST":
            return 200, json.dumps({"sd_model_checkpoint": self.state.models[0] if self.state.models else ""}).encode()
        model = json.loads(body or b"{}").get("sd_model_checkpoint")
        if model is not None and model not in self.state.models:
            detail = [
                {"loc": ["body", "sd_model_checkpoint"], "msg": f"model {model!r} not found", "type": "value_error"}
            ]
            return 422, json.dumps({"detail": detail}).encode()
        if model and model not in self.state.loaded_models:
            self.state.loaded_models.append(model)
        return 200, b"null"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """HTTP/1.1 with keep-alive and Content-Length bodies: all a balancer sends."""
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    break
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                status, content = await self.answer(method, target, headers, body)
                reason = REASONS.get(status, "Status")
                writer.write(
                    f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(content)}\r\nX-Fake-Node: {self.state.node_id}\r\n\r\n".encode()
                    + content
                )
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()


async def _main(port: int, node_id: str, models: list[str], delay: float, log_requests: bool) -> None:
    state = FakeNodeState(node_id=node_id, models=models, delay=delay)
    state.log_requests = log_requests
    server = await asyncio.start_server(FakeNode(state).serve, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


class FakeNodeProcess:
    """A fake node in its own process (its own GIL, like a real node), started, killed and inspected by tests."""

    def __init__(self, *, node_id: str, models: tuple[str, ...] = (), delay: float = 0.0, log_requests: bool = True):
        from tests.processes import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.node_id = node_id
        arguments = ["--port", str(self.port), "--node-id", node_id, "--delay", str(delay)]
        arguments += ["--models", ",".join(models)] if models else []
        arguments += [] if log_requests else ["--quiet"]
        self.arguments = arguments
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> FakeNodeProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.balancer.fake_node", *self.arguments], cwd=REPO, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/node/health", timeout=1).status_code == 200:
                    return self
            except requests.RequestException:
                time.sleep(0.05)
        raise RuntimeError(f"fake node {self.node_id} did not start")

    def set_state(self, **values: Any) -> dict[str, Any]:
        return dict(requests.post(self.url + "/fake/state", json=values, timeout=5).json())

    def received(self) -> list[dict[str, Any]]:
        return list(requests.get(self.url + "/fake/requests", timeout=5).json())

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            if sig in (signal.SIGKILL, signal.SIGTERM):
                self.process.wait(timeout=10)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--node-id", default="fake-node")
    parser.add_argument("--models", default="tiny-a.safetensors [aaaaaaaaaa],tiny-b.safetensors [bbbbbbbbbb]")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds a txt2img takes")
    parser.add_argument("--quiet", action="store_true", help="do not record requests (benchmarks)")
    options = parser.parse_args()
    models = [title for title in options.models.split(",") if title]
    asyncio.run(_main(options.port, options.node_id, models, options.delay, not options.quiet))
