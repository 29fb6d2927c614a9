"""The node's generation endpoints: blocking A1111 txt2img/img2img, per-user progress/interrupt/skip, the job API
the balancer uses, health and metrics. Views parse, make one call, and serialize."""

from __future__ import annotations

import hmac
import logging
import select
import socket
import time
from collections.abc import Mapping
from typing import Any

import psutil
import torch
from django.conf import settings
from django.http import HttpResponse
from drf_spectacular.utils import extend_schema
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from rest_framework import status
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from gpu_node import metrics
from gpu_node.errors import JobFailedError
from gpu_node.identity import NodeAPIView, UserIdentity, current_user
from gpu_node.models import Job, JobKind, JobStatus
from gpu_node.options import effective_options
from gpu_node.queue import enqueue, queue_position
from gpu_node.runtime import BOOT_ID, get_engine, get_worker
from gpu_node.serializers import (
    Img2ImgRequestSerializer,
    Txt2ImgRequestSerializer,
    build_generation_request,
    request_body,
)
from gpu_node.worker import LiveJob, a1111_response

log = logging.getLogger(__name__)

GENERATION_APIS = {"/sdapi/v1/txt2img": JobKind.TXT2IMG, "/sdapi/v1/img2img": JobKind.IMG2IMG}


# ------------------------------------------------------------------------------------------------ submitting


def submit(user: str, kind: JobKind, payload: Any, *, detached: bool, job_id: str | None = None) -> Job:
    """Validate `payload` against the user's options (422 on bad input), queue it, and wake the worker."""
    body: Mapping[str, Any] = payload if isinstance(payload, Mapping) else {}
    options = effective_options(user, body.get("override_settings"))
    request = build_generation_request(kind, body, options)
    job = enqueue(
        user=user, kind=kind, payload=body, options=options, request=request, detached=detached, job_id=job_id
    )
    get_worker().wake()
    return job


def wait_until_finished(job: Job, request: Request) -> Job:
    """Block like A1111 until the job is done. A caller that goes away gets its job interrupted, so no orphaned
    work keeps the GPU busy (detached jobs, the balancer's async tasks, are never interrupted this way)."""
    worker = get_worker()
    interrupted = False
    while True:
        mark = worker.finished_count()
        job.refresh_from_db()
        if job.is_finished:
            return job
        worker.wait_finished(mark, timeout=0.5)
        if not interrupted and not job.detached and _client_gone(request):
            log.info("job %s: the client of user %s disconnected; interrupting", job.id, job.user)
            worker.interrupt_job(str(job.id))
            interrupted = True


def _client_gone(request: Request) -> bool:
    """True when the HTTP client closed its connection (gunicorn exposes the socket; other servers: never)."""
    sock = request._request.META.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


# --------------------------------------------------------------------------------------------- A1111 views


class GenerationView(NodeAPIView):
    """POST /sdapi/v1/txt2img and /img2img (and the /txt2img_v2/ aliases): blocking, like A1111."""

    kind = JobKind.TXT2IMG

    def post(self, request: Request) -> Response:
        user = current_user(request)
        job = wait_until_finished(submit(user.name, self.kind, request_body(request), detached=False), request)
        if job.status == JobStatus.FAILED:
            raise JobFailedError(status_code=job.error_status or 500, detail=job.error)
        return Response(a1111_response(job))


@extend_schema(request=Txt2ImgRequestSerializer, responses=dict[str, Any], summary="txt2img (blocking, like A1111)")
class Txt2ImgView(GenerationView):
    kind = JobKind.TXT2IMG


@extend_schema(request=Img2ImgRequestSerializer, responses=dict[str, Any], summary="img2img (blocking, like A1111)")
class Img2ImgView(GenerationView):
    kind = JobKind.IMG2IMG


class ProgressView(NodeAPIView):
    """GET /sdapi/v1/progress: the caller's running (or oldest queued) job, in A1111's shape."""

    @extend_schema(responses=dict[str, Any])
    def get(self, request: Request) -> Response:
        user = current_user(request)
        skip_image = str(request.query_params.get("skip_current_image", "false")).lower() in ("true", "1", "yes")
        job_id = request.query_params.get("id")
        return Response(progress_document(user, job_id=job_id, include_image=not skip_image))


class InterruptView(NodeAPIView):
    @extend_schema(request=None, responses=dict[str, Any])
    def post(self, request: Request) -> Response:
        get_worker().interrupt_user(current_user(request).name)
        return Response({})


