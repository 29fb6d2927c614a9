"""Async tasks over real HTTP: a balancer process in front of real node processes serving the tiny models, on SQLite
and on PostgreSQL. Results are real PNGs downloaded from their URLs; nodes and balancers are killed mid-way."""

from __future__ import annotations

import base64
import io
import json
import signal
from collections import Counter
from typing import Any

import pytest
import requests
from django.test import override_settings
from PIL import Image

from balancer.models import Task, TaskStatus
from balancer.tasks import TaskInputError, submit_task, task_counts
from tests.balancer import test_tasks_support as support
from tests.balancer.test_tasks_support import (
    BalancerStarter,
    as_user,
    download_image,
    get_task,
    node_load,
    stored_image_files,
    submit,
    txt2img_payload,
    wait_for_tasks,
    wait_until,
)
from tests.processes import ServerProcess

# Fixtures (pytest finds them among the module's names).
database_url = support.database_url
start_task_balancer = support.start_task_balancer

sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def png_data_url(color: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), color).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ([], "body"),
        ({"payload": {}}, "api"),
        ({"api": "/sdapi/v1/extra-single-image", "payload": {}}, "api"),
        ({"api": "/sdapi/v1/txt2img", "payload": None}, "payload"),
        ({"api": "/sdapi/v1/txt2img", "payload": {"override_settings": []}}, "payload.override_settings"),
        ({"api": "/sdapi/v1/txt2img", "payload": {"override_settings": {"sd_model_checkpoint": "x" * 301}}},
         "payload.override_settings.sd_model_checkpoint"),
        ({"api": "/sdapi/v1/txt2img", "payload": {}, "callback_url": 5}, "callback_url"),
    ],
)  # fmt: skip
def test_submit_refuses_bad_bodies_naming_the_field(body: Any, field: str):
    with pytest.raises(TaskInputError) as refused:
        submit_task(user="alice", body=body)
    assert refused.value.field == field


@pytest.mark.django_db
def test_submit_records_the_model_asked_for():
    payload = {"prompt": "x", "override_settings": {"sd_model_checkpoint": "tiny-sdxl.safetensors"}}
    task = submit_task(user="alice", body={"api": "/sdapi/v1/img2img", "payload": payload})
    assert task.model_title == "tiny-sdxl.safetensors" and task.status == "queued" and task.payload == payload
    counts = task_counts()
    assert counts.queued_by_model == {"tiny-sdxl.safetensors": 1} and counts.by_status["queued"] == 1


@pytest.mark.slow
def test_it_runs_txt2img_and_img2img_tasks_and_serves_their_images(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)
    txt = submit(balancer.url, "alice", txt2img_payload(batch_size=2, seed=7))
    img = submit(balancer.url, "alice", {"prompt": "a red square", "init_images": [png_data_url((200, 30, 30))],
                                         "denoising_strength": 0.5, "steps": 4, "width": 64, "height": 64, "seed": 3},
                 api="/sdapi/v1/img2img")  # fmt: skip
    documents = wait_for_tasks(balancer.url, "alice", [txt, img])

    for task_id, count, marker in ((txt, 2, "Steps: 2"), (img, 1, "Denoising strength: 0.5")):
        document = documents[task_id]
        assert document["status"] == "succeeded", document
        assert document["progress"] == 1.0 and document["queuePosition"] is None and document["error"] is None
        assert document["createdAt"] and document["startedAt"] and document["finishedAt"]
        assert document["node"] and document["attempts"] == 1
        info = json.loads(document["result"]["info"])
        assert len(info["infotexts"]) == count and marker in info["infotexts"][0]
        assert len(document["result"]["images"]) == count
        for index, url in enumerate(document["result"]["images"]):
            assert url.startswith(f"{balancer.url}/task/{task_id}/images/")
            image = download_image(url, "alice")
            assert image.size == (64, 64)
            assert image.info["parameters"] == info["infotexts"][index], "the PNG carries its infotext"
        assert stored_image_files(balancer, task_id) == [f"{index}.png" for index in range(count)]
    assert json.loads(documents[txt]["result"]["info"])["all_seeds"] == [7, 8]

    by_query = requests.get(f"{balancer.url}/task", params={"taskId": txt}, headers=as_user("alice"), timeout=10)
    assert by_query.status_code == 200 and by_query.json() == get_task(balancer.url, "alice", txt).json()


