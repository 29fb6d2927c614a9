"""The node's A1111 generation API over real HTTP to a real node process: the webuiapi client, per-user models,
progress, interrupt and skip isolation, bad input, disconnects."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import threading
import time
from typing import Any

import requests
import webuiapi
from PIL import Image

from tests.gpu_node.conftest import as_user, txt2img


def client(url: str, user: str) -> webuiapi.WebUIApi:
    api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", sampler="Euler a", steps=2)
    api.session.headers.update(as_user(user))
    return api


def decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_it_serves_txt2img_to_the_webuiapi_client(node_url: str):
    api = client(node_url, "webui-user")
    result = api.txt2img(prompt="a lighthouse", width=64, height=64, seed=42, steps=3)
    assert result.image.size == (64, 64)
    assert result.info["seed"] == 42
    assert result.info["sampler_name"] == "Euler a"
    assert result.parameters["prompt"] == "a lighthouse"
    assert "Steps: 3, Sampler: Euler a" in result.image.info["parameters"]


def test_it_serves_img2img_to_the_webuiapi_client(node_url: str):
    api = client(node_url, "webui-user")
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    result = api.img2img(
        images=[init], prompt="a red square", width=64, height=64, denoising_strength=0.5, steps=4, seed=3
    )
    assert result.image.size == (64, 64)
    assert "Denoising strength: 0.5" in result.image.info["parameters"]
    assert result.parameters["init_images"] is None, "A1111 drops init images unless include_init_images"


def test_model_listing_and_per_user_model_switch_through_webuiapi(node_url: str):
    alice, bob = client(node_url, "alice-models"), client(node_url, "bob-models")
    titles = alice.util_get_model_names()
    sdxl = next(title for title in titles if title.startswith("tiny-sdxl.safetensors"))
    alice.util_set_model("tiny-sdxl.safetensors")
    assert alice.util_get_current_model() == sdxl
    assert bob.util_get_current_model() != sdxl, "alice's choice does not change bob's model"
    result = alice.txt2img(prompt="x", width=64, height=64, steps=2)
    assert "Model: tiny-sdxl," in result.image.info["parameters"]
    assert "Euler a" in alice.util_get_sampler_names()
    assert "karras" in alice.util_get_scheduler_names()
    assert alice.get_options()["samples_format"] == "png"


def test_two_users_on_different_models_never_get_each_others_model(node_url: str):
    requests.post(
        f"{node_url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd1"}, headers=as_user("alice"), timeout=60
    ).raise_for_status()
    requests.post(
        f"{node_url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sdxl"}, headers=as_user("bob"), timeout=60
    ).raise_for_status()
    mismatches: list[str] = []
    expected = {"alice": "Model: tiny-sd1,", "bob": "Model: tiny-sdxl,"}

    def run(user: str) -> None:
        for index in range(50):
            response = txt2img(node_url, user, steps=1, seed=index)
            info = json.loads(response.json()["info"])
            if expected[user] not in info["infotexts"][0]:
                mismatches.append(f"{user} #{index}: {info['infotexts'][0]}")

    threads = [threading.Thread(target=run, args=(user,)) for user in expected]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert mismatches == []


def _start_long_job(url: str, user: str, results: dict[str, requests.Response], steps: int = 150) -> threading.Thread:
    thread = threading.Thread(target=lambda: results.__setitem__(user, txt2img(url, user, steps=steps)))
    thread.start()
    return thread


def _wait_running(url: str, user: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        progress = requests.get(f"{url}/sdapi/v1/progress", headers=as_user(user), timeout=10).json()
        if progress["state"]["sampling_step"] > 0:
            return progress
        time.sleep(0.05)
    raise AssertionError(f"{user}'s job never started")


def test_progress_interrupt_and_preview_are_per_user(node_url: str):
    requests.post(
        f"{node_url}/sdapi/v1/options",
        json={"show_progress_every_n_steps": 1},
        headers=as_user("alice-live"),
        timeout=30,
    ).raise_for_status()
    results: dict[str, requests.Response] = {}
    alice = _start_long_job(node_url, "alice-live", results)
    progress = _wait_running(node_url, "alice-live")
    assert 0 < progress["progress"] <= 1
    assert progress["state"]["sampling_steps"] == 150
    assert progress["state"]["job_count"] == 1
    deadline = time.monotonic() + 10
    while progress["current_image"] is None and time.monotonic() < deadline:
        progress = requests.get(f"{node_url}/sdapi/v1/progress", headers=as_user("alice-live"), timeout=10).json()
    assert decode(progress["current_image"]).size[0] > 0, "a live preview of alice's job"

    bob_view = requests.get(f"{node_url}/sdapi/v1/progress", headers=as_user("bob-live"), timeout=10).json()
    assert bob_view["state"]["job_count"] == 0 and bob_view["current_image"] is None, "bob sees nothing of alice's"
    assert requests.post(f"{node_url}/sdapi/v1/interrupt", headers=as_user("bob-live"), timeout=10).json() == {}
    time.sleep(0.5)
    still = requests.get(f"{node_url}/sdapi/v1/progress", headers=as_user("alice-live"), timeout=10).json()
    assert still["state"]["interrupted"] is False, "bob's interrupt did not touch alice's job"

    assert requests.post(f"{node_url}/sdapi/v1/interrupt", headers=as_user("alice-live"), timeout=10).json() == {}
    alice.join(timeout=60)
    response = results["alice-live"]
    assert response.status_code == 200, "an interrupted job still returns its partial image"
    info = json.loads(response.json()["info"])
    assert decode(response.json()["images"][0]).size == (64, 64)
    assert info["seed"] == 1


def test_skip_answers_null_and_idle_progress_has_the_a1111_shape(node_url: str):
    assert requests.post(f"{node_url}/sdapi/v1/skip", headers=as_user("idle-user"), timeout=10).json() is None
    progress = requests.get(f"{node_url}/sdapi/v1/progress", headers=as_user("idle-user"), timeout=10).json()
    assert set(progress) >= {"progress", "eta_relative", "state", "current_image", "textinfo"}
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    assert set(progress["state"]) == {
        "skipped",
        "interrupted",
        "stopping_generation",
        "job",
        "job_count",
        "job_timestamp",
        "job_no",
        "sampling_step",
        "sampling_steps",
    }


def test_a_queued_job_reports_its_queue_position(node_url: str):
    results: dict[str, requests.Response] = {}
    first = _start_long_job(node_url, "queue-a", results, steps=60)
    _wait_running(node_url, "queue-a")
    second = _start_long_job(node_url, "queue-b", results, steps=2)
    deadline = time.monotonic() + 10
    while True:
        progress = requests.get(f"{node_url}/sdapi/v1/progress", headers=as_user("queue-b"), timeout=10).json()
        if progress["textinfo"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert progress["textinfo"].startswith("In queue: 1/")
    assert progress["state"]["job"] == "queued"
    requests.post(f"{node_url}/sdapi/v1/interrupt", headers=as_user("queue-a"), timeout=10)
    first.join(timeout=60)
    second.join(timeout=60)
    assert results["queue-b"].status_code == 200


def test_a_disconnected_sync_caller_does_not_leave_its_job_running(node_url: str):
    with contextlib.suppress(requests.Timeout):
        txt2img(node_url, "gone-user", timeout=1.5, steps=400)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = requests.get(f"{node_url}/node/health", timeout=10).json()
        if health["running_job"] is None and health["queue_depth"] == 0:
            break
        time.sleep(0.2)
    assert health["running_job"] is None, "the abandoned 400-step job was interrupted"


def test_control_endpoints_return_json_bodies(node_url: str):
    assert requests.post(f"{node_url}/sdapi/v1/interrupt", timeout=10).json() == {}
    assert requests.post(f"{node_url}/sdapi/v1/skip", timeout=10).json() is None
    assert requests.post(f"{node_url}/sdapi/v1/options", json={"samples_format": "png"}, timeout=10).json() is None


def test_the_seed_project_aliases_generate(node_url: str):
    response = requests.post(
        f"{node_url}/txt2img_v2/", json={"prompt": "x", "steps": 1, "width": 64, "height": 64}, timeout=60
    )
    assert response.status_code == 200
    assert decode(response.json()["images"][0]).size == (64, 64)


def test_bad_input_gets_a_4xx_json_error_and_the_node_keeps_serving(node_url: str):
    cases: list[tuple[str, dict[str, Any], str]] = [
        ("txt2img", {"steps": "many"}, "steps"),
        ("txt2img", {"width": 65}, "width"),
        ("txt2img", {"width": 99999, "height": 99999}, "width"),
        ("txt2img", {"steps": 100000}, "steps"),
        ("txt2img", {"batch_size": 1000}, "batch_size"),
        ("txt2img", {"sampler_name": "Nope"}, "sampler_name"),
        ("txt2img", {"scheduler": "nope"}, "scheduler"),
        ("txt2img", {"override_settings": {"sd_model_checkpoint": "missing.safetensors"}}, "sd_model_checkpoint"),
        ("txt2img", {"prompt": ["a", "list"]}, "prompt"),
        ("txt2img", {"enable_hr": True, "hr_upscaler": "ESRGAN_4x"}, "hr_upscaler"),
        ("img2img", {"init_images": ["not base64 !!"]}, "init_images"),
        ("img2img", {"init_images": ["http://example.com/a.png"]}, "init_images"),
        ("img2img", {"init_images": [base64.b64encode(b"not an image").decode()]}, "init_images"),
    ]
    for endpoint, body, field in cases:
        response = requests.post(f"{node_url}/sdapi/v1/{endpoint}", json=body, timeout=30)
        assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
        assert field in response.text, (body, response.text)
        response.json()
    broken = requests.post(
        f"{node_url}/sdapi/v1/txt2img", data="{not json", timeout=30, headers={"Content-Type": "application/json"}
    )
    assert broken.status_code == 422 and "detail" in broken.json()
    assert txt2img(node_url, "after-errors").status_code == 200


def test_health_and_metrics(node_url: str):
    health = requests.get(f"{node_url}/node/health", timeout=10).json()
    assert health["status"] in ("ready", "busy")
    assert {
        "node_id",
        "boot_id",
        "devices",
        "queue_depth",
        "running_job",
        "users_queued",
        "loaded_models",
        "capacity",
        "version",
    } <= set(health)
    assert health["devices"][0]["free_memory"] > 0
    text = requests.get(f"{node_url}/metrics", timeout=10).text
    for name in (
        "sd_node_queue_depth",
        "sd_node_jobs_total",
        "sd_node_generation_seconds",
        "sd_node_steps_per_second",
        "sd_node_loaded_models",
        "sd_node_pool_evictions",
    ):
        assert name in text
