"""The node's records: generation jobs (the queue lives in the database so queued work survives a restart) and
each user's A1111 options."""

from __future__ import annotations

import uuid
from typing import Any

from django.db import models
from django.db.models import Q
from django.utils import timezone


class JobStatus(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @classmethod
    def finished(cls) -> tuple[JobStatus, ...]:
        return (cls.SUCCEEDED, cls.FAILED, cls.INTERRUPTED)


class JobKind(models.TextChoices):
    TXT2IMG = "txt2img"
    IMG2IMG = "img2img"


class JobQuerySet(models.QuerySet["Job"]):
    def queued(self) -> JobQuerySet:
        return self.filter(status=JobStatus.QUEUED)

    def running(self) -> JobQuerySet:
        return self.filter(status=JobStatus.RUNNING)

    def active(self) -> JobQuerySet:
        return self.filter(status__in=(JobStatus.QUEUED, JobStatus.RUNNING))

    def for_user(self, user: str) -> JobQuerySet:
        return self.filter(user=user)

    def in_queue_order(self) -> JobQuerySet:
        return self.order_by("created_at", "id")

    def expired(self, before: Any) -> JobQuerySet:
        return self.filter(Q(status__in=JobStatus.finished()) & Q(finished_at__lt=before))


class Job(models.Model):
    """One txt2img/img2img request. `payload` is the request as the client sent it (A1111 fields), `options` the
    user's effective A1111 options when it was queued (its model among them), `result` the A1111 response
    without images, which are files under MEDIA_ROOT (`image_files`).

    `detached` jobs (async tasks from the balancer) keep running when nobody waits for them; a blocking
    A1111 call whose client went away is interrupted instead.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    user = models.CharField(max_length=150, db_index=True)
    kind = models.CharField(max_length=16, choices=JobKind.choices)
    payload = models.JSONField()
    options = models.JSONField(default=dict, blank=True)
    batch_signature = models.CharField(max_length=200, blank=True, default="")
    image_count = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED, db_index=True)
    detached = models.BooleanField(default=False)
    progress = models.FloatField(default=0.0)
    error = models.TextField(blank=True, default="")
    error_status = models.PositiveSmallIntegerField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    image_files = models.JSONField(default=list, blank=True)
    model_title = models.CharField(max_length=300, blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} {self.id} ({self.user}, {self.status})"

    # ------------------------------------------------------------------------------------------ transitions
    def claim(self) -> bool:
        """QUEUED -> RUNNING, atomically: False when another worker (or a cancel) got there first."""
        now = timezone.now()
        claimed = Job.objects.filter(id=self.id, status=JobStatus.QUEUED).update(
            status=JobStatus.RUNNING, started_at=now
        )
        if claimed:
            self.status, self.started_at = JobStatus.RUNNING, now
        return claimed == 1

    def set_succeeded(self, *, result: dict[str, Any], image_files: list[str], interrupted: bool = False) -> None:
        self.status = JobStatus.INTERRUPTED if interrupted else JobStatus.SUCCEEDED
        self.result, self.image_files, self.progress = result, image_files, 1.0
        self.finished_at = timezone.now()
        self.save(update_fields=["status", "result", "image_files", "progress", "finished_at"])

    def set_failed(self, error: str, *, http_status: int = 500) -> None:
        self.status, self.error, self.error_status = JobStatus.FAILED, error, http_status
        self.finished_at = timezone.now()
        self.save(update_fields=["status", "error", "error_status", "finished_at"])

    def cancel_if_queued(self) -> bool:
        """A queued job that is cancelled never runs; it finishes as interrupted with no images."""
        now = timezone.now()
        done = Job.objects.filter(id=self.id, status=JobStatus.QUEUED).update(
            status=JobStatus.INTERRUPTED, finished_at=now, result={"images": [], "parameters": {}, "info": "{}"}
        )
        return done == 1

    @property
    def is_finished(self) -> bool:
        return self.status in JobStatus.finished()


class UserOptions(models.Model):
    """A user's A1111 options that differ from the node's defaults (`POST /sdapi/v1/options`)."""

    user = models.CharField(max_length=150, primary_key=True)
    values = models.JSONField(default=dict)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"options of {self.user}"