@pytest.mark.slow
def test_only_the_owner_sees_cancels_or_downloads_a_task(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)
    done = submit(balancer.url, "alice", txt2img_payload())
    image_url = wait_for_tasks(balancer.url, "alice", [done])[done]["result"]["images"][0]

    assert get_task(balancer.url, "bob", done).status_code == 404
    query = requests.get(f"{balancer.url}/task", params={"taskId": done}, headers=as_user("bob"), timeout=10)
    assert query.status_code == 404
    assert requests.get(image_url, headers=as_user("bob"), timeout=10).status_code == 404
    assert requests.post(f"{balancer.url}/task/{done}/cancel", headers=as_user("bob"), timeout=10).status_code == 404
    assert get_task(balancer.url, "alice", done).json()["status"] == "succeeded", "bob's cancel did nothing"
    assert requests.get(image_url.replace("/0.png", "/1.png"), headers=as_user("alice"), timeout=10).status_code == 404

    finished = requests.post(f"{balancer.url}/task/{done}/cancel", headers=as_user("alice"), timeout=10)
    assert finished.status_code == 200 and finished.json()["status"] == "succeeded", "a finished task stays finished"

    slow = submit(balancer.url, "alice", txt2img_payload(steps=40, width=256, height=256, n_iter=4))
    cancelled = requests.post(f"{balancer.url}/task/{slow}/cancel", headers=as_user("alice"), timeout=10)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "interrupted"
    document = wait_for_tasks(balancer.url, "alice", [slow])[slow]
    assert document["status"] == "interrupted" and document["result"] is None
    wait_until(lambda: sum(node_load(node) for node in two_nodes) == 0, timeout=60,
               message="the cancelled task's node job was not stopped")  # fmt: skip
    assert get_task(balancer.url, "alice", slow).json()["status"] == "interrupted"


@pytest.mark.slow
@sqlite_only
def test_it_refuses_apis_outside_the_allow_list_and_bad_bodies(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)

    def post(body: Any) -> requests.Response:
        return requests.post(f"{balancer.url}/task", json=body, headers=as_user("alice"), timeout=10)

    for api in ("/sdapi/v1/options", "/node/jobs", "/sdapi/v1/txt2img/../../admin", "http://evil/", None):
        response = post({"api": api, "payload": txt2img_payload()})
        assert response.status_code == 422, (api, response.text)
        assert "api" in json.dumps(response.json()), response.text
    assert post({"api": "/sdapi/v1/txt2img", "payload": [1, 2]}).status_code == 422
    assert "payload" in post({"api": "/sdapi/v1/txt2img", "payload": "x"}).text
    assert post(["not", "an", "object"]).status_code == 422
    assert requests.get(f"{balancer.url}/task", params={"taskId": "nope"}, headers=as_user("alice"),
                        timeout=10).status_code == 404  # fmt: skip
    assert get_task(balancer.url, "alice", "00000000-0000-4000-8000-000000000000").status_code == 404


@pytest.mark.slow
@sqlite_only
def test_a_task_the_node_refuses_fails_with_its_error_and_is_never_retried(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)
    task_id = submit(balancer.url, "alice", txt2img_payload(sampler_name="No Such Sampler"))
    document = wait_for_tasks(balancer.url, "alice", [task_id])[task_id]
    assert document["status"] == "failed" and document["attempts"] == 1
    assert "sampler_name" in document["error"] and document["result"] is None


@pytest.mark.slow
def test_it_finishes_30_tasks_exactly_once_when_a_node_is_killed(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)
    users = ("alice", "bob", "carol")
    tasks = {
        submit(balancer.url, users[index % 3], txt2img_payload(steps=6, seed=index, batch_size=index % 2 + 1)):
        (users[index % 3], index % 2 + 1)
        for index in range(30)
    }  # fmt: skip
    wait_until(lambda: max(node_load(node) for node in two_nodes) >= 4, timeout=60,
               message="the nodes never got the tasks")  # fmt: skip
    victim = max(two_nodes, key=node_load)
    victim.kill(signal.SIGKILL)
    try:
        documents: dict[str, dict[str, Any]] = {}
        for user in users:
            mine = [task_id for task_id, (owner, _) in tasks.items() if owner == user]
            documents.update(wait_for_tasks(balancer.url, user, mine, timeout=240))
    finally:
        victim.start()

    assert Counter(document["status"] for document in documents.values()) == {"succeeded": 30}
    assert any(document["attempts"] > 1 for document in documents.values()), "no task was on the killed node"
    for task_id, (_, count) in tasks.items():
        images = documents[task_id]["result"]["images"]
        assert len(images) == count
        assert stored_image_files(balancer, task_id) == [f"{index}.png" for index in range(count)], "one result"
    sample = next(task_id for task_id, document in documents.items() if document["attempts"] > 1)
    assert download_image(documents[sample]["result"]["images"][0], tasks[sample][0]).size == (64, 64)


