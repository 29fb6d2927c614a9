"""The node's fair queue over Job rows: admission limits, round-robin order across users, batching eligibility."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Count, Min
from rest_framework.exceptions import ValidationError

from gpu_node.errors import QueueFullError, UserQueueFullError
from gpu_node.models import Job, JobKind, JobStatus
from sd_core.generate import batch_key
from sd_core.types import GenerationRequest

RETRY_AFTER_SECONDS = 5


@dataclass(frozen=True, kw_only=True)
class QueuePosition:
    """1-based place of a queued job in the fair order, out of all queued jobs."""

    position: int
    total: int


def batch_signature(request: GenerationRequest) -> str:
    """A stable digest of `sd_core.generate.batch_key`: equal signatures may share one batched call."""
    key = batch_key(request)
    if key is None:
        return ""
    return hashlib.sha256(repr(key).encode()).hexdigest()[:40]


def enqueue(
    *,
    user: str,
    kind: JobKind,
    payload: Mapping[str, Any],
    options: Mapping[str, Any],
    request: GenerationRequest,
    detached: bool = False,
    job_id: str | None = None,
) -> Job:
    """Add a job, enforcing SD_MAX_QUEUE (503) and SD_MAX_QUEUED_PER_USER (429).

    With `job_id` (the balancer's task id) it is idempotent: a second call returns the existing job.
    """
    key: uuid.UUID | None = None
    if job_id is not None:
        try:
            key = uuid.UUID(str(job_id))
        except ValueError as error:
            raise ValidationError({"id": ["must be a UUID"]}) from error
        existing = Job.objects.filter(id=key).first()
        if existing is not None:
            return existing
    if Job.objects.active().count() >= settings.SD_MAX_QUEUE:
        raise QueueFullError(retry_after=RETRY_AFTER_SECONDS)
    if Job.objects.active().for_user(user).count() >= settings.SD_MAX_QUEUED_PER_USER:
        raise UserQueueFullError(retry_after=RETRY_AFTER_SECONDS)
    fields: dict[str, Any] = {
        "user": user,
        "kind": kind,
        "payload": dict(payload),
        "options": dict(options),
        "batch_signature": batch_signature(request),
        "image_count": request.image_count,
        "detached": detached,
    }
    if key is None:
        return Job.objects.create(**fields)
    try:
        with transaction.atomic():
            return Job.objects.create(id=key, **fields)
    except IntegrityError:
        return Job.objects.get(id=key)


Turn = tuple[bool, datetime, datetime]
NEVER = datetime.min


def turn(served: datetime | None, head: datetime) -> Turn:
    """Sort key of a user's turn: never served first, then the least recently served, ties to the oldest head job."""
    return (served is not None, served.replace(tzinfo=None) if served else NEVER, head.replace(tzinfo=None))


def fair_order(queued: Sequence[Job], last_served: Mapping[str, datetime]) -> list[Job]:
    """The order in which queued jobs will run.

    1. Users take turns (round-robin): the user served least recently goes first, a user never served before
       first of all; ties go to the user whose oldest queued job is oldest.
    2. Within a user, jobs run first in, first out.
    So a user with 50 queued jobs delays another user's single job by at most one job (or batch).
    """
    per_user: dict[str, list[Job]] = {}
    for job in sorted(queued, key=lambda j: (j.created_at, str(j.id))):
        per_user.setdefault(job.user, []).append(job)
    users = sorted(per_user, key=lambda user: turn(last_served.get(user), per_user[user][0].created_at))
    ordered: list[Job] = []
    depth = max((len(jobs) for jobs in per_user.values()), default=0)
    for round_number in range(depth):
        ordered.extend(per_user[user][round_number] for user in users if round_number < len(per_user[user]))
    return ordered


def next_batch(last_served: Mapping[str, datetime], *, max_images: int) -> list[Job]:
    """The jobs to run next: the first job in fair order, plus queued jobs (of any user, in fair order) that share
    its batch signature, as long as the images fit in `max_images`."""
    # The payloads and options of the jobs that run are read when they are claimed, not those of the whole queue.
    ordered = fair_order(list(Job.objects.queued().defer("payload", "options")), last_served)
    if not ordered:
        return []
    lead = ordered[0]
    batch = [lead]
    if not lead.batch_signature:
        return batch
    images = lead.image_count
    for job in ordered[1:]:
        if job.batch_signature == lead.batch_signature and images + job.image_count <= max_images:
            batch.append(job)
            images += job.image_count
    return batch


def queue_position(job: Job, last_served: Mapping[str, datetime]) -> QueuePosition | None:
    """The job's place in `fair_order`, from per-user counts rather than every queued row: users poll their place
    several times a second while the worker runs, and a long queue must not make each poll read all of it.

    A job that is its user's k-th queued job (from 0) runs after k rounds: in each, every user with a job left
    that round (min(count, k) jobs per other user), then, in round k, the users whose turn comes first and who
    still have a job then.
    """
    if job.status != JobStatus.QUEUED:
        return None
    users = {
        row["user"]: row
        for row in Job.objects.queued().values("user").annotate(count=Count("id"), head=Min("created_at"))
    }
    own = users.get(job.user)
    mine = list(Job.objects.queued().for_user(job.user).values_list("created_at", "id"))
    mine.sort(key=lambda row: (row[0], str(row[1])))
    rank = next((index for index, (_, job_id) in enumerate(mine) if job_id == job.id), None)
    if own is None or rank is None:
        return None  # claimed or cancelled meanwhile
    my_turn = turn(last_served.get(job.user), own["head"])
    ahead = rank
    for user, row in users.items():
        if user == job.user:
            continue
        ahead += min(row["count"], rank)
        if row["count"] > rank and turn(last_served.get(user), row["head"]) < my_turn:
            ahead += 1
    return QueuePosition(position=ahead + 1, total=sum(row["count"] for row in users.values()))
