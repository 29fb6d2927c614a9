"""Node benchmark, measured side by side in one run on real node processes (gunicorn, tiny SD1 model on CPU):

- http_overhead_ratio: POST /sdapi/v1/txt2img end to end over HTTP vs in-process `Engine.generate`, same request;
- batching_speedup: throughput of 8 concurrent users with batching (SD_MAX_BATCH=8) over batching off (=1);
- light_user_wait_ratio: one user queues 32 jobs, then 3 users one job each; their mean wait (queued to finished)
  over one job's run time, the median of 5 runs. Fair turns make it about 2.5; first in, first out would make it
  about 33.

    python -m bench.node [--steps 20] [--size 64] [--full-size]

With CUDA (or --full-size) it then measures the same on a full-size SD1.5 architecture with random weights (no
download) at 512x512, 20 steps, reported with an `sd15_` prefix.

Ends with one line: RESULT name=value ...
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
import torch

from bench.engine import build_full_size
from sd_core.config import CoreConfig
from sd_core.engine import Engine
from sd_core.tiny import write_tiny_models
from sd_core.types import GenerationRequest
from tests.processes import ServerProcess


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Workload:
    """What every request of a measurement asks for."""

    checkpoint: str
    steps: int
    size: int


PROMPT = "a lighthouse on a cliff"


def body(work: Workload, seed: int = 1) -> dict[str, Any]:
    return {
        "prompt": PROMPT, "steps": work.steps, "width": work.size, "height": work.size, "seed": seed,
        "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": work.checkpoint},
    }  # fmt: skip


def http_overhead(node: ServerProcess, engine: Engine, work: Workload, *, repeats: int) -> float:
    request = GenerationRequest(
        checkpoint=work.checkpoint,
        prompt=PROMPT,
        steps=work.steps,
        width=work.size,
        height=work.size,
        seed=1,
        sampler_name="Euler",
    )
    headers = {"X-User-Id": "bench"}
    engine.generate(request)
    requests.post(f"{node.url}/sdapi/v1/txt2img", json=body(work), headers=headers, timeout=600).raise_for_status()
    http: list[float] = []
    local: list[float] = []
    for repeat in range(repeats):
        started = time.perf_counter()
        requests.post(f"{node.url}/sdapi/v1/txt2img", json=body(work), headers=headers, timeout=600).raise_for_status()
        http.append(time.perf_counter() - started)
        started = time.perf_counter()
        engine.generate(request)
        local.append(time.perf_counter() - started)
        log(f"  http {http[-1]:.3f}s vs in-process {local[-1]:.3f}s ({repeat + 1}/{repeats})")
    return statistics.median(http) / statistics.median(local)


def concurrent_throughput(node: ServerProcess, work: Workload, *, users: int, jobs_per_user: int) -> float:
    """Seconds for `users` threads each running `jobs_per_user` blocking txt2img calls."""

    def user_loop(index: int) -> None:
        for job in range(jobs_per_user):
            requests.post(
                f"{node.url}/sdapi/v1/txt2img",
                json=body(work, seed=index * 100 + job),
                headers={"X-User-Id": f"user-{index}"},
                timeout=1800,
            ).raise_for_status()

    threads = [threading.Thread(target=user_loop, args=(index,)) for index in range(users)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def fairness(node: ServerProcess, work: Workload) -> float:
    """Mean wait of 3 light users behind a heavy user's 32 queued jobs, in units of one job's run time.

    The heavy user queues 32 jobs; once the node is working through them (1 s later: the light users meet a queue,
    not the submission burst), the 3 light users submit one job each at the same moment. A light user's wait runs
    from submitting to the job's end, its own run included: with fair turns they finish 1, 2 and 3 jobs after the
    heavy job running when they came, a mean of about 2.5 jobs.
    """

    def submit(user: str, seed: int) -> str:
        job: dict[str, Any] = {
            "api": "/sdapi/v1/txt2img",
            "user": user,
            "id": str(uuid.uuid4()),
            "payload": body(work, seed),
        }
        response = requests.post(f"{node.url}/node/jobs", json=job, timeout=30)
        response.raise_for_status()
        return str(response.json()["id"])

    heavy = [submit("heavy", index) for index in range(32)]
    time.sleep(1.0)
    with ThreadPoolExecutor(max_workers=3) as pool:
        light = list(pool.map(lambda index: submit(f"light-{index}", 999 + index), range(3)))
    ids = {"heavy": heavy, "light": light}
    # The node records every job's times; the bench only needs to know when all are done. It asks about the light
    # jobs first and rarely (each status call takes CPU from the node it measures), then collects the rest.
    documents = wait_for_jobs(node, ids["light"], poll=0.5) | wait_for_jobs(node, ids["heavy"], poll=2.0)

    def at(doc: dict[str, Any], name: str) -> datetime:
        return datetime.fromisoformat(doc[name])

    run_times = sorted((at(documents[i], "finishedAt") - at(documents[i], "startedAt")).total_seconds() for i in heavy)
    run_time = statistics.median(run_times)
    waits = [(at(documents[i], "finishedAt") - at(documents[i], "createdAt")).total_seconds() for i in ids["light"]]
    timeline = sorted(documents.values(), key=lambda doc: at(doc, "startedAt"))
    gaps = [
        (at(after, "startedAt") - at(before, "finishedAt")).total_seconds()
        for before, after in itertools.pairwise(timeline)
    ]
    first_light = min(at(documents[i], "createdAt") for i in ids["light"])
    order = [doc["user"] for doc in timeline if at(doc, "finishedAt") > first_light][:6]
    gap_ms = statistics.median(gaps) * 1000
    log(
        f"  one job runs {run_time:.3f}s (slowest {run_times[-1]:.3f}s); "
        f"between two jobs the worker spends {gap_ms:.1f}ms (median)"
    )
    log(f"  light users finished after {', '.join(f'{w:.2f}s' for w in waits)}; order from then on: {order}")
    for doc in [doc for doc in timeline if at(doc, "finishedAt") > first_light][:5]:
        created, started, finished = ((at(doc, key) - first_light).total_seconds() for key in TIMES)
        log(f"    {doc['user']:8s} submitted {created:+.3f}s  started {started:+.3f}s  finished {finished:+.3f}s")
    return statistics.mean(waits) / run_time


TIMES = ("createdAt", "startedAt", "finishedAt")


def wait_for_jobs(node: ServerProcess, job_ids: list[str], *, poll: float) -> dict[str, dict[str, Any]]:
    documents: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if documents.get(job_id, {}).get("status") not in ("succeeded", "failed"):
                documents[job_id] = requests.get(f"{node.url}/node/jobs/{job_id}", timeout=30).json()
        done = sum(doc["status"] in ("succeeded", "failed") for doc in documents.values())
        if done == len(job_ids):
            return documents
        log(f"  fairness: {done}/{len(job_ids)} jobs done")
        time.sleep(poll)
    raise TimeoutError(f"jobs not done after an hour: {[i for i in job_ids if documents[i]['status'] != 'succeeded']}")


def measure(root: Path, env: dict[str, str], engine: Engine, work: Workload, *, repeats: int) -> dict[str, float]:
    """The three figures for one workload, on two fresh node processes (batching on, then off)."""
    results: dict[str, float] = {}
    folder = root / f"nodes-{work.checkpoint}"
    node = ServerProcess(role="node", data_dir=folder / "batched", env={**env, "SD_MAX_BATCH": "8"}).start()
    try:
        log(f"{work}: HTTP end to end vs in-process generate")
        results["http_overhead_ratio"] = http_overhead(node, engine, work, repeats=repeats)
        log("8 concurrent users, batching on")
        batched = concurrent_throughput(node, work, users=8, jobs_per_user=3)
    finally:
        node.stop()
    node = ServerProcess(role="node", data_dir=folder / "single", env={**env, "SD_MAX_BATCH": "1"}).start()
    try:
        log("8 concurrent users, batching off")
        single = concurrent_throughput(node, work, users=8, jobs_per_user=3)
        log(f"  batched {batched:.2f}s vs one at a time {single:.2f}s")
        results["batching_speedup"] = single / batched
        log("fairness: 32 queued jobs of one user, then 3 users with one job each")
        ratios = [fairness(node, work) for _ in range(5)]
        log(f"  light-user wait ratios of 5 runs: {', '.join(f'{ratio:.2f}' for ratio in ratios)}")
        results["light_user_wait_ratio"] = statistics.median(ratios)
    finally:
        node.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--full-size", action="store_true", help="also measure full-size SD1.5 (default: on CUDA)")
    parser.add_argument("--full-size-px", type=int, default=512, help="image size of the full-size run")
    parser.add_argument("--full-size-steps", type=int, default=20, help="sampling steps of the full-size run")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        log("writing the tiny models")
        write_tiny_models(root / "models", progress=log)
        # Both sides get the same torch thread count, so the ratio measures HTTP and queueing, not threading. One core
        # is left to the node's HTTP threads and this client: torch's threads wait for each other at every operation,
        # so one of them pushed off its core by a request stalls the whole step (jobs then take 3-4x as long).
        threads = str(max(1, (os.cpu_count() or 1) - 1))
        torch.set_num_threads(int(threads))
        env = {
            "SD_MODELS_DIR": str(root / "models"),
            "SD_MAX_QUEUED_PER_USER": "64",
            "SD_MAX_STEPS": "1000",
            "OMP_NUM_THREADS": threads,
        }
        log(f"torch threads: {threads} in this process and in the node processes")
        engine = Engine(CoreConfig(models_dir=root / "models", cache_dir=root / "cache"))
        tiny = Workload(checkpoint="tiny-sd1.safetensors", steps=args.steps, size=args.size)
        results.update(measure(root, env, engine, tiny, repeats=args.repeats))
        if args.full_size or torch.cuda.is_available():
            name = build_full_size(root / "models", "sd1", engine.config.torch_dtype())
            engine.registry.refresh()
            full = Workload(checkpoint=name, steps=args.full_size_steps, size=args.full_size_px)
            full_results = measure(root, env, engine, full, repeats=args.repeats)
            results.update({f"sd15_{key}": value for key, value in full_results.items()})
    print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in results.items()))


if __name__ == "__main__":
    main()