@pytest.mark.slow
def test_a_balancer_restart_with_queued_tasks_loses_none(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    # One node behind the first balancer holds 16 tasks at most (2 x its capacity of 8): the rest stay queued.
    first = start_task_balancer(two_nodes[:1])
    task_ids = [submit(first.url, "alice", txt2img_payload(steps=6, seed=index)) for index in range(24)]
    wait_until(lambda: any(get_task(first.url, "alice", task_id).json()["status"] == "running" for task_id in task_ids),
               timeout=60, message="no task started")  # fmt: skip
    states = Counter(get_task(first.url, "alice", task_id).json()["status"] for task_id in task_ids)
    first.kill(signal.SIGKILL)
    assert states["queued"] > 0, states

    second = start_task_balancer(two_nodes, data_dir=first.data_dir)
    documents = wait_for_tasks(second.url, "alice", task_ids, timeout=240)
    assert Counter(document["status"] for document in documents.values()) == {"succeeded": 24}
    for task_id in task_ids:
        assert stored_image_files(second, task_id) == ["0.png"]
    metrics = requests.get(f"{second.url}/metrics", timeout=10).text
    assert 'sd_balancer_tasks{status="succeeded"} 24.0' in metrics
    assert 'sd_balancer_queue_depth{model="default"} 0.0' in metrics


@pytest.mark.slow
@sqlite_only
def test_a_running_task_shows_its_live_step_preview_and_eta(
    two_nodes: list[ServerProcess], start_task_balancer: BalancerStarter
):
    balancer = start_task_balancer(two_nodes)
    task_id = submit(balancer.url, "live-alice", txt2img_payload(steps=140))
    seen: dict[str, Any] = {}

    def running_with_preview() -> bool:
        document = get_task(balancer.url, "live-alice", task_id).json()
        if document["status"] == "running" and document["step"] > 0 and document["preview"]:
            seen.update(document)
            return True
        return False

    wait_until(running_with_preview, timeout=60, message="no live step and preview while the task ran")
    assert seen["steps"] == 140 and 0 < seen["step"] <= 140
    assert seen["eta"] is not None and seen["eta"] >= 0
    assert Image.open(io.BytesIO(base64.b64decode(seen["preview"]))).size[0] > 0
    requests.post(f"{balancer.url}/task/{task_id}/cancel", headers=as_user("live-alice"), timeout=10)
    assert get_task(balancer.url, "live-alice", task_id).json()["preview"] is None, "no live fields once finished"


@pytest.mark.django_db(transaction=True)
def test_a_user_with_too_many_unfinished_tasks_gets_429_while_others_are_served(live_server: Any):
    body: dict[str, Any] = {"api": "/sdapi/v1/txt2img", "payload": {"prompt": "x"}}
    endpoint = f"{live_server.url}/task"
    with override_settings(SD_MAX_TASKS_PER_USER=2, SD_TASK_DISPATCHER="command"):  # nothing dispatches here
        accepted = [requests.post(endpoint, json=body, headers=as_user("greedy"), timeout=10) for _ in range(2)]
        assert [response.status_code for response in accepted] == [202, 202]
        refused = requests.post(endpoint, json=body, headers=as_user("greedy"), timeout=10)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "10"
        assert refused.json()["error"] == "UserQueueFullError" and "2 unfinished tasks" in refused.json()["detail"]
        assert requests.post(endpoint, json=body, headers=as_user("modest"), timeout=10).status_code == 202

        Task.objects.filter(id=accepted[0].json()["taskId"]).update(status=TaskStatus.SUCCEEDED)
        assert requests.post(endpoint, json=body, headers=as_user("greedy"), timeout=10).status_code == 202
