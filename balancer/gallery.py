"""The /multi_demo/ gallery: a user's finished tasks that have images, newest first, a page at a time, with the
parameters they were made with; and their images, served to their owner (or to staff)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from balancer.models import Task, TaskQuerySet, TaskStatus
from balancer.tasks import TaskImage, TaskNotFound, open_image

PAGE_SIZE = 12
"""Tasks per gallery page (a task holds 1 to SD_MAX_BATCH images)."""

SHOWN_STATUSES = (TaskStatus.SUCCEEDED, TaskStatus.INTERRUPTED)
"""An interrupted task keeps the partial images its node returned; a failed one has none."""

ImageURL = Callable[[Task, str], str]


@dataclass(frozen=True, kw_only=True)
class GalleryImage:
    url: str
    seed: int | None
    infotext: str


@dataclass(frozen=True, kw_only=True)
class GalleryEntry:
    """One finished task with the parameters its images were made with (from the node's A1111 `info`)."""

    task_id: str
    user: str
    status: str
    created_at: datetime
    finished_at: datetime | None
    node: str
    prompt: str
    negative_prompt: str
    model: str
    sampler: str
    steps: int | None
    cfg_scale: float | None
    width: int | None
    height: int | None
    images: tuple[GalleryImage, ...]


@dataclass(frozen=True, kw_only=True)
class GalleryPage:
    number: int
    pages: int
    count: int
    entries: tuple[GalleryEntry, ...]


class GalleryPageError(ValueError):
    """A page number that is not a positive integer."""


def gallery_tasks(user: str | None) -> TaskQuerySet:
    """The tasks a gallery shows, newest first: `user`'s own, or everyone's when `user` is None (staff)."""
    tasks = Task.objects.filter(status__in=SHOWN_STATUSES).exclude(image_names=[])
    if user is not None:
        tasks = tasks.for_user(user)
    return tasks.order_by("-created_at", "-id")


def page_number(value: str | None) -> int:
    if value in (None, ""):
        return 1
    try:
        number = int(str(value))
    except ValueError:
        raise GalleryPageError(f"page must be a positive integer, not {value!r}") from None
    if number < 1:
        raise GalleryPageError(f"page must be a positive integer, not {number}")
    return number


def gallery_page(*, user: str | None, number: int, image_url: ImageURL, page_size: int = PAGE_SIZE) -> GalleryPage:
    """One page of the gallery of `user` (None: everyone). A page past the last one is empty, not an error: the
    gallery may shrink between two clicks."""
    tasks = gallery_tasks(user)
    count = tasks.count()
    start = (number - 1) * page_size
    entries = tuple(gallery_entry(task, image_url=image_url) for task in tasks[start : start + page_size])
    return GalleryPage(number=number, pages=max(1, -(-count // page_size)), count=count, entries=entries)


def gallery_entry(task: Task, *, image_url: ImageURL) -> GalleryEntry:
    result = task.result or {}
    info = _info(result.get("info"))
    seeds = _list(info.get("all_seeds"))
    infotexts = _list(info.get("infotexts"))
    first_image = _int(info.get("index_of_first_image")) or 0
    images = tuple(
        GalleryImage(
            url=image_url(task, name.rsplit("/", 1)[-1]),
            seed=_int(_at(seeds, index - first_image)),
            infotext=str(_at(infotexts, index) or ""),
        )
        for index, name in enumerate(task.image_names)
    )
    return GalleryEntry(
        task_id=str(task.id),
        user=task.user,
        status=task.status,
        created_at=task.created_at,
        finished_at=task.finished_at,
        node=str(result.get("node") or ""),
        prompt=str(info.get("prompt") or ""),
        negative_prompt=str(info.get("negative_prompt") or ""),
        model=str(info.get("sd_model_name") or task.model_title or ""),
        sampler=str(info.get("sampler_name") or ""),
        steps=_int(info.get("steps")),
        cfg_scale=_float(info.get("cfg_scale")),
        width=_int(info.get("width")),
        height=_int(info.get("height")),
        images=images,
    )


def image_for_viewer(task_id: uuid.UUID, name: str, *, user: str, is_staff: bool) -> TaskImage:
    """A result image for its task's owner, or for staff (the everyone view); anyone else gets TaskNotFound."""
    tasks = Task.objects.filter(id=task_id)
    task = (tasks if is_staff else tasks.for_user(user)).first()
    if task is None:
        raise TaskNotFound(task_id)
    return open_image(task, name)


def _info(value: Any) -> dict[str, Any]:
    """The node's `info` (a JSON string, as A1111 returns it); an unreadable one shows no parameters."""
    try:
        info = json.loads(value) if isinstance(value, str) else value
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _at(values: Sequence[Any], index: int) -> Any:
    return values[index] if 0 <= index < len(values) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
