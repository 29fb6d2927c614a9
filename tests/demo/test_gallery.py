"""The /multi_demo/ server side in process (no browser): the gallery API (pages, newest first, owners only, the staff
view), its images, and token mode (login page, the page's session with its CSRF token)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from django.utils import timezone

from balancer import task_views
from balancer.models import Task, TaskStatus

pytestmark = pytest.mark.django_db

GALLERY = "/multi_demo/api/gallery"
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32  # served as stored: the bytes need not decode


ALICE = {"X-User-Id": "alice"}


def finished_task(
    user: str,
    *,
    prompt: str = "a lighthouse",
    status: TaskStatus = TaskStatus.SUCCEEDED,
    images: int = 1,
    age_s: int = 0,
    store: bool = False,
) -> Task:
    """A task as the dispatcher leaves it: the node's A1111 info and image names under tasks/<id>/."""
    seeds = [1000 + index for index in range(images)]
    info = {
        "prompt": prompt, "negative_prompt": "blurry", "all_seeds": seeds, "sd_model_name": "tiny-sd1",
        "sampler_name": "Euler a", "steps": 3, "cfg_scale": 7.0, "width": 64, "height": 64, "index_of_first_image": 0,
        "infotexts": [f"{prompt}\nSteps: 3, Seed: {seed}" for seed in seeds],
    }  # fmt: skip
    created = timezone.now() - timedelta(seconds=age_s)
    task = Task.objects.create(
        user=user, api="/sdapi/v1/txt2img", payload={"prompt": prompt}, status=status, created_at=created,
        finished_at=created, result={"parameters": {}, "info": json.dumps(info), "node": "node-1"} if images else None,
    )  # fmt: skip
    names = [f"tasks/{task.id}/{index}.png" for index in range(images)]
    if store:
        names = [default_storage.save(name, ContentFile(PNG)) for name in names]
    task.image_names = names
    task.save(update_fields=["image_names"])
    return task


@pytest.fixture
def media(settings: Any, tmp_path: Path) -> Path:
    settings.MEDIA_ROOT = str(tmp_path)
    return tmp_path


@pytest.fixture
def staff() -> User:
    return User.objects.create_user("staff", password="staff-password", is_staff=True)


@pytest.fixture
def token_mode(settings: Any) -> Iterator[None]:
    settings.SD_AUTH = "token"
    yield


# ----------------------------------------------------------------------------------------------------- gallery


def test_it_pages_the_users_finished_images_newest_first(client: Client) -> None:
    for age in range(14):
        finished_task("alice", prompt=f"picture {age}", age_s=age)
    finished_task("alice", status=TaskStatus.FAILED, images=0)
    finished_task("alice", status=TaskStatus.INTERRUPTED, images=0)
    finished_task("alice", prompt="cut short", status=TaskStatus.INTERRUPTED, age_s=100)
    finished_task("bob", prompt="bob's")

    first = client.get(GALLERY, headers=ALICE).json()
    assert (first["page"], first["pages"], first["count"], first["scope"]) == (1, 2, 15, "mine")
    assert [item["prompt"] for item in first["items"]] == [f"picture {age}" for age in range(12)]
    second = client.get(GALLERY, {"page": 2}, headers=ALICE).json()
    assert [item["prompt"] for item in second["items"]] == ["picture 12", "picture 13", "cut short"]
    assert client.get(GALLERY, {"page": 3}, headers=ALICE).json()["items"] == []


def test_it_gives_each_image_its_seed_infotext_and_url(client: Client) -> None:
    task = finished_task("alice", images=2)
    item = client.get(GALLERY, headers=ALICE).json()["items"][0]
    assert item["taskId"] == str(task.id)
    assert (item["model"], item["sampler"], item["steps"], item["width"], item["node"]) == (
        "tiny-sd1", "Euler a", 3, 64, "node-1"
    )  # fmt: skip
    assert item["images"] == [
        {
            "url": f"/multi_demo/api/images/{task.id}/{index}.png",
            "seed": seed,
            "infotext": f"a lighthouse\nSteps: 3, Seed: {seed}",
        }
        for index, seed in enumerate((1000, 1001))
    ]


