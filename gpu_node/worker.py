"""The node's worker: one thread per device takes jobs from the fair queue, runs them on the engine (batched when
compatible), stores their images, and keeps each running job's live progress, preview and stop switches."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from PIL import Image

from gpu_node import metrics
from gpu_node.models import Job, JobStatus
from gpu_node.queue import next_batch
from gpu_node.serializers import build_generation_request, echo_parameters
from sd_core.errors import DeviceOutOfMemoryError, EngineError, InvalidInputError
from sd_core.infotext import encode_image
from sd_core.types import GenerationControl, GenerationRequest, GenerationResult, StepProgress

log = logging.getLogger(__name__)

StepCallback = Callable[[StepProgress], None]
RESTART_ERROR = "the node restarted while this job was running; submit it again"
IMAGE_SUFFIX = {"png": "png", "jpg": "jpg", "jpeg": "jpg", "webp": "webp"}


class Generator(Protocol):
    """What the worker needs of the engine (sd_core.engine.Engine; tests about routing use a named fake)."""

    def generate_batch(
        self,
        requests: list[GenerationRequest],
        *,
        controls: list[GenerationControl] | None = None,
        on_steps: list[StepCallback | None] | None = None,
    ) -> list[GenerationResult]: ...


@dataclass(eq=False)
class LiveJob:
    """In-memory state of a running job: what /progress shows and what /interrupt and /skip act on."""

    job_id: str
    user: str
    batch_count: int
    control: GenerationControl = field(default_factory=GenerationControl)
    progress: StepProgress | None = None
    preview_png: str | None = None
    started: float = field(default_factory=time.monotonic)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))

    def on_step(self, progress: StepProgress) -> None:
        self.progress = progress
        if progress.preview is not None:
            buffer = io.BytesIO()
            progress.preview.save(buffer, format="PNG")
            self.preview_png = base64.b64encode(buffer.getvalue()).decode()


class Worker:
    """Runs queued jobs one call at a time. `run()` loops until `stop()`; tests drive `process_one()` directly."""

    def __init__(self, generator: Generator | Callable[[], Generator], *, max_batch: int) -> None:
        self._generator = generator
        self.max_batch = max_batch
        self.stop_event = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._live: dict[str, LiveJob] = {}
        self._finished = threading.Condition(self._lock)
        self._finished_count = 0  # jobs that left the live set so far: waiters compare it, so no wake-up is missed
        self.last_served: dict[str, datetime] = {}
        self.thread: threading.Thread | None = None
        self.started = False
        self._last_cleanup = 0.0

    # ------------------------------------------------------------------------------------------------ lifecycle
    @property
    def generator(self) -> Generator:
        if callable(self._generator) and not hasattr(self._generator, "generate_batch"):
            self._generator = self._generator()
        return self._generator  # type: ignore[return-value]

    def start(self) -> None:
        """Recover from a previous run, then start the worker thread (idempotent)."""
        with self._lock:
            if self.thread is not None:
                return
            self.thread = threading.Thread(target=self.run, name="sd-node-worker", daemon=True)
        self.recover()
        self.thread.start()

    def recover(self) -> int:
        """A job left running by a dead process can never finish: fail it clearly. Queued jobs simply stay queued."""
        lost = Job.objects.running().update(
            status=JobStatus.FAILED, error=RESTART_ERROR, error_status=503, finished_at=timezone.now()
        )
        if lost:
            log.warning("recovery: %d job(s) were running when the node stopped; marked failed", lost)
        queued = Job.objects.queued().count()
        if queued:
            log.info("recovery: %d queued job(s) resume", queued)
        return lost

    def stop(self) -> None:
        self.stop_event.set()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def run(self) -> None:
        self.started = True
        log.info("worker started (max batch %d images)", self.max_batch)
        while not self.stop_event.is_set():
            try:
                worked = self.process_one()
            except Exception:
                log.exception("worker: unexpected error; continuing")
                worked = False
            if not worked:
                self._wake.wait(timeout=1.0)
                self._wake.clear()
            self._cleanup_expired()

    # --------------------------------------------------------------------------------------------------- a job
    def process_one(self) -> bool:
        """Claim the next job (or compatible batch) in fair order and run it. False when the queue is empty."""
        close_old_connections()
        try:
            candidates = next_batch(self.last_served, max_images=self.max_batch)
            claimed = [job for job in candidates if job.claim()]
            if not claimed:
                return bool(candidates)
            now = timezone.now()
            for job in claimed:
                self.last_served[job.user] = now
            self._run(claimed)
            return True
        finally:
            self._update_gauges()
            close_old_connections()

    def _run(self, jobs: list[Job]) -> None:
        prepared: list[tuple[Job, GenerationRequest, LiveJob]] = []
        for job in jobs:
            try:
                request = build_generation_request(job.kind, job.payload, job.options)
            except (InvalidInputError, EngineError) as error:
                self._fail(job, _message(error), 422)
                continue
            except Exception as error:  # a DRF ValidationError: the payload no longer validates (e.g. model removed)
                self._fail(job, _message(error), 422)
                continue
            live = LiveJob(job_id=str(job.id), user=job.user, batch_count=request.n_iter)
            with self._lock:
                self._live[str(job.id)] = live
            prepared.append((job, request, live))
        if not prepared:
            return
        started = time.monotonic()
        try:
            results = self.generator.generate_batch(
                [request for _, request, _ in prepared],
                controls=[live.control for _, _, live in prepared],
                on_steps=[live.on_step for _, _, live in prepared],
            )
        except Exception as error:
            if len(prepared) > 1:
                # A batch failure must not fail jobs that would run alone: retry them one by one.
                log.warning("batch of %d failed (%s); running its jobs one by one", len(prepared), error)
                for job, _, _ in prepared:
                    Job.objects.filter(id=job.id).update(status=JobStatus.QUEUED, started_at=None)
                    self._forget(str(job.id))
                for job, _, _ in prepared:
                    job.refresh_from_db()
                    if job.claim():
                        self._run([job])
                return
            job = prepared[0][0]
            self._fail_from_exception(job, error)
            self._forget(str(job.id))
            return
        duration = time.monotonic() - started
        metrics.GENERATION_SECONDS.observe(duration)
        metrics.BATCH_SIZE.observe(len(prepared))
        steps = sum(r.steps * r.image_count for _, r, _ in prepared)
        if duration > 0:
            metrics.STEPS_PER_SECOND.set(steps / duration)
        for (job, request, live), result in zip(prepared, results, strict=True):
            self._store(job, request, result, duration)
            self._forget(live.job_id)

    def _store(self, job: Job, request: GenerationRequest, result: GenerationResult, duration: float) -> None:
        image_format = str(job.options.get("samples_format", "png")).lower()
        folder = job_folder(str(job.id))
        folder.mkdir(parents=True, exist_ok=True)
        files: list[str] = []
        for index, (image, infotext) in enumerate(zip(result.images, result.infotexts, strict=True)):
            data = encode_image(image, infotext=infotext, image_format=image_format)
            path = folder / f"{index}.{IMAGE_SUFFIX.get(image_format, 'png')}"
            path.write_bytes(data)
            files.append(path.name)
        response = {"parameters": echo_parameters(job.kind, job.payload), "info": json.dumps(result.info)}
        job.set_succeeded(result=response, image_files=files, interrupted=result.interrupted)
        metrics.JOBS.labels(status=job.status).inc()
        log.info(
            "job %s done user=%s node=%s model=%s size=%dx%d steps=%d images=%d status=%s duration=%.2fs",
            job.id,
            job.user,
            settings.SD_NODE_ID,
            request.checkpoint,
            request.width,
            request.height,
            request.steps,
            len(files),
            job.status,
            duration,
        )

    def _fail_from_exception(self, job: Job, error: Exception) -> None:
        if isinstance(error, DeviceOutOfMemoryError):
            self._fail(job, str(error), 422)
        elif isinstance(error, InvalidInputError):
            self._fail(job, _message(error), 422)
        else:
            log.exception("job %s failed", job.id, exc_info=error)
            self._fail(job, f"{type(error).__name__}: {error}", 500)

    def _fail(self, job: Job, message: str, status: int) -> None:
        job.set_failed(message, http_status=status)
        metrics.JOBS.labels(status=JobStatus.FAILED).inc()
        log.info(
            "job %s failed user=%s node=%s status=%d error=%s", job.id, job.user, settings.SD_NODE_ID, status, message
        )
        self._forget(str(job.id))

    def _forget(self, job_id: str) -> None:
        with self._finished:
            self._live.pop(job_id, None)
            self._finished_count += 1
            self._finished.notify_all()

    # ------------------------------------------------------------------------------------------ live state API
    def live(self, job_id: str) -> LiveJob | None:
        with self._lock:
            return self._live.get(job_id)

    def live_for_user(self, user: str) -> list[LiveJob]:
        with self._lock:
            return [live for live in self._live.values() if live.user == user]

    def interrupt_user(self, user: str) -> int:
        """Stop the user's running job(s) at the next step; other users' jobs are never touched."""
        jobs = self.live_for_user(user)
        for live in jobs:
            live.control.interrupt()
        return len(jobs)

    def skip_user(self, user: str) -> int:
        jobs = self.live_for_user(user)
        for live in jobs:
            live.control.skip()
        return len(jobs)

    def interrupt_job(self, job_id: str) -> bool:
        live = self.live(job_id)
        if live is not None:
            live.control.interrupt()
            return True
        return Job(id=job_id).cancel_if_queued()

    def finished_count(self) -> int:
        """A mark for `wait_finished`: read it before checking a job's status in the database."""
        with self._finished:
            return self._finished_count

    def wait_finished(self, since: int, timeout: float) -> None:
        """Block until a job finished after the `since` mark (or `timeout` passes); callers then re-check the
        database. A job that finished between the mark and this call returns at once instead of being missed."""
        with self._finished:
            self._finished.wait_for(lambda: self._finished_count != since, timeout=timeout)

    # ------------------------------------------------------------------------------------------------- upkeep
    def _update_gauges(self) -> None:
        queued = Job.objects.queued()
        metrics.QUEUE_DEPTH.set(queued.count())
        metrics.USERS_QUEUED.set(queued.values("user").distinct().count())

    def _cleanup_expired(self) -> None:
        """Finished jobs are kept SD_JOB_RETENTION seconds (a restarted balancer can still collect them)."""
        if time.monotonic() - self._last_cleanup < 60:
            return
        self._last_cleanup = time.monotonic()
        cutoff = timezone.now() - timedelta(seconds=settings.SD_JOB_RETENTION)
        expired = list(Job.objects.expired(cutoff).values_list("id", flat=True)[:500])
        for job_id in expired:
            shutil.rmtree(job_folder(str(job_id)), ignore_errors=True)
        if expired:
            Job.objects.filter(id__in=expired).delete()
            log.info("removed %d finished job(s) older than %ds", len(expired), settings.SD_JOB_RETENTION)


def job_folder(job_id: str) -> Path:
    return Path(settings.MEDIA_ROOT) / "node-jobs" / job_id


def a1111_response(job: Job) -> dict[str, Any]:
    """The A1111 txt2img/img2img response of a finished job: raw base64 images, parameters, info string."""
    result: Mapping[str, Any] = job.result or {}
    send_images = bool(job.payload.get("send_images", True)) if isinstance(job.payload, dict) else True
    images = []
    if send_images:
        folder = job_folder(str(job.id))
        images = [base64.b64encode((folder / name).read_bytes()).decode() for name in job.image_files]
    return {"images": images, "parameters": result.get("parameters", {}), "info": result.get("info", "{}")}


def _message(error: Exception) -> str:
    detail = getattr(error, "detail", None)
    if detail is not None:
        return json.dumps(detail, default=str) if not isinstance(detail, str) else detail
    return str(error)


def decode_preview(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def job_ids(jobs: Sequence[Job]) -> list[str]:
    return [str(job.id) for job in jobs]
