"""Node benchmark, measured side by side in one run on real node processes (gunicorn, tiny SD1 model on CPU):

- http_overhead_ratio: POST /sdapi/v1/txt2img end to end over HTTP vs in-process `Engine.generate`, same request;
- batching_speedup: throughput of 8 concurrent users with batching (SD_MAX_BATCH=8) over batching off (=1);
- light_user_wait_ratio: one user queues 32 jobs, then 3 users one job each; their mean wait (queued to finished)
  over one job's run time. Fair round-robin keeps it near 2-3; FIFO would make it ~33.

    python -m bench.node [--steps 20] [--size 64]

Ends with one line: RESULT name=value ...
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import torch

from sd_core.config import CoreConfig
from sd_core.engine import Engine
from sd_core.tiny import write_tiny_models
from sd_core.types import GenerationRequest
from tests.processes import ServerProcess


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def body(steps: int, size: int, seed: int = 1, prompt: str = "a lighthouse on a cliff") -> dict[str, Any]:
    return {"prompt": prompt, "steps": steps, "width": size, "height": size, "seed": seed, "sampler_name": "Euler"}


def http_overhead(node: ServerProcess, engine: Engine, *, steps: int, size: int, repeats: int) -> float:
    request = GenerationRequest(
        checkpoint="tiny-sd1.safetensors",
        prompt="a lighthouse on a cliff",
        steps=steps,
        width=size,
        height=size,
        seed=1,
        sampler_name="Euler",
    )
    headers = {"X-User-Id": "bench"}
    requests.post(
        f"{node.url}/sdapi/v1/options",
        json={"sd_model_checkpoint": "tiny-sd1.safetensors"},
        headers=headers,
        timeout=60,
    ).raise_for_status()
    engine.generate(request)
    requests.post(f"{node.url}/sdapi/v1/txt2img", json=body(steps, size), headers=headers, timeout=120)
    http: list[float] = []
    local: list[float] = []
    for repeat in range(repeats):
        started = time.perf_counter()
        requests.post(
            f"{node.url}/sdapi/v1/txt2img", json=body(steps, size), headers=headers, timeout=120
        ).raise_for_status()
        http.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.generate(request)
        local.append(time.perf_counter() - started)
        log(f"  http {http[-1]:.3f}s vs in-process {local[-1]:.3f}s ({repeat + 1}/{repeats})")
    return statistics.median(http) / statistics.median(local)


def concurrent_throughput(node: ServerProcess, *, users: int, jobs_per_user: int, steps: int, size: int) -> float:
    """Seconds for `users` threads each running `jobs_per_user` blocking txt2img calls."""

    def user_loop(index: int) -> None:
        for job in range(jobs_per_user):
            requests.post(
                f"{node.url}/sdapi/v1/txt2img",
                json=body(steps, size, seed=index * 100 + job),
                headers={"X-User-Id": f"user-{index}"},
                timeout=300,
            ).raise_for_status()

    threads = [threading.Thread(target=user_loop, args=(index,)) for index in range(users)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def fairness(node: ServerProcess, *, steps: int, size: int) -> float:
    """Mean wait of 3 light users behind a heavy user's 32 queued jobs, in units of one job's run time."""
    ids: dict[str, list[str]] = {"heavy": [], "light": []}
    for index in range(32):
        job = requests.post(
            f"{node.url}/node/jobs",
            json={
                "api": "/sdapi/v1/txt2img",
                "user": "heavy",
                "id": f"00000000-0000-4000-8000-{index:012d}",
                "payload": body(steps, size, seed=index),
            },
            timeout=30,
        )
        ids["heavy"].append(job.json()["id"])
    for index in range(3):
        job = requests.post(
            f"{node.url}/node/jobs",
            json={
                "api": "/sdapi/v1/txt2img",
                "user": f"light-{index}",
                "id": f"10000000-0000-4000-8000-{index:012d}",
                "payload": body(steps, size, seed=999 + index),
            },
            timeout=30,
        )
        ids["light"].append(job.json()["id"])
    documents: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        documents = {
            job_id: requests.get(f"{node.url}/node/jobs/{job_id}", timeout=30).json()
            for job_id in ids["heavy"] + ids["light"]
        }
        done = sum(doc["status"] == "succeeded" for doc in documents.values())
        if done == len(documents):
            break
        log(f"  fairness: {done}/{len(documents)} jobs done")
        time.sleep(1.0)

    def seconds(doc: dict[str, Any], start: str, end: str) -> float:
        return (datetime.fromisoformat(doc[end]) - datetime.fromisoformat(doc[start])).total_seconds()

    run_time = statistics.median(seconds(documents[i], "startedAt", "finishedAt") for i in ids["heavy"])
    waits = [seconds(documents[i], "createdAt", "finishedAt") for i in ids["light"]]
    log(f"  one job runs {run_time:.3f}s; light users finished after {', '.join(f'{w:.2f}s' for w in waits)}")
    return statistics.mean(waits) / run_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        log("writing the tiny models")
        write_tiny_models(root / "models", progress=log)
        # Both sides get the same torch thread count, so the ratio measures HTTP and queueing, not threading.
        threads = str(torch.get_num_threads())
        env = {
            "SD_MODELS_DIR": str(root / "models"),
            "SD_MAX_QUEUED_PER_USER": "64",
            "SD_MAX_STEPS": "1000",
            "OMP_NUM_THREADS": threads,
        }
        log(f"torch threads: {threads} in this process and in the node processes")
        engine = Engine(CoreConfig(models_dir=root / "models", cache_dir=root / "cache"))

        node = ServerProcess(role="node", data_dir=root / "node-batched", env={**env, "SD_MAX_BATCH": "8"}).start()
        try:
            log("HTTP end to end vs in-process generate")
            results["http_overhead_ratio"] = http_overhead(
                node, engine, steps=args.steps, size=args.size, repeats=args.repeats
            )
            log("8 concurrent users, batching on")
            batched = concurrent_throughput(node, users=8, jobs_per_user=3, steps=args.steps, size=args.size)
        finally:
            node.stop()
        node = ServerProcess(role="node", data_dir=root / "node-single", env={**env, "SD_MAX_BATCH": "1"}).start()
        try:
            log("8 concurrent users, batching off")
            single = concurrent_throughput(node, users=8, jobs_per_user=3, steps=args.steps, size=args.size)
            log(f"  batched {batched:.2f}s vs one at a time {single:.2f}s")
            results["batching_speedup"] = single / batched
            log("fairness: 32 queued jobs of one user, then 3 users with one job each")
            results["light_user_wait_ratio"] = fairness(node, steps=args.steps, size=args.size)
        finally:
            node.stop()
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in results.items()))


if __name__ == "__main__":
    main()
