"""The fair queue and the worker, driven through `Worker.process_one()`: fairness order, limits, batching (with the
real engine and real images), failures, and recovery of a killed node process."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from django.test import override_settings
from PIL import Image

from gpu_node import runtime
from gpu_node.errors import QueueFullError, UserQueueFullError
from gpu_node.generation_views import submit
from gpu_node.models import Job, JobKind, JobStatus
from gpu_node.queue import fair_order, queue_position
from gpu_node.worker import RESTART_ERROR, Worker, a1111_response
from sd_core.engine import Engine
from sd_core.errors import DeviceOutOfMemoryError
from sd_core.types import GenerationRequest, GenerationResult
from tests.processes import ServerProcess

pytestmark = pytest.mark.django_db(transaction=True)


class FakeGeneratorForQueueTests:
    """A stand-in for the engine in tests about queue order and failures (not about images): it records each
    call's users and returns flat images instantly."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail_with: Exception | None = None

    def generate_batch(
        self, requests: list[GenerationRequest], *, controls: Any = None, on_steps: Any = None
    ) -> list[GenerationResult]:
        self.calls.append([r.prompt for r in requests])
        if self.fail_with is not None:
            error, self.fail_with = self.fail_with, None
            raise error
        return [
            GenerationResult(
                images=(Image.new("RGB", (r.width, r.height)),) * r.image_count,
                infotexts=(r.prompt,) * r.image_count,
                seeds=(1,) * r.image_count,
                subseeds=(1,) * r.image_count,
                info={"prompt": r.prompt},
            )
            for r in requests
        ]


@pytest.fixture
def node_settings(tiny_models_dir: Path, tmp_path: Path) -> Iterator[None]:
    with override_settings(
        SD_MODELS_DIR=str(tiny_models_dir),
        MEDIA_ROOT=str(tmp_path / "media"),
        SD_MAX_QUEUED_PER_USER=50,
        SD_MAX_QUEUE=100,
        SD_MAX_BATCH=8,
    ):
        runtime.get_engine.cache_clear()
        yield
        runtime.get_engine.cache_clear()


def job_payload(user: str, **fields: object) -> dict[str, object]:
    payload: dict[str, object] = {"prompt": user, "steps": 2, "width": 64, "height": 64, "seed": 1}
    payload.update(fields)
    return payload


def test_it_serves_users_round_robin_and_fifo_within_a_user(node_settings: None):
    fake = FakeGeneratorForQueueTests()
    worker = Worker(fake, max_batch=1)
    for index in range(6):
        submit("heavy", JobKind.TXT2IMG, job_payload(f"heavy-{index}", steps=2 + index), detached=True)
    submit("light-1", JobKind.TXT2IMG, job_payload("light-1"), detached=True)
    submit("light-2", JobKind.TXT2IMG, job_payload("light-2"), detached=True)
    while worker.process_one():
        pass
    order = [prompts[0] for prompts in fake.calls]
    assert order[:3] == ["heavy-0", "light-1", "light-2"], "each light user waits at most one heavy job"
    assert order[3:] == [f"heavy-{i}" for i in range(1, 6)], "the heavy user's jobs run in order"


def test_a_jobs_reported_queue_position_is_its_place_in_the_fair_order(node_settings: None):
    """queue_position counts per user instead of reading the queue; it must agree with fair_order everywhere:
    users never served, served long ago and just now, deep and shallow queues, and as the worker drains them."""
    fake = FakeGeneratorForQueueTests()
    worker = Worker(fake, max_batch=1)
    counts = {"heavy": 7, "light-a": 1, "middle": 3, "light-b": 1, "deep": 5}
    for round_number in range(max(counts.values())):
        for user, count in counts.items():
            if round_number < count:
                submit(user, JobKind.TXT2IMG, job_payload(f"{user}-{round_number}"), detached=True)
    for _ in range(6):
        ordered = fair_order(list(Job.objects.queued()), worker.last_served)
        reported = [queue_position(job, worker.last_served) for job in ordered]
        assert [place.position if place else None for place in reported] == list(range(1, len(ordered) + 1))
        assert {place.total for place in reported if place} == {len(ordered)}
        assert worker.process_one()
    finished = Job.objects.exclude(status=JobStatus.QUEUED).first()
    assert finished is not None and queue_position(finished, worker.last_served) is None


