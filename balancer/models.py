"""The balancer's records: the GPU nodes it knows, the async tasks it owes results for, and the dispatcher lease."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta

from django.db import models
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


class Task(models.Model):
    """An async generation task (`POST /task`). Dispatched to a node as a node job with the same id (so a second
    dispatch of the same task can never run twice there), leased while it runs, re-queued when its node dies."""

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

    def claim_for(self, node_url: str, *, lease: timedelta) -> bool:
        """QUEUED -> RUNNING on `node_url`, atomically; counts an attempt."""
        now = timezone.now()
        claimed = Task.objects.filter(id=self.id, status=TaskStatus.QUEUED).update(
            status=TaskStatus.RUNNING, node_url=node_url, lease_until=now + lease, attempts=models.F("attempts") + 1,
            started_at=now,
        )
        if claimed:
            self.refresh_from_db()
        return claimed == 1


class DispatcherLease(models.Model):
    """Which balancer process runs the task dispatcher (and health checker) now: one per cluster."""

    name = models.CharField(max_length=64, primary_key=True)
    owner = models.CharField(max_length=128)
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} held by {self.owner} until {self.expires_at:%H:%M:%S}"
