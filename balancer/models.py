"""The balancer's records: the GPU nodes it knows, the async tasks it owes results for, and the dispatcher lease."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from django.db import IntegrityError, models, transaction
from django.db.models import Q
from django.utils import timezone


class NodeSource(models.TextChoices):
    STATIC = "static"  # listed in SD_NODES
    REGISTERED = "registered"  # announced itself with SD_BALANCER_URL


class Node(models.Model):
    """A GPU node. Health (up/down, load, models) lives in the cache, shared by balancer processes; the row holds
    what an operator edits in the admin: draining, removal."""

    url = models.URLField(unique=True)
    name = models.CharField(max_length=150, blank=True, default="")
    source = models.CharField(max_length=16, choices=NodeSource.choices, default=NodeSource.STATIC)
    draining = models.BooleanField(default=False, help_text="A draining node gets no new pins.")
    last_heartbeat = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["url"]

    def __str__(self) -> str:
        return self.name or self.url

    def drain(self) -> None:
        self.draining = True
        self.save(update_fields=["draining"])

    def undrain(self) -> None:
        self.draining = False
        self.save(update_fields=["draining"])


class TaskStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @classmethod
    def terminal(cls) -> tuple[TaskStatus, ...]:
        return (cls.SUCCEEDED, cls.FAILED, cls.INTERRUPTED)


class TaskApi(models.TextChoices):
    TXT2IMG = "/sdapi/v1/txt2img"
    IMG2IMG = "/sdapi/v1/img2img"


class WebhookStatus(models.TextChoices):
    NONE = "none"
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class TaskQuerySet(models.QuerySet["Task"]):
    def for_user(self, user: str) -> TaskQuerySet:
        return self.filter(user=user)

    def queued(self) -> TaskQuerySet:
        return self.filter(status=TaskStatus.QUEUED)

    def running(self) -> TaskQuerySet:
        return self.filter(status=TaskStatus.RUNNING)

    def lease_expired(self, now: datetime) -> TaskQuerySet:
        return self.filter(status=TaskStatus.RUNNING, lease_until__lt=now)

    def webhooks_due(self, now: datetime) -> TaskQuerySet:
        return self.filter(webhook_status=WebhookStatus.PENDING).filter(
            Q(webhook_next_at__isnull=True) | Q(webhook_next_at__lte=now)
        )

    def in_queue_order(self) -> TaskQuerySet:
        return self.order_by("created_at", "id")

    def on_node(self, node_url: str) -> TaskQuerySet:
        return self.filter(node_url=node_url)

    def unfinished(self) -> TaskQuerySet:
        return self.filter(status__in=(TaskStatus.QUEUED, TaskStatus.RUNNING))

    def expired(self, cutoff: datetime) -> TaskQuerySet:
        """Finished before `cutoff`, with no webhook delivery still owed."""
        return self.filter(status__in=TaskStatus.terminal(), finished_at__lt=cutoff).exclude(
            webhook_status=WebhookStatus.PENDING
        )


class Task(models.Model):
    """An async generation task (`POST /task`). Dispatched to a node as a node job with the same id (so a second
    dispatch of the same attempt can never run twice there; see `node_job_id`), leased while it runs, re-queued when
    its node dies."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.CharField(max_length=150, db_index=True)
    api = models.CharField(max_length=32, choices=TaskApi.choices)
    payload = models.JSONField()
    callback_url = models.URLField(max_length=2000, blank=True, default="")
    status = models.CharField(max_length=16, choices=TaskStatus.choices, default=TaskStatus.QUEUED, db_index=True)
    progress = models.FloatField(default=0.0)
    node_url = models.CharField(max_length=300, blank=True, default="")
    attempts = models.PositiveSmallIntegerField(default=0)
    lease_until = models.DateTimeField(null=True, blank=True)
    error = models.TextField(blank=True, default="")
    result = models.JSONField(null=True, blank=True)
    image_names = models.JSONField(default=list, blank=True)
    model_title = models.CharField(max_length=300, blank=True, default="")
    webhook_status = models.CharField(max_length=16, choices=WebhookStatus.choices, default=WebhookStatus.NONE)
    webhook_attempts = models.PositiveSmallIntegerField(default=0)
    webhook_next_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = TaskQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"task {self.id} ({self.user}, {self.status})"

    @property
    def is_terminal(self) -> bool:
        return self.status in TaskStatus.terminal()

    @property
    def node_job_id(self) -> str:
        """The id of this attempt's node job: the task's own id on the first attempt, then a UUID named after the
        task and the attempt. Resubmitting an attempt is idempotent on the node; a later attempt is a new job even
        on the same node, which may hold the earlier one as failed (a node that restarted fails what it ran)."""
        if self.attempts <= 1:
            return str(self.id)
        return str(uuid.uuid5(self.id, f"attempt-{self.attempts}"))

    def claim_for(self, node_url: str, *, lease: timedelta, now: datetime | None = None) -> bool:
        """QUEUED -> RUNNING on `node_url`, atomically; counts an attempt."""
        now = now or timezone.now()
        claimed = Task.objects.filter(id=self.id, status=TaskStatus.QUEUED).update(
            status=TaskStatus.RUNNING,
            node_url=node_url,
            lease_until=now + lease,
            attempts=models.F("attempts") + 1,
            started_at=now,
            progress=0.0,
        )
        if claimed:
            self.refresh_from_db()
        return claimed == 1

    # The transitions below are conditional on the attempt they belong to (status RUNNING with this attempt
    # count): an execution that lost its lease, or a cancel that came first, makes them a no-op returning False.
    def _this_attempt(self) -> TaskQuerySet:
        return Task.objects.filter(id=self.id, status=TaskStatus.RUNNING, attempts=self.attempts)

    def release_claim(self) -> bool:
        """RUNNING -> QUEUED when the job never reached a node (refused, node full): the attempt does not count."""
        released = self._this_attempt().update(
            status=TaskStatus.QUEUED,
            node_url="",
            lease_until=None,
            started_at=None,
            attempts=models.F("attempts") - 1,
        )
        if released:
            self.refresh_from_db()
        return released == 1

    def renew_lease(self, *, until: datetime, progress: float) -> bool:
        """The node still has the job: keep the lease and show its progress."""
        return self._this_attempt().update(lease_until=until, progress=progress) == 1

    def requeue(self, reason: str, *, max_attempts: int, now: datetime) -> TaskStatus | None:
        """Its node lost the job: back to the queue, or failed once `max_attempts` were spent. None if too late."""
        if self.attempts >= max_attempts:
            error = f"the task was lost by its node {self.attempts} time(s), the last: {reason}; giving up"
            return TaskStatus.FAILED if self.finish(TaskStatus.FAILED, now=now, error=error) else None
        requeued = self._this_attempt().update(
            status=TaskStatus.QUEUED, node_url="", lease_until=None, progress=0.0, error=reason
        )
        if requeued:
            self.refresh_from_db()
        return TaskStatus.QUEUED if requeued else None

    def finish(
        self,
        status: TaskStatus,
        *,
        now: datetime,
        result: dict[str, Any] | None = None,
        image_names: list[str] | None = None,
        error: str = "",
    ) -> bool:
        """RUNNING -> a terminal state, once: of two executions of the same task only one stores its result."""
        webhook = WebhookStatus.PENDING if self.callback_url else WebhookStatus.NONE
        finished = self._this_attempt().update(
            status=status,
            result=result,
            image_names=image_names or [],
            error=error,
            finished_at=now,
            lease_until=None,
            progress=1.0 if status == TaskStatus.SUCCEEDED else models.F("progress"),
            webhook_status=webhook,
            webhook_next_at=None,
        )
        if finished:
            self.refresh_from_db()
        return finished == 1

    def cancel(self, *, now: datetime) -> bool:
        """QUEUED or RUNNING -> INTERRUPTED at once (the node job is cancelled by the caller). False if finished."""
        webhook = WebhookStatus.PENDING if self.callback_url else WebhookStatus.NONE
        cancelled = Task.objects.filter(id=self.id, status__in=(TaskStatus.QUEUED, TaskStatus.RUNNING)).update(
            status=TaskStatus.INTERRUPTED,
            error="cancelled by its owner",
            finished_at=now,
            lease_until=None,
            webhook_status=webhook,
            webhook_next_at=None,
        )
        self.refresh_from_db()
        return cancelled == 1

    def claim_webhook(self, *, now: datetime, hold: timedelta) -> bool:
        """Take this pending delivery (pushing its due time by `hold`), atomically: False if another took it."""
        claimed = (
            Task.objects.filter(
                id=self.id, webhook_status=WebhookStatus.PENDING, webhook_attempts=self.webhook_attempts
            )
            .filter(Q(webhook_next_at__isnull=True) | Q(webhook_next_at__lte=now))
            .update(webhook_next_at=now + hold)
        )
        return claimed == 1

    def webhook_delivered(self) -> None:
        self.webhook_status, self.webhook_attempts = WebhookStatus.DELIVERED, self.webhook_attempts + 1
        self.webhook_next_at = None
        self.save(update_fields=["webhook_status", "webhook_attempts", "webhook_next_at"])

    def webhook_retry_at(self, next_at: datetime | None) -> None:
        """One more failed delivery: try again at `next_at`, or give up (FAILED) when it is None."""
        self.webhook_attempts += 1
        self.webhook_status = WebhookStatus.PENDING if next_at is not None else WebhookStatus.FAILED
        self.webhook_next_at = next_at
        self.save(update_fields=["webhook_status", "webhook_attempts", "webhook_next_at"])