class SkipView(NodeAPIView):
    @extend_schema(request=None, responses=None)
    def post(self, request: Request) -> Response:
        get_worker().skip_user(current_user(request).name)
        return Response(None)


def progress_document(user: UserIdentity, *, job_id: str | None, include_image: bool) -> dict[str, Any]:
    worker = get_worker()
    if job_id:
        job = Job.objects.filter(id=job_id, user=user.name).first()
        if job is None:
            raise NotFound()
        live = worker.live(str(job.id))
    else:
        lives = worker.live_for_user(user.name)
        live = lives[0] if lives else None
        job = Job.objects.filter(id=live.job_id).first() if live else None
        if job is None:
            job = Job.objects.queued().for_user(user.name).in_queue_order().first()
    if live is not None and job is not None:
        return _running_progress(live, job, include_image)
    if job is not None and job.status == JobStatus.QUEUED:
        return _queued_progress(job, worker.last_served)
    return _idle_progress()


def _state(**values: Any) -> dict[str, Any]:
    state = {
        "skipped": False,
        "interrupted": False,
        "stopping_generation": False,
        "job": "",
        "job_count": 0,
        "job_timestamp": "0",
        "job_no": 0,
        "sampling_step": 0,
        "sampling_steps": 0,
    }
    state.update(values)
    return state


def _idle_progress() -> dict[str, Any]:
    return {"progress": 0.0, "eta_relative": 0.0, "state": _state(), "current_image": None, "textinfo": None}


def _queued_progress(job: Job, last_served: Mapping[str, Any]) -> dict[str, Any]:
    place = queue_position(job, last_served)
    text = f"In queue: {place.position}/{place.total}" if place else "In queue"
    count = int(job.payload.get("n_iter") or 1) if isinstance(job.payload, dict) else 1
    return {
        "progress": 0.0,
        "eta_relative": 0.0,
        "state": _state(job="queued", job_count=count, job_timestamp=job.created_at.strftime("%Y%m%d%H%M%S")),
        "current_image": None,
        "textinfo": text,
        "queue_position": place.position if place else None,
    }


def _running_progress(live: LiveJob, job: Job, include_image: bool) -> dict[str, Any]:
    step = live.progress
    batch_count = step.batch_count if step else live.batch_count
    progress = min(1.0, 0.01 + (step.fraction if step else 0.0))
    elapsed = time.monotonic() - live.started
    batch_no = step.batch_index if step else 0
    job_name = f"Batch {batch_no + 1} out of {batch_count}" if batch_count > 1 else f"scripts_{job.kind}"
    state = _state(
        skipped=live.control.skipped.is_set(),
        interrupted=live.control.interrupted.is_set(),
        job=job_name,
        job_count=batch_count,
        job_timestamp=live.timestamp,
        job_no=batch_no,
        sampling_step=step.step if step else 0,
        sampling_steps=step.total_steps if step else 0,
    )
    return {
        "progress": progress,
        "eta_relative": max(0.0, elapsed / progress - elapsed),
        "state": state,
        "current_image": live.preview_png if include_image else None,
        "textinfo": None,
    }


# --------------------------------------------------------------------------------------- the balancer's API


class NodeSecretMixin:
    """The node-internal job API requires the shared secret (header X-SD-Node-Secret) when one is set."""

    def check_node_secret(self, request: Request) -> None:
        secret = settings.SD_NODE_SECRET
        given = request.headers.get("X-SD-Node-Secret", "")
        if secret and not hmac.compare_digest(secret.encode(), given.encode()):
            raise PermissionDenied("a valid X-SD-Node-Secret header is required")


class NodeJobsView(NodeSecretMixin, NodeAPIView):
    """POST /node/jobs {"id", "api", "payload", "user"}: queue a detached job, idempotent by id -> 202."""

    @extend_schema(request=dict[str, Any], responses=dict[str, Any])
    def post(self, request: Request) -> Response:
        self.check_node_secret(request)
        body = request_body(request)
        kind = GENERATION_APIS.get(str(body.get("api", "")))
        if kind is None:
            raise ValidationError({"api": [f"must be one of {', '.join(GENERATION_APIS)}"]})
        user = str(body.get("user") or current_user(request).name)
        job = submit(user, kind, body.get("payload") or {}, detached=True, job_id=str(body.get("id") or "") or None)
        return Response(job_document(job), status=status.HTTP_202_ACCEPTED)


