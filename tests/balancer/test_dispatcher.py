"""The task dispatcher driven through `Dispatcher.process_one()` with a fake node client and an injected clock:
dispatch, results stored once, lost jobs requeued, lease expiry, attempts exhausted, the dispatcher lease."""

from __future__ import annotations

import base64
import io
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import requests
from django.core.cache import cache
from django.core.files.storage import default_storage
from django.test import override_settings
from PIL import Image

from balancer import health
from balancer.dispatcher import Dispatcher, users_in_turn
from balancer.models import DispatcherLease, Task, TaskApi, TaskStatus
from balancer.node_client import ForwardedResponse, NodeUnreachable
from balancer.tasks import cancel_task, store_result, submit_task
from tests.processes import REPO, clean_environment

pytestmark = pytest.mark.django_db(transaction=True)

NODE_A = "http://node-a.test:7860"
NODE_B = "http://node-b.test:7860"


class FakeNodeClientForDispatcherTests:
    """Stands in for the nodes' job API in tests about task bookkeeping (never about images): jobs live in a dict,
    and each node can be made to refuse connections, time out, lose its jobs or refuse payloads."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.submits: list[tuple[str, str]] = []
        self.polls: list[tuple[str, str]] = []
        self.cancels: list[tuple[str, str]] = []
        self.dead: set[str] = set()
        self.slow: set[str] = set()
        self.full: set[str] = set()
        self.refusing: set[str] = set()

    def health(self, url: str) -> dict[str, Any]:
        raise AssertionError("the dispatcher reads health from routing, never from the node")

    def submit_job(self, url: str, *, job_id: str, api: str, payload: Mapping[str, Any], user: str) -> dict[str, Any]:
        self._reach(url)
        if url in self.full or url in self.refusing:
            response = requests.Response()
            response.status_code = 429 if url in self.full else 422
            response._content = b'{"detail": [{"loc": ["body", "steps"], "msg": "too many steps"}]}'
            raise requests.HTTPError(f"{response.status_code}", response=response)
        self.submits.append((url, job_id))
        job = self.jobs.setdefault(
            (url, job_id),
            {
                "id": job_id,
                "user": user,
                "status": "queued",
                "progress": 0.0,
                "error": None,
                "errorStatus": None,
                "result": None,
                "node": url.split("//")[1].split(".")[0],
                "n": int(payload.get("batch_size", 1)),
            },
        )
        return dict(job)

    def get_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        self.polls.append((url, job_id))
        self._reach(url)
        job = self.jobs.get((url, job_id))
        return dict(job) if job is not None else None

    def cancel_job(self, url: str, job_id: str) -> dict[str, Any] | None:
        self._reach(url)
        self.cancels.append((url, job_id))
        return self.get_job(url, job_id)

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
        raise AssertionError("the dispatcher never forwards")

    def _reach(self, url: str) -> None:
        if url in self.dead:
            raise NodeUnreachable(url, "connection refused", retry_safe=True)
        if url in self.slow:
            raise NodeUnreachable(url, "read timeout", retry_safe=False)

    # ------------------------------------------------------------------------------------------ test controls
    def run(self, url: str, job_id: str, progress: float = 0.5) -> None:
        self.jobs[(url, job_id)].update(status="running", progress=progress)

    def succeed(self, url: str, job_id: str) -> None:
        job = self.jobs[(url, job_id)]
        images = [png_base64(color=(index * 40, 0, 0)) for index in range(job["n"])]
        job.update(
            status="succeeded",
            progress=1.0,
            result={"images": images, "parameters": {"prompt": "x"}, "info": '{"infotexts": ["x"]}'},
        )

    def fail(self, url: str, job_id: str, error: str, status: int) -> None:
        self.jobs[(url, job_id)].update(status="failed", error=error, errorStatus=status)

    def forget(self, url: str) -> None:
        """The node restarted with an empty job table."""
        for key in [key for key in self.jobs if key[0] == url]:
            del self.jobs[key]


class ManualClock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def png_base64(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def set_health(url: str, *, healthy: bool) -> None:
    status = health.NodeStatus.READY if healthy else health.NodeStatus.DOWN
    record = health.NodeHealth(url=url, node_id=url, boot_id="boot-1", healthy=healthy, status=status, capacity=2)
    health.write_health(record)


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[str]]:
    """Two healthy nodes as routing sees them, and a private MEDIA_ROOT."""
    with override_settings(SD_NODES=[NODE_A, NODE_B], MEDIA_ROOT=str(tmp_path / "media"), SD_TASK_MAX_ATTEMPTS=3):
        cache.clear()
        for url in (NODE_A, NODE_B):
            set_health(url, healthy=True)
        yield [NODE_A, NODE_B]
        cache.clear()


@pytest.fixture
def fake() -> FakeNodeClientForDispatcherTests:
    return FakeNodeClientForDispatcherTests()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def dispatcher(fake: FakeNodeClientForDispatcherTests, clock: ManualClock, nodes: list[str]) -> Dispatcher:
    return Dispatcher(client=fake, clock=clock, owner="test-dispatcher", task_lease=timedelta(seconds=60))


def new_task(user: str = "alice", **payload: Any) -> Task:
    return submit_task(user=user, body={"api": TaskApi.TXT2IMG, "payload": {"prompt": "x", **payload}})


def stored_files(task: Task) -> list[str]:
    folder = f"tasks/{task.id}"
    return sorted(default_storage.listdir(folder)[1]) if default_storage.exists(folder) else []


def test_it_dispatches_a_task_and_stores_its_result_once(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    task = new_task(batch_size=2)
    assert dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.attempts == 1
    assert fake.submits == [(task.node_url, str(task.id))], "the first attempt's node job has the task's id"

    fake.run(task.node_url, task.node_job_id, progress=0.25)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.progress == 0.25

    fake.succeed(task.node_url, task.node_job_id)
    stale = Task.objects.get(id=task.id)
    assert dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and task.progress == 1.0
    assert task.image_names == [f"tasks/{task.id}/0.png", f"tasks/{task.id}/1.png"]
    assert stored_files(task) == ["0.png", "1.png"]

    # A second execution that saw the same finished job (a dispatcher that lost its lease) stores nothing.
    assert not store_result(
        stale, fake.jobs[(task.node_url, task.node_job_id)], status=TaskStatus.SUCCEEDED, now=dispatcher.clock()
    )
    assert stored_files(task) == ["0.png", "1.png"]
    assert not dispatcher.process_one(), "a finished task is not polled again"


def test_it_keeps_one_result_when_two_executions_of_a_task_finish(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests, clock: ManualClock
):
    task = new_task()
    dispatcher.process_one()
    first = Task.objects.get(id=task.id)
    fake.slow.add(first.node_url)
    clock.advance(61)
    set_health(first.node_url, healthy=False)
    dispatcher.process_one()  # lease expired: requeued and dispatched to the other node
    second = Task.objects.get(id=task.id)
    assert second.status == TaskStatus.RUNNING and second.attempts == 2 and second.node_url != first.node_url

    assert second.node_job_id != first.node_job_id == str(task.id)
    fake.slow.clear()
    fake.succeed(first.node_url, first.node_job_id)
    fake.succeed(second.node_url, second.node_job_id)
    assert not store_result(
        first, fake.jobs[(first.node_url, first.node_job_id)], status=TaskStatus.SUCCEEDED, now=clock()
    ), "the first execution lost its lease: its result is not the task's"
    assert stored_files(task) == []
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and task.result is not None
    assert task.result["node"] == second.node_url.split("//")[1].split(".")[0]
    assert stored_files(task) == ["0.png"]


def test_it_requeues_a_task_whose_lease_expired(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests, clock: ManualClock
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    fake.slow.add(task.node_url)  # the node answers nothing: no proof of death, the lease decides
    clock.advance(30)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING, "still within its lease"
    clock.advance(31)
    for url in (NODE_A, NODE_B):
        set_health(url, healthy=False)  # nowhere to go: it stays queued
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.attempts == 1
    assert "no news from node" in task.error


def test_it_renews_the_lease_while_the_node_has_the_job(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests, clock: ManualClock
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    for _ in range(5):
        clock.advance(40)
        dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.attempts == 1
    assert task.lease_until is not None and task.lease_until > clock()


def test_it_requeues_a_task_whose_node_died_and_another_node_finishes_it(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    dead = task.node_url
    fake.dead.add(dead)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.node_url != dead and task.attempts == 2
    fake.succeed(task.node_url, task.node_job_id)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and stored_files(task) == ["0.png"]


@pytest.mark.parametrize("loss", ["restarted", "forgotten"])
def test_it_requeues_a_task_its_node_lost_by_restarting(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests, loss: str
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    lost = task.node_url
    if loss == "restarted":
        fake.fail(lost, task.node_job_id, "the node restarted while this job was running; submit it again", 503)
    else:
        fake.forget(lost)
    fake.full.add(NODE_B if lost == NODE_A else NODE_A)  # the next attempt goes back to the same node
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.RUNNING and task.attempts == 2 and task.node_url == lost
    assert "restarted" in task.error
    assert fake.jobs[(lost, task.node_job_id)]["status"] == "queued", "a new job, not the one the node failed"
    fake.succeed(lost, task.node_job_id)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED and task.error == ""


def test_it_fails_a_task_after_its_attempts_are_spent(dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests):
    task = new_task()
    for _ in range(3):
        dispatcher.process_one()
        task.refresh_from_db()
        assert task.status == TaskStatus.RUNNING
        fake.forget(task.node_url)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.attempts == 3
    assert "lost by its node 3 time(s)" in task.error and "giving up" in task.error
    assert task.finished_at is not None


def test_it_fails_a_task_whose_payload_the_node_refuses_without_retrying(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    fake.refusing = {NODE_A, NODE_B}
    task = new_task()
    assert dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.attempts == 1
    assert "too many steps" in task.error
    dispatcher.process_one()
    assert Task.objects.get(id=task.id).attempts == 1


def test_it_fails_a_task_whose_node_job_fails_on_its_input(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    fake.fail(task.node_url, task.node_job_id, "sampler_name: unknown sampler 'x'", 422)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED and task.attempts == 1 and "unknown sampler" in task.error


def test_it_does_not_count_attempts_a_node_never_received(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    fake.dead = {NODE_A, NODE_B}
    task = new_task()
    for _ in range(5):
        dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.attempts == 0
    fake.dead.clear()
    fake.full = {NODE_A, NODE_B}
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.QUEUED and task.attempts == 0, "a full node leaves the task queued"


def test_it_limits_the_tasks_in_flight_per_node(dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests):
    tasks = [new_task(user=f"user-{index}") for index in range(10)]
    dispatcher.process_one()
    running = Task.objects.running()
    assert running.count() == 8, "2 nodes x capacity 2 x 2 in flight"
    assert {url for url, _ in fake.submits} == {NODE_A, NODE_B}
    for url, job_id in list(fake.submits):
        fake.succeed(url, job_id)
    dispatcher.process_one()
    dispatcher.process_one()
    assert Task.objects.filter(status=TaskStatus.SUCCEEDED).count() == 8
    assert Task.objects.running().count() == 2
    assert len(tasks) == 10


def test_it_dispatches_users_in_turn(nodes: list[str]):
    tasks = [new_task(user="alice") for _ in range(3)] + [new_task(user="bob"), new_task(user="carol")]
    order = [task.user for task in users_in_turn(tasks)]
    assert order == ["alice", "bob", "carol", "alice", "alice"]


def test_a_cancelled_task_is_interrupted_and_its_node_job_cancelled(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    task = new_task()
    dispatcher.process_one()
    task.refresh_from_db()
    cancel_task(task, client=fake)
    assert task.status == TaskStatus.INTERRUPTED
    assert fake.cancels == [(task.node_url, task.node_job_id)]
    fake.succeed(task.node_url, task.node_job_id)
    dispatcher.process_one()
    task.refresh_from_db()
    assert task.status == TaskStatus.INTERRUPTED and stored_files(task) == []

    queued = new_task()
    cancel_task(queued, client=fake)
    assert queued.status == TaskStatus.INTERRUPTED
    dispatcher.process_one()
    assert Task.objects.get(id=queued.id).status == TaskStatus.INTERRUPTED, "a cancelled task is never dispatched"


def test_only_the_lease_holder_dispatches(nodes: list[str], fake: FakeNodeClientForDispatcherTests, clock: ManualClock):
    first = Dispatcher(client=fake, clock=clock, owner="first", lease_ttl=timedelta(seconds=10))
    second = Dispatcher(client=fake, clock=clock, owner="second", lease_ttl=timedelta(seconds=10))
    new_task()
    assert first.process_one() and first.holds_lease
    new_task()
    assert not second.process_one() and not second.holds_lease
    assert Task.objects.queued().count() == 1
    clock.advance(11)  # the first dispatcher died: its lease runs out
    assert second.process_one() and second.holds_lease
    assert Task.objects.queued().count() == 0
    assert not first.process_one(), "the lease moved on"
    second.release()
    assert not DispatcherLease.objects.filter(name="dispatcher").exists()
    assert first.process_one() is False and first.holds_lease, "a released lease is taken at once"


def test_a_node_that_does_not_answer_is_asked_once_per_pass(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests
):
    for index in range(6):
        new_task(user=f"user-{index}")
    dispatcher.process_one()
    fake.slow.add(NODE_A)
    fake.polls.clear()
    dispatcher.process_one()
    assert [url for url, _ in fake.polls].count(NODE_A) == 1
    assert [url for url, _ in fake.polls].count(NODE_B) == Task.objects.running().filter(node_url=NODE_B).count()


def test_the_run_dispatcher_command_runs_a_pass(tmp_path: Path):
    env = clean_environment({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "SD_ROLE": "balancer"})
    manage = [sys.executable, "manage.py"]
    subprocess.run([*manage, "migrate", "--no-input", "-v", "0"], cwd=REPO, env=env, check=True, timeout=120)
    done = subprocess.run([*manage, "run_dispatcher", "--once"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "nothing to do" in done.stdout


def test_it_removes_finished_tasks_and_their_images_after_the_retention(
    dispatcher: Dispatcher, fake: FakeNodeClientForDispatcherTests, clock: ManualClock
):
    with override_settings(SD_TASK_RETENTION=3600):
        old, webhooked = new_task(), new_task(user="bob")
        Task.objects.filter(id=webhooked.id).update(callback_url="https://hooks.example/x")
        dispatcher.process_one()
        for task in (old, webhooked):
            task.refresh_from_db()
            fake.succeed(task.node_url, task.node_job_id)
        with patch.object(Dispatcher, "deliver_webhooks", return_value=0):  # bob's delivery stays owed
            dispatcher.process_one()
            old.refresh_from_db()
            assert old.status == TaskStatus.SUCCEEDED and stored_files(old) == ["0.png"]
            clock.advance(1800)
            recent = new_task(user="carol")
            Task.objects.filter(id=recent.id).update(status=TaskStatus.FAILED, finished_at=clock())
            dispatcher.process_one()
            assert Task.objects.filter(id=old.id).exists(), "within the retention"

            clock.advance(1900)
            dispatcher.process_one()
        assert not Task.objects.filter(id=old.id).exists() and stored_files(old) == []
        webhooked.refresh_from_db()
        assert webhooked.webhook_status == "pending", "kept until its webhook is delivered"
        assert Task.objects.filter(id=recent.id).exists(), "finished 1,900 s ago: kept"