def test_it_limits_queued_jobs_per_user_and_in_total(node_settings: None):
    with override_settings(SD_MAX_QUEUED_PER_USER=2, SD_MAX_QUEUE=3):
        submit("greedy", JobKind.TXT2IMG, job_payload("a"), detached=True)
        submit("greedy", JobKind.TXT2IMG, job_payload("b"), detached=True)
        with pytest.raises(UserQueueFullError) as per_user:
            submit("greedy", JobKind.TXT2IMG, job_payload("c"), detached=True)
        assert per_user.value.status_code == 429
        submit("other", JobKind.TXT2IMG, job_payload("d"), detached=True)
        with pytest.raises(QueueFullError) as total:
            submit("third", JobKind.TXT2IMG, job_payload("e"), detached=True)
        assert total.value.status_code == 503


def test_submitting_the_same_job_id_twice_creates_one_job(node_settings: None):
    job_id = "7f3c1f7e-1b7a-4a57-9a1e-8a6f3d1c2b10"
    first = submit("alice", JobKind.TXT2IMG, job_payload("once"), detached=True, job_id=job_id)
    again = submit("alice", JobKind.TXT2IMG, job_payload("once"), detached=True, job_id=job_id)
    assert first.id == again.id
    assert Job.objects.count() == 1


class SpyEngine:
    """The real engine, recording how many generate_batch calls it received and their sizes."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.batch_sizes: list[int] = []

    def generate_batch(self, requests: list[GenerationRequest], **kwargs: Any) -> list[GenerationResult]:
        self.batch_sizes.append(len(requests))
        return self.engine.generate_batch(requests, **kwargs)


def test_compatible_jobs_of_four_users_run_as_one_batch_and_equal_their_single_runs(node_settings: None):
    spy = SpyEngine(runtime.get_engine())
    worker = Worker(spy, max_batch=8)
    jobs = [
        submit(f"user-{i}", JobKind.TXT2IMG, job_payload(f"a castle number {i}", seed=40 + i), detached=True)
        for i in range(4)
    ]
    assert worker.process_one()
    assert spy.batch_sizes == [4]
    for job in jobs:
        job.refresh_from_db()
        assert job.status == JobStatus.SUCCEEDED
        batched = _first_image(job)
        alone = submit("solo", JobKind.TXT2IMG, dict(job.payload), detached=True)
        worker.process_one()
        alone.refresh_from_db()
        difference = np.abs(np.asarray(batched, dtype=np.float32) - np.asarray(_first_image(alone), dtype=np.float32))
        assert difference.max() <= 2, "a batched image equals the image of the same job run alone"
    assert spy.batch_sizes[1:] == [1, 1, 1, 1]


def test_a_failing_job_gets_a_clear_error_and_the_next_job_runs(node_settings: None):
    fake = FakeGeneratorForQueueTests()
    worker = Worker(fake, max_batch=1)
    fake.fail_with = DeviceOutOfMemoryError("the device ran out of memory for 2048x2048; use a smaller size")
    doomed = submit("oom-user", JobKind.TXT2IMG, job_payload("big"), detached=True)
    fine = submit("next-user", JobKind.TXT2IMG, job_payload("small"), detached=True)
    worker.process_one()
    worker.process_one()
    doomed.refresh_from_db()
    fine.refresh_from_db()
    assert doomed.status == JobStatus.FAILED
    assert doomed.error_status == 422 and "out of memory" in doomed.error
    assert fine.status == JobStatus.SUCCEEDED


def test_a_failed_batch_reruns_its_jobs_one_by_one(node_settings: None):
    fake = FakeGeneratorForQueueTests()
    worker = Worker(fake, max_batch=8)
    jobs = [submit(f"u{i}", JobKind.TXT2IMG, job_payload(f"p{i}"), detached=True) for i in range(3)]
    fake.fail_with = RuntimeError("a batch-only failure")
    worker.process_one()
    assert [len(call) for call in fake.calls] == [3, 1, 1, 1]
    assert all(Job.objects.get(id=job.id).status == JobStatus.SUCCEEDED for job in jobs)


def test_a_waiter_does_not_miss_a_job_that_finished_before_it_started_waiting(node_settings: None):
    """The blocking views read a mark, check the database, then wait: a job finishing in between wakes them at
    once (before, the wait slept its whole timeout, 0.5 s added to such a request)."""
    fake = FakeGeneratorForQueueTests()
    worker = Worker(fake, max_batch=1)
    job = submit("quick", JobKind.TXT2IMG, job_payload("x"), detached=False)
    mark = worker.finished_count()
    worker.process_one()  # the job finishes after the mark, before the wait
    finished = threading.Event()

    def wait() -> None:
        worker.wait_finished(mark, timeout=120)
        finished.set()

    waiter = threading.Thread(target=wait)
    waiter.start()
    assert finished.wait(60), "the waiter was woken by the finish it had not seen yet"
    waiter.join()
    assert Job.objects.get(id=job.id).status == JobStatus.SUCCEEDED
    unchanged = worker.finished_count()
    worker.wait_finished(unchanged, timeout=0.05)  # nothing finished since: it waits the timeout out
    assert worker.finished_count() == unchanged


def test_a_running_job_left_by_a_dead_process_is_failed_on_recovery(node_settings: None):
    job = submit("crash", JobKind.TXT2IMG, job_payload("x"), detached=True)
    assert job.claim()
    queued = submit("waiting", JobKind.TXT2IMG, job_payload("y"), detached=True)
    Worker(FakeGeneratorForQueueTests(), max_batch=1).recover()
    job.refresh_from_db()
    queued.refresh_from_db()
    assert job.status == JobStatus.FAILED and job.error == RESTART_ERROR
    assert queued.status == JobStatus.QUEUED


def _first_image(job: Job) -> Image.Image:
    import base64
    import io

    return Image.open(io.BytesIO(base64.b64decode(a1111_response(job)["images"][0]))).convert("RGB")


@pytest.mark.django_db(transaction=False)
def test_queued_jobs_survive_a_killed_node_process(tiny_models_dir: Path, tmp_path: Path):
    """A real node process is killed with SIGKILL mid-job and restarted on the same database."""
    node = ServerProcess(
        role="node", data_dir=tmp_path / "node", env={"SD_MODELS_DIR": str(tiny_models_dir), "SD_MAX_STEPS": "1000"}
    )
    node.start()
    try:
        ids = [f"00000000-0000-4000-8000-00000000000{i}" for i in range(4)]
        for index, job_id in enumerate(ids):
            body: dict[str, Any] = {
                "id": job_id,
                "api": "/sdapi/v1/txt2img",
                "user": f"user-{index}",
                "payload": {"prompt": "x", "steps": 400 if index == 0 else 2, "width": 64, "height": 64},
            }
            assert requests.post(f"{node.url}/node/jobs", json=body, timeout=30).status_code == 202
        _wait_for(lambda: requests.get(f"{node.url}/node/jobs/{ids[0]}", timeout=10).json()["status"] == "running")
        node.kill(signal.SIGKILL)
        node.start()
        first = requests.get(f"{node.url}/node/jobs/{ids[0]}", timeout=10).json()
        assert first["status"] == "failed" and "restarted" in first["error"]
        for job_id in ids[1:]:
            _wait_for(
                lambda job_id=job_id: (
                    requests.get(f"{node.url}/node/jobs/{job_id}", timeout=10).json()["status"] == "succeeded"
                )
            )
            assert requests.get(f"{node.url}/node/jobs/{job_id}", timeout=10).json()["result"]["images"]
    finally:
        node.stop()


def _wait_for(condition: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")