class NodeJobView(NodeSecretMixin, NodeAPIView):
    """GET /node/jobs/<id>: status, progress, queue position, and the A1111 response when finished."""

    @extend_schema(responses=dict[str, Any])
    def get(self, request: Request, job_id: str) -> Response:
        self.check_node_secret(request)
        return Response(job_document(_job_or_404(job_id)))


class NodeJobCancelView(NodeSecretMixin, NodeAPIView):
    @extend_schema(request=None, responses=dict[str, Any])
    def post(self, request: Request, job_id: str) -> Response:
        self.check_node_secret(request)
        job = _job_or_404(job_id)
        get_worker().interrupt_job(str(job.id))
        job.refresh_from_db()
        return Response(job_document(job))


def _job_or_404(job_id: str) -> Job:
    try:
        job = Job.objects.filter(id=job_id).first()
    except Exception as error:  # a malformed UUID
        raise NotFound() from error
    if job is None:
        raise NotFound()
    return job


def job_document(job: Job) -> dict[str, Any]:
    worker = get_worker()
    live = worker.live(str(job.id))
    place = queue_position(job, worker.last_served)
    progress = job.progress
    step = live.progress if live is not None else None
    if step is not None:
        progress = step.fraction
    document: dict[str, Any] = {
        "id": str(job.id),
        "user": job.user,
        "kind": job.kind,
        "status": job.status,
        "progress": progress,
        "queuePosition": place.position if place else None,
        "error": job.error or None,
        "errorStatus": job.error_status,
        "createdAt": job.created_at.isoformat(),
        "startedAt": job.started_at.isoformat() if job.started_at else None,
        "finishedAt": job.finished_at.isoformat() if job.finished_at else None,
        "node": settings.SD_NODE_ID,
        "step": step.step if step else 0,
        "steps": step.total_steps if step else 0,
        "batch": step.batch_index if step else 0,
        "batches": step.batch_count if step else 0,
        "preview": live.preview_png if live is not None else None,
        "result": None,
    }
    if job.status in (JobStatus.SUCCEEDED, JobStatus.INTERRUPTED):
        document["result"] = a1111_response(job)
    return document


# ------------------------------------------------------------------------------------------ health, metrics


class HealthView(APIView):
    """GET /node/health: always 200 while the process answers; `status` tells ready, busy, starting, unhealthy."""

    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []

    @extend_schema(responses=dict[str, Any])
    def get(self, request: Request) -> Response:
        return Response(health_document())


def health_document() -> dict[str, Any]:
    worker = get_worker()
    alive = worker.thread is not None and worker.thread.is_alive()
    running = list(Job.objects.running().values_list("id", flat=True))
    queued = Job.objects.queued()
    if not worker.started:
        state = "starting"
    elif not alive:
        state = "unhealthy"
    elif running:
        state = "busy"
    else:
        state = "ready"
    engine = get_engine()
    return {
        "status": state,
        "node_id": settings.SD_NODE_ID,
        "boot_id": BOOT_ID,
        "version": settings.SD_VERSION,
        "devices": _devices(),
        "queue_depth": queued.count(),
        "users_queued": queued.values("user").distinct().count(),
        "running_job": str(running[0]) if running else None,
        "running_jobs": [str(job_id) for job_id in running],
        "loaded_models": [model.title for model in engine.pool.resident()],
        "models": [info.title for info in engine.registry.checkpoints()],
        "capacity": settings.SD_MAX_BATCH,
        "max_queue": settings.SD_MAX_QUEUE,
    }


def _devices() -> list[dict[str, Any]]:
    if torch.cuda.is_available():
        devices = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            devices.append(
                {
                    "type": "cuda",
                    "index": index,
                    "name": torch.cuda.get_device_name(index),
                    "free_memory": free,
                    "total_memory": total,
                }
            )
        return devices
    memory = psutil.virtual_memory()
    return [{"type": "cpu", "index": 0, "name": "cpu", "free_memory": memory.available, "total_memory": memory.total}]


class MetricsView(APIView):
    authentication_classes: list[Any] = []
    permission_classes: list[Any] = []

    @extend_schema(exclude=True)
    def get(self, request: Request) -> HttpResponse:
        pool = get_engine().pool
        metrics.LOADED_MODELS.set(len(pool.resident()))
        metrics.POOL_EVICTIONS.set(pool.evictions)
        metrics.POOL_LOADS.set(pool.loads)
        metrics.QUEUE_DEPTH.set(Job.objects.queued().count())
        return HttpResponse(generate_latest(), content_type=CONTENT_TYPE_LATEST)