class DispatcherLease(models.Model):
    """Which balancer process runs the task dispatcher (and health checker) now: one per cluster."""

    name = models.CharField(max_length=64, primary_key=True)
    owner = models.CharField(max_length=128)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner} until {self.expires_at:%H:%M:%S}"

    @classmethod
    def acquire(cls, name: str, *, owner: str, now: datetime, ttl: timedelta) -> bool:
        """Take or renew the lease `name` for `owner` until now + ttl; False while another owner holds it.

        1. Renew it, or take it over when it expired, in one conditional UPDATE.
        2. Otherwise create the row; a concurrent creator makes the insert fail, and that one holds it.
        """
        taken = cls.objects.filter(Q(name=name) & (Q(owner=owner) | Q(expires_at__lt=now))).update(
            owner=owner, expires_at=now + ttl
        )
        if taken:
            return True
        if cls.objects.filter(name=name).exists():
            return False
        try:
            with transaction.atomic():
                cls.objects.create(name=name, owner=owner, expires_at=now + ttl)
        except IntegrityError:
            return False
        return True

    @classmethod
    def release(cls, name: str, *, owner: str) -> bool:
        """Give the lease up (a clean shutdown), so another process need not wait for it to expire."""
        return cls.objects.filter(name=name, owner=owner).delete()[0] == 1
