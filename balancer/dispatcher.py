"""The task dispatcher: hands queued tasks to nodes, follows their node jobs, puts back in the queue the tasks whose
node lost them, stores each result once and delivers webhooks. One per cluster, chosen by a database lease; it runs
as a thread of a balancer process (`ensure_dispatcher()`) or as `manage.py run_dispatcher`."""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from itertools import zip_longest
from typing import Any

import requests
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone

from balancer import routing, webhooks
from balancer.models import DispatcherLease, Task, TaskStatus
from balancer.node_client import NodeClient, NodeUnreachable, get_node_client
from balancer.tasks import ResultError, remove_expired_tasks, store_result, task_document

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]

LEASE_NAME = "dispatcher"
LEASE_TTL = timedelta(seconds=15)  # how long a dead dispatcher holds dispatching up; > one node call's timeout
TASK_LEASE = timedelta(seconds=60)  # how long a running task may go without news from its node
IDLE_WAIT = 1.0  # seconds between passes when nothing moved (a new task wakes the dispatcher at once)
DISPATCH_BATCH = 200  # queued tasks considered per pass
WEBHOOKS_PER_PASS = 10
WEBHOOK_BUDGET = 3.0  # seconds of webhook deliveries per pass
WEBHOOK_CLAIM = timedelta(seconds=60)  # a claimed delivery is not retried by another dispatcher before this
IN_FLIGHT_PER_CAPACITY = 2  # tasks a node holds at once per unit of capacity: enough to fill its batches
NODE_FULL_STATUSES = (429, 503)  # the node's queue is full: try again later, the attempt does not count
NODE_REFUSED_STATUSES = (400, 422)  # the node refuses the payload: the task fails, never retried
ERROR_LIMIT = 2000  # characters of a node's error kept on the task
CLEANUP_INTERVAL = timedelta(minutes=1)  # how often old finished tasks are looked for (SD_TASK_RETENTION)