def test_it_refuses_a_page_that_is_not_a_positive_integer(client: Client) -> None:
    for page in ("x", "0", "-1"):
        response = client.get(GALLERY, {"page": page}, headers=ALICE)
        assert response.status_code == 422
        assert response.json()["detail"][0]["loc"] == ["query", "page"]


def test_it_shows_everyone_to_staff_only(client: Client, staff: User) -> None:
    finished_task("alice", prompt="alice's")
    finished_task("bob", prompt="bob's")
    refused = client.get(GALLERY, {"scope": "all"}, headers=ALICE)
    assert refused.status_code == 403
    assert refused.json()["detail"] == "the everyone view of the gallery is for staff users"

    client.force_login(staff)
    everyone = client.get(GALLERY, {"scope": "all"}).json()
    assert {item["user"] for item in everyone["items"]} == {"alice", "bob"}
    assert client.get(GALLERY).json()["items"] == []  # staff's own gallery


def test_it_serves_an_image_to_its_owner_and_staff_only(client: Client, media: Path, staff: User) -> None:
    task = finished_task("alice", store=True)
    url = f"/multi_demo/api/images/{task.id}/0.png"
    response = client.get(url, headers=ALICE)
    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert b"".join(response.streaming_content) == PNG  # type: ignore[attr-defined]
    assert client.get(url, headers={"X-User-Id": "bob"}).status_code == 404
    assert client.get(f"/multi_demo/api/images/{task.id}/../../db.sqlite3", headers=ALICE).status_code == 404
    assert client.get(f"/multi_demo/api/images/{uuid.uuid4()}/0.png", headers=ALICE).status_code == 404
    client.force_login(staff)
    assert client.get(url).status_code == 200


# -------------------------------------------------------------------------------------------------- token mode


@pytest.mark.usefixtures("token_mode")
def test_it_sends_anonymous_visitors_to_the_login_page_in_token_mode(client: Client) -> None:
    response = client.get("/multi_demo/")
    assert response.status_code == 302
    assert response["Location"] == "/multi_demo/login/?next=/multi_demo/"
    assert client.get("/multi_demo/login/").status_code == 200
    assert client.get(GALLERY, headers=ALICE).status_code == 401  # X-User-Id means nothing in token mode


@pytest.mark.usefixtures("token_mode")
def test_it_logs_in_and_out_with_the_login_page(client: Client) -> None:
    User.objects.create_user("alice", password="alice-password")
    refused = client.post("/multi_demo/login/", {"username": "alice", "password": "wrong"})
    assert "did not match" in refused.content.decode()
    response = client.post("/multi_demo/login/", {"username": "alice", "password": "alice-password"})
    assert response["Location"] == "/multi_demo/"
    page = client.get("/multi_demo/")
    assert page.status_code == 200
    config = json.loads(page.content.decode().split('id="demo-config" type="application/json">', 1)[1].split("<", 1)[0])
    assert (config["auth"], config["user"], config["isStaff"]) == ("token", "alice", False)
    assert client.post("/multi_demo/logout/")["Location"] == "/multi_demo/"
    assert client.get("/multi_demo/").status_code == 302


@pytest.mark.usefixtures("token_mode")
def test_it_takes_the_pages_session_with_its_csrf_token(monkeypatch: pytest.MonkeyPatch) -> None:
    # No dispatcher thread in the test process: the task only has to be recorded for its user.
    monkeypatch.setattr(task_views, "ensure_dispatcher", lambda: None)
    monkeypatch.setattr(task_views, "wake_dispatcher", lambda: None)
    client = Client(enforce_csrf_checks=True)
    client.force_login(User.objects.create_user("alice", password="alice-password"))
    page = client.get("/multi_demo/")
    token = json.loads(page.content.decode().split('type="application/json">', 1)[1].split("<", 1)[0])["csrfToken"]
    body: dict[str, Any] = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "a lighthouse"}}

    forged = client.post("/task", body, content_type="application/json")
    assert forged.status_code == 403
    assert "CSRF" in forged.json()["detail"]
    accepted = client.post("/task", body, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 202
    assert Task.objects.get(id=accepted.json()["taskId"]).user == "alice"
    assert client.get(GALLERY).status_code == 200