class Dispatcher:
    """Moves tasks through their lifecycle. `run()` loops until `stop_event` is set; tests drive `process_one()`
    with a fake node client and an injected clock."""

    def __init__(
        self,
        *,
        client: NodeClient | None = None,
        clock: Clock = timezone.now,
        owner: str | None = None,
        lease_ttl: timedelta = LEASE_TTL,
        task_lease: timedelta = TASK_LEASE,
        max_attempts: int | None = None,
        idle_wait: float = IDLE_WAIT,
        webhook_session: requests.Session | None = None,
    ) -> None:
        self._client = client
        self.clock = clock
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_ttl = lease_ttl
        self.task_lease = task_lease
        self.max_attempts = max_attempts or settings.SD_TASK_MAX_ATTEMPTS
        self.idle_wait = idle_wait
        self.webhook_session = webhook_session or requests.Session()
        self.webhook_session.trust_env = False  # no environment proxy between us and a customer's receiver
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self.holds_lease = False
        self.thread: threading.Thread | None = None
        self._next_cleanup: datetime | None = None

    @property
    def client(self) -> NodeClient:
        return self._client or get_node_client()

    # -------------------------------------------------------------------------------------------- lifecycle
    def run(self) -> None:
        log.info("task dispatcher %s started", self.owner)
        while not self.stop_event.is_set():
            try:
                moved = self.process_one()
            except Exception:  # the dispatcher must outlive a database or node hiccup
                log.exception("dispatcher pass failed; continuing")
                moved = False
            if not moved:
                self._wake.wait(timeout=self.idle_wait)
                self._wake.clear()
        self.release()
        log.info("task dispatcher %s stopped", self.owner)

    def start(self) -> threading.Thread:
        self.thread = threading.Thread(target=self.run, name="balancer-dispatcher", daemon=True)
        self.thread.start()
        return self.thread

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop and wait for the pass in progress, which then gives the lease back (process exit)."""
        self.stop()
        if self.thread is not None:
            self.thread.join(timeout)

    def release(self) -> None:
        """Give the lease back so another process takes over at once, not after LEASE_TTL."""
        if self.holds_lease:
            try:
                DispatcherLease.release(LEASE_NAME, owner=self.owner)
            finally:
                self.holds_lease = False
                close_old_connections()

    # ------------------------------------------------------------------------------------------------ a pass
    def process_one(self) -> bool:
        """One pass over the tasks, when this process holds the dispatcher lease. True when a task moved.

        1. Take or renew the lease; a process without it does nothing (one dispatcher per cluster). It is renewed
           between the steps below too, and a pass that lost it stops.
        2. Follow every running task's node job: news renews the task's lease and shows its progress; a finished
           job stores its result once; a job its node lost (refused connection, unknown job, node restarted) puts
           the task back in the queue, until SD_TASK_MAX_ATTEMPTS attempts failed it.
        3. Put back in the queue the running tasks whose lease expired (no news from their node for TASK_LEASE).
        4. Dispatch queued tasks, users in turn, to nodes chosen by the routing rules.
        5. Deliver the webhooks that are due.
        6. Once a minute, remove the tasks (and images) that finished more than SD_TASK_RETENTION seconds ago.
        """
        close_old_connections()
        moved = 0
        try:
            for step in (self.follow_running, self.requeue_expired, self.dispatch, self.deliver_webhooks, self.cleanup):
                if not self.hold_lease():
                    break
                moved += step(now=self.clock())
            return moved > 0
        finally:
            close_old_connections()

    def cleanup(self, *, now: datetime) -> int:
        """Old finished tasks go (not counted as movement: it never makes the next pass come sooner)."""
        if self._next_cleanup is not None and now < self._next_cleanup:
            return 0
        self._next_cleanup = now + CLEANUP_INTERVAL
        remove_expired_tasks(now=now)
        return 0

    def hold_lease(self) -> bool:
        self.holds_lease = DispatcherLease.acquire(
            LEASE_NAME, owner=self.owner, now=self.clock(), ttl=self.lease_ttl
        )  # fmt: skip
        return self.holds_lease

    # ------------------------------------------------------------------------------------ 2. running tasks
    def follow_running(self, *, now: datetime) -> int:
        """Follow the running tasks; a node that does not answer in time is not asked again in this pass (its
        tasks' leases decide), so one hung node cannot stall the dispatcher."""
        moved = 0
        silent: set[str] = set()
        renewed = time.monotonic()
        for task in list(Task.objects.running().in_queue_order()):
            if task.node_url in silent:
                continue
            if time.monotonic() - renewed > self.lease_ttl.total_seconds() / 4:
                if not self.hold_lease():
                    break
                renewed = time.monotonic()
            outcome = self.follow(task, now=self.clock())
            if outcome is None:
                silent.add(task.node_url)
            moved += bool(outcome)
        return moved

    def follow(self, task: Task, *, now: datetime) -> bool | None:
        """Poll one running task's node job and act on it. True when the task changed state, None when its node
        did not answer in time."""
        try:
            job = self.client.get_job(task.node_url, task.node_job_id)
        except NodeUnreachable as error:
            if not error.retry_safe:
                return None  # a slow answer is no proof of death: the task's lease decides
            routing.report_failure(task.node_url)
            return self.requeue(task, f"node {task.node_url} is unreachable ({error.reason})", now=now)
        except (requests.RequestException, ValueError) as error:
            log.warning("task %s: polling node %s failed: %s", task.id, task.node_url, error)
            return False
        if job is None:
            return self.requeue(task, f"node {task.node_url} no longer knows the job (it restarted)", now=now)
        status = job.get("status")
        if status in (TaskStatus.QUEUED, TaskStatus.RUNNING):
            self.renew(task, job, now=now)
            return False
        if status in (TaskStatus.SUCCEEDED, TaskStatus.INTERRUPTED):
            return self.store(task, job, TaskStatus(status), now=now)
        message = str(job.get("error") or "the node job failed")
        if _lost_by_restart(job):
            return self.requeue(task, f"node {task.node_url}: {message}", now=now)
        return task.finish(TaskStatus.FAILED, now=now, error=message[:ERROR_LIMIT])

    def renew(self, task: Task, job: Mapping[str, Any], *, now: datetime) -> None:
        """Keep the lease while the node has the job; write only when progress moved or half the lease is gone."""
        progress = _fraction(job.get("progress"))
        half_gone = task.lease_until is None or task.lease_until - now < self.task_lease / 2
        if half_gone or progress != task.progress:
            task.renew_lease(until=now + self.task_lease, progress=progress)

    def store(self, task: Task, job: Mapping[str, Any], status: TaskStatus, *, now: datetime) -> bool:
        try:
            return store_result(task, job, status=status, now=now)
        except ResultError as error:
            return task.finish(TaskStatus.FAILED, now=now, error=str(error))

    def requeue(self, task: Task, reason: str, *, now: datetime) -> bool:
        outcome = task.requeue(reason, max_attempts=self.max_attempts, now=now)
        if outcome is not None:
            log.warning("task %s: %s; %s (attempt %d)", task.id, reason, outcome, task.attempts)
        return outcome is not None

    # ------------------------------------------------------------------------------------- 3. expired leases
    def requeue_expired(self, *, now: datetime) -> int:
        moved = 0
        for task in list(Task.objects.lease_expired(now)):
            reason = f"no news from node {task.node_url} for {int(self.task_lease.total_seconds())} s"
            moved += self.requeue(task, reason, now=now)
        return moved

    # ------------------------------------------------------------------------------------------- 4. dispatch
    def dispatch(self, *, now: datetime) -> int:
        """Hand queued tasks to nodes, users in turn. The number of tasks that left the queue.

        1. A node holds at most IN_FLIGHT_PER_CAPACITY x its capacity tasks at once; the rest waits here, where it
           counts in the queue depth (the autoscaling signal) and a node that joins later can take it.
        2. A node that turns a task away (full, unreachable) gets no more in this pass; the task tries the next.
        3. The pass ends when no node can take a task.
        """
        queued = list(Task.objects.queued().in_queue_order()[:DISPATCH_BATCH])
        if not queued:
            return 0
        in_flight = Counter(Task.objects.running().values_list("node_url", flat=True))
        full: set[str] = set()
        dispatched = 0
        for task in users_in_turn(queued):
            while task.status == TaskStatus.QUEUED:
                node = self.choose(task, in_flight=in_flight, full=full)
                if node is None:
                    return dispatched
                if not task.claim_for(node.url, lease=self.task_lease, now=now):
                    break  # cancelled meanwhile
                if self.submit(task, node.url, now=now):
                    in_flight[node.url] += 1
                    dispatched += 1
                else:
                    full.add(node.url)
        return dispatched

    def choose(self, task: Task, *, in_flight: Counter[str], full: set[str]) -> routing.NodeState | None:
        model = task.model_title or routing.user_model(task.user)
        while True:
            node = routing.choose_node(user_key=task.user, model=model, exclude=tuple(full))
            if node is None or in_flight[node.url] < IN_FLIGHT_PER_CAPACITY * max(node.capacity, 1):
                return node
            full.add(node.url)

    def submit(self, task: Task, node_url: str, *, now: datetime) -> bool:
        """Send a claimed task to its node (idempotent there by `Task.node_job_id`). False when the node takes no more
        tasks in this pass.

        A refused connection or a full node leaves the task queued without counting the attempt; a payload the
        node refuses (422) fails the task; a timeout leaves it running: the node may have it, the poll will tell.
        """
        try:
            self.client.submit_job(
                node_url, job_id=task.node_job_id, api=task.api, payload=task.payload, user=task.user
            )
        except NodeUnreachable as error:
            routing.report_failure(node_url)
            if error.retry_safe:
                task.release_claim()
                return False
            log.warning("task %s: no answer from %s (%s); following it there", task.id, node_url, error.reason)
            return True
        except requests.HTTPError as error:
            return self._submit_refused(task, node_url, error, now=now)
        except (requests.RequestException, ValueError) as error:
            task.requeue(f"node {node_url} answered badly: {error}", max_attempts=self.max_attempts, now=now)
            return False
        log.info(
            "task %s dispatched user=%s node=%s model=%s attempt=%d",
            task.id, task.user, node_url, task.model_title or "(user's)", task.attempts,
        )  # fmt: skip
        if not Task.objects.running().filter(id=task.id, attempts=task.attempts).exists():
            self._cancel_quietly(task, node_url)  # cancelled while we were submitting
        return True

    def _submit_refused(self, task: Task, node_url: str, error: requests.HTTPError, *, now: datetime) -> bool:
        response = error.response
        status = response.status_code if response is not None else 0
        detail = response.text[:ERROR_LIMIT] if response is not None else str(error)
        if status in NODE_REFUSED_STATUSES:
            task.finish(TaskStatus.FAILED, now=now, error=detail)
            log.info("task %s failed: node %s refused its payload (%d): %s", task.id, node_url, status, detail)
            return True
        if status in NODE_FULL_STATUSES:
            task.release_claim()
            return False
        routing.report_failure(node_url)
        task.requeue(f"node {node_url} answered {status}: {detail}", max_attempts=self.max_attempts, now=now)
        return False

    def _cancel_quietly(self, task: Task, node_url: str) -> None:
        try:
            self.client.cancel_job(node_url, task.node_job_id)
        except (NodeUnreachable, requests.RequestException) as error:
            log.warning("task %s: cancelling its job on %s failed: %s", task.id, node_url, error)

    # ------------------------------------------------------------------------------------------- 5. webhooks
    def deliver_webhooks(self, *, now: datetime) -> int:
        """Deliver due webhooks for at most WEBHOOK_BUDGET seconds: a slow receiver delays them, not dispatching.
        Each delivery is claimed first, so two dispatchers (one that lost its lease) never post it twice at once."""
        started = time.monotonic()
        delivered = 0
        for task in list(Task.objects.webhooks_due(now).order_by("finished_at")[:WEBHOOKS_PER_PASS]):
            if time.monotonic() - started > WEBHOOK_BUDGET:
                break
            if not task.claim_webhook(now=now, hold=WEBHOOK_CLAIM):
                continue
            body = json.dumps(task_document(task, base_url=settings.SD_BALANCER_URL)).encode()
            webhooks.deliver(
                task, body, secret=settings.SD_WEBHOOK_SECRET, allow_private=settings.SD_WEBHOOK_ALLOW_PRIVATE,
                now=now, session=self.webhook_session,
            )  # fmt: skip
            delivered += 1
        return delivered


def users_in_turn(tasks: Iterable[Task]) -> Iterator[Task]:
    """Queued tasks in fair order: each user's oldest first, then each user's second, ... (users by their oldest)."""
    by_user: dict[str, list[Task]] = {}
    for task in tasks:
        by_user.setdefault(task.user, []).append(task)
    for round_ in zip_longest(*by_user.values()):
        yield from (task for task in round_ if task is not None)


def _lost_by_restart(job: Mapping[str, Any]) -> bool:
    """A node that restarted fails the jobs it was running with a 503 and says so; those deserve another node."""
    return job.get("errorStatus") == 503 or "restarted" in str(job.get("error") or "")


def _fraction(value: Any) -> float:
    try:
        return min(1.0, max(0.0, float(value)))
    except (TypeError, ValueError):
        return 0.0


# --------------------------------------------------------------------------------------- the in-process thread

_dispatcher: Dispatcher | None = None
_dispatcher_pid = 0
_dispatcher_lock = threading.Lock()


def ensure_dispatcher() -> Dispatcher | None:
    """Start this process's dispatcher thread once (lazily, from the first balancer request), with the health
    checker it routes by. With SD_TASK_DISPATCHER=command only `manage.py run_dispatcher` dispatches."""
    global _dispatcher, _dispatcher_pid
    if _dispatcher is not None and _dispatcher_pid == os.getpid():
        return _dispatcher
    if settings.SD_TASK_DISPATCHER != "thread":
        return None
    from balancer.health import ensure_health_checker

    with _dispatcher_lock:
        if _dispatcher is None or _dispatcher_pid != os.getpid():
            ensure_health_checker()
            dispatcher = Dispatcher()
            dispatcher.start()
            atexit.register(dispatcher.shutdown)
            _dispatcher, _dispatcher_pid = dispatcher, os.getpid()
    return _dispatcher


def ensure_balancer_threads(*, at_boot: bool = False) -> None:
    """The background work of a balancer process: the health checker and (SD_TASK_DISPATCHER=thread) the task
    dispatcher. Started by the WSGI entry point (`at_boot`: without waiting for a first health round) and,
    idempotently, by every balancer request (a server that does not load sd_multi.wsgi, a forked process)."""
    from balancer.health import ensure_health_checker

    ensure_health_checker(check_now=not at_boot)
    ensure_dispatcher()


def wake_dispatcher() -> None:
    """A new task: this process's dispatcher (if it holds the lease) sends it at once instead of at its next pass."""
    dispatcher = ensure_dispatcher()
    if dispatcher is not None:
        dispatcher.wake()
