"""The node's A1111 endpoints other than generation, in A1111's shapes: listings, options, refreshes, png-info, memory,
cmd-flags, the error shapes of the one exception handler, and the webuiapi client over real HTTP."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import webuiapi
from django.test import Client
from PIL import Image
from rest_framework.exceptions import NotFound

from gpu_node import runtime
from gpu_node.errors import JobFailedError, QueueFullError, UserQueueFullError
from gpu_node.options import A1111_DEFAULTS
from sd_core.errors import DeviceOutOfMemoryError
from sd_core.infotext import encode_image
from tests.gpu_node.info_test_urls import RaiseView

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.gpu_node.info_test_urls")]

API = "/sdapi/v1"
INFOTEXT = (
    "a lighthouse, (stormy sea:1.2)\nNegative prompt: blurry\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.0, Seed: 42, Size: 64x64, Model: tiny-sd1"
)


@pytest.fixture
def tiny_node(settings: Any, tiny_models_dir: Path) -> Iterator[None]:
    settings.SD_MODELS_DIR = str(tiny_models_dir)
    settings.SD_AUTH = "open"
    settings.SD_NODE_SECRET = ""
    runtime.get_engine.cache_clear()
    yield
    runtime.get_engine.cache_clear()


@pytest.fixture
def client(tiny_node: None) -> Client:
    return Client(headers={"X-User-Id": "alice"})


def png_base64(infotext: str | None = INFOTEXT) -> str:
    image = Image.new("RGB", (64, 64), (10, 120, 200))
    return base64.b64encode(encode_image(image, infotext=infotext)).decode()


def post_json(client: Client, path: str, body: Any) -> Any:
    return client.post(path, data=json.dumps(body), content_type="application/json")


# ---------------------------------------------------------------------------------------------------- listings


def test_it_lists_checkpoints_in_the_a1111_shape(client: Client, tiny_models_dir: Path):
    models = client.get(f"{API}/sd-models").json()
    by_title = {model["title"]: model for model in models}
    sd1 = next(model for title, model in by_title.items() if title.startswith("tiny-sd1.safetensors ["))
    assert set(sd1) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert sd1["model_name"] == "tiny-sd1"
    assert sd1["title"] == f"tiny-sd1.safetensors [{sd1['hash']}]"
    assert len(sd1["hash"]) == 10 and sd1["sha256"].startswith(sd1["hash"]) and len(sd1["sha256"]) == 64
    assert sd1["filename"] == str((tiny_models_dir / "Stable-diffusion" / "tiny-sd1.safetensors").resolve())
    assert sd1["config"] is None
    assert any(title.startswith("tiny-sdxl-diffusers [") for title in by_title)


def test_it_lists_samplers_schedulers_and_upscalers(client: Client):
    samplers = client.get(f"{API}/samplers").json()
    euler_a = next(sampler for sampler in samplers if sampler["name"] == "Euler a")
    assert euler_a == {
        "name": "Euler a",
        "aliases": ["k_euler_a", "k_euler_ancestral"],
        "options": {"uses_ensd": "True"},
    }
    schedulers = client.get(f"{API}/schedulers").json()
    assert schedulers[0] == {"name": "automatic", "label": "Automatic", "aliases": None, "default_rho": -1.0,
                             "need_inner_model": False}  # fmt: skip
    assert "karras" in [scheduler["name"] for scheduler in schedulers]
    upscalers = client.get(f"{API}/upscalers").json()
    assert upscalers[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4}
    assert [upscaler["name"] for upscaler in upscalers] == ["None", "Lanczos", "Nearest"]
    modes = client.get(f"{API}/latent-upscale-modes").json()
    assert modes == [{"name": name} for name in ("Latent", "Latent (antialiased)", "Latent (bicubic)",
                                                  "Latent (bicubic antialiased)", "Latent (nearest)",
                                                  "Latent (nearest-exact)")]  # fmt: skip


def test_it_lists_vaes_and_loras(client: Client, tiny_models_dir: Path):
    vaes = client.get(f"{API}/sd-vae").json()
    assert vaes == [{"model_name": "tiny-vae.safetensors",
                     "filename": str((tiny_models_dir / "VAE" / "tiny-vae.safetensors").resolve())}]  # fmt: skip
    loras = client.get(f"{API}/loras").json()
    assert len(loras) == 1
    lora = loras[0]
    assert set(lora) == {"name", "alias", "path", "metadata"}
    assert lora["name"] == "tiny-lora"
    assert lora["alias"] == lora["metadata"].get("ss_output_name", "tiny-lora")
    assert lora["path"].endswith("tiny-lora.safetensors")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("embeddings", {"loaded": {}, "skipped": {}}),
        ("hypernetworks", []),
        ("face-restorers", []),
        ("realesrgan-models", []),
        ("prompt-styles", []),
        ("extensions", []),
        ("scripts", {"txt2img": [], "img2img": []}),
        ("script-info", []),
    ],
)
def test_it_answers_what_the_node_lacks_with_empty_a1111_listings(client: Client, endpoint: str, expected: Any):
    response = client.get(f"{API}/{endpoint}")
    assert response.status_code == 200
    assert response.json() == expected


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("refresh-checkpoints", None),
        ("refresh-vae", None),
        ("refresh-loras", None),
        ("refresh-embeddings", None),
        ("unload-checkpoint", {}),
        ("reload-checkpoint", {}),
    ],
)
def test_control_endpoints_answer_a1111_json_bodies(client: Client, endpoint: str, expected: Any):
    response = client.post(f"{API}/{endpoint}")
    assert response.status_code == 200
    assert response.content == json.dumps(expected).encode().replace(b" ", b"")
    assert response.json() == expected


def test_refresh_checkpoints_finds_a_new_model(client: Client, tiny_models_dir: Path, tmp_path: Path, settings: Any):
    models = tmp_path / "models"
    (models / "Stable-diffusion").mkdir(parents=True)
    settings.SD_MODELS_DIR = str(models)
    runtime.get_engine.cache_clear()
    assert client.get(f"{API}/sd-models").json() == []
    (models / "Stable-diffusion" / "copy.safetensors").write_bytes(
        (tiny_models_dir / "Stable-diffusion" / "tiny-sd1.safetensors").read_bytes()
    )
    assert client.post(f"{API}/refresh-checkpoints").json() is None
    assert [model["model_name"] for model in client.get(f"{API}/sd-models").json()] == ["copy"]


# ---------------------------------------------------------------------------------------------------- options


def test_get_options_returns_every_a1111_key_with_the_users_view(client: Client):
    options = client.get(f"{API}/options").json()
    assert set(options) == set(A1111_DEFAULTS)
    assert options["samples_format"] == "png"
    assert options["CLIP_stop_at_last_layers"] == 1
    assert options["sd_model_checkpoint"].startswith("tiny-sd1-diffusers [")


def test_post_options_answers_null_and_switches_only_that_users_model(client: Client):
    response = post_json(client, f"{API}/options", {"sd_model_checkpoint": "tiny-sdxl"})
    assert response.status_code == 200 and response.content == b"null"
    alice = client.get(f"{API}/options").json()
    bob = client.get(f"{API}/options", headers={"X-User-Id": "bob"}).json()
    assert alice["sd_model_checkpoint"].startswith("tiny-sdxl.safetensors [")
    assert bob["sd_model_checkpoint"].startswith("tiny-sd1-diffusers [")


def test_post_options_refuses_unknown_keys_and_models_with_422(client: Client):
    unknown = post_json(client, f"{API}/options", {"no_such_option": 1})
    assert unknown.status_code == 422
    assert unknown.json()["detail"][0]["loc"] == ["body", "no_such_option"]
    model = post_json(client, f"{API}/options", {"sd_model_checkpoint": "missing.safetensors"})
    assert model.status_code == 422
    body = model.json()
    assert body["detail"][0]["loc"] == ["body", "sd_model_checkpoint"]
    assert "missing.safetensors" in body["detail"][0]["msg"]
    assert any(title.startswith("tiny-sdxl.safetensors [") for title in body["valid_values"])


def test_node_wide_options_are_staff_only_in_token_mode(client: Client, settings: Any, django_user_model: Any):
    from rest_framework.authtoken.models import Token

    settings.SD_AUTH = "token"
    user = django_user_model.objects.create_user("alice", password="pw")
    headers = {"Authorization": f"Bearer {Token.objects.create(user=user).key}"}
    refused = client.post(f"{API}/options?global=1", data='{"samples_format": "jpg"}', content_type="application/json",
                          headers=headers)  # fmt: skip
    assert refused.status_code == 403
    assert set(refused.json()) == {"error", "detail", "body", "errors"}
    own = client.post(f"{API}/options", data='{"samples_format": "jpg"}', content_type="application/json",
                      headers=headers)  # fmt: skip
    assert own.status_code == 200
    assert client.get(f"{API}/options", headers=headers).json()["samples_format"] == "jpg"


# --------------------------------------------------------------------------------------------------- png-info


def test_png_info_reads_back_the_infotext_of_an_encoded_png(client: Client):
    response = post_json(client, f"{API}/png-info", {"image": png_base64()})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"info", "items", "parameters"}
    assert body["info"] == INFOTEXT
    assert body["parameters"]["Prompt"] == "a lighthouse, (stormy sea:1.2)"
    assert body["parameters"]["Negative prompt"] == "blurry"
    assert body["parameters"]["Steps"] == "20"
    assert body["parameters"]["Size-1"] == "64"
    assert body["items"] == {}


def test_png_info_accepts_data_urls_and_images_without_infotext(client: Client):
    data_url = "data:image/png;base64," + png_base64()
    assert post_json(client, f"{API}/png-info", {"image": data_url}).json()["info"] == INFOTEXT
    plain = post_json(client, f"{API}/png-info", {"image": png_base64(None)}).json()
    assert plain["info"] == ""
    assert post_json(client, f"{API}/png-info", {"image": ""}).json() == {"info": "", "items": {}, "parameters": {}}


@pytest.mark.parametrize(
    "image",
    ["not base64 !!", base64.b64encode(b"not an image").decode(), "http://example.com/a.png", "file:///etc/passwd"],
)
def test_png_info_refuses_bad_images_with_a1111s_four_keys(client: Client, image: str):
    response = post_json(client, f"{API}/png-info", {"image": image})
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert "image" in body["detail"]


def test_png_info_requires_the_image_field(client: Client):
    response = post_json(client, f"{API}/png-info", {})
    assert response.status_code == 422
    assert response.json() == {"detail": [{"loc": ["body", "image"], "msg": "field required",
                                           "type": "value_error.missing"}]}  # fmt: skip


# ------------------------------------------------------------------------------------------ memory and flags


def test_memory_has_the_a1111_shape(client: Client):
    memory = client.get(f"{API}/memory").json()
    assert set(memory) == {"ram", "cuda"}
    assert set(memory["ram"]) == {"free", "used", "total"}
    assert 0 < memory["ram"]["used"] < memory["ram"]["total"]
    if "error" in memory["cuda"]:
        assert memory["cuda"] == {"error": "unavailable"}
    else:
        assert set(memory["cuda"]) == {"system", "active", "allocated", "reserved", "inactive", "events"}
        assert set(memory["cuda"]["events"]) == {"retries", "oom"}


def test_cmd_flags_never_leak_secrets(client: Client, settings: Any):
    secrets = ["node-secret-Zq81", "webhook-secret-Pw93", "django-secret-Kx27", settings.DATABASES["default"]["NAME"]]
    settings.SD_NODE_SECRET = secrets[0]
    settings.SD_WEBHOOK_SECRET = secrets[1]
    settings.SECRET_KEY = secrets[2]
    settings.SD_ROLE = "all"
    response = client.get(f"{API}/cmd-flags")
    assert response.status_code == 200
    flags = response.json()
    assert flags["api"] is True and flags["nowebui"] is True and flags["api_auth"] is None
    assert flags["ckpt_dir"].endswith("Stable-diffusion")
    for secret in secrets:
        assert secret not in response.content.decode()
    assert not [key for key in flags if any(word in key for word in ("secret", "password", "database", "token"))]


# ------------------------------------------------------------------------------------------------ error shapes


def test_bad_json_is_fastapis_jsondecode_422(client: Client):
    response = client.post(f"{API}/options", data="{not json", content_type="application/json")
    assert response.status_code == 422
    (entry,) = response.json()["detail"]
    assert entry["loc"] == ["body", 1]
    assert entry["type"] == "value_error.jsondecode"
    assert entry["msg"].startswith("Expecting property name enclosed in double quotes")


def test_a_missing_or_non_object_body_is_a_422(client: Client):
    missing = client.post(f"{API}/options")
    assert missing.status_code == 422
    assert missing.json() == {"detail": [{"loc": ["body"], "msg": "field required", "type": "value_error.missing"}]}
    listed = post_json(client, f"{API}/options", [1, 2])
    assert listed.json() == {"detail": [{"loc": ["body"], "msg": "value is not a valid dict",
                                         "type": "type_error.dict"}]}  # fmt: skip


def test_unknown_sdapi_paths_get_fastapis_404_even_in_token_mode(client: Client, settings: Any):
    settings.SD_AUTH = "token"
    for method in (client.get, client.post):
        response = method(f"{API}/no-such-endpoint")
        assert response.status_code == 404
        assert response.json() == {"detail": "Not Found"}


def test_wrong_method_and_unknown_job_get_fastapis_bodies(client: Client):
    response = client.get(f"{API}/refresh-checkpoints")
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}
    RaiseView.error = NotFound()
    missing = client.get("/test/raise")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}


@pytest.mark.parametrize(
    ("error", "status", "retry_after"),
    [
        (QueueFullError(retry_after=5), 503, "5"),
        (UserQueueFullError(retry_after=7), 429, "7"),
        (JobFailedError(status_code=422, detail="model 'x' not found"), 422, None),
        (DeviceOutOfMemoryError("CUDA out of memory at 4096x4096"), 422, None),
        (RuntimeError("something broke"), 500, None),
    ],
)
def test_the_exception_handler_answers_a1111s_four_keys(client: Client, error: Exception, status: int,
                                                        retry_after: str | None):  # fmt: skip
    RaiseView.error = error
    response = client.get("/test/raise")
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"}
    assert response.headers.get("Retry-After") == retry_after
    if isinstance(error, RuntimeError):
        assert body == {"error": "RuntimeError", "detail": "", "body": "", "errors": "something broke"}
    if isinstance(error, DeviceOutOfMemoryError):
        assert "ran out of memory" in body["detail"] and "4096x4096" in body["errors"]
    if isinstance(error, JobFailedError):
        assert body["detail"] == "model 'x' not found"


def test_every_response_carries_x_process_time(client: Client):
    for response in (client.get(f"{API}/samplers"), client.post(f"{API}/options")):
        value = response.headers["X-Process-Time"]
        assert float(value) >= 0 and len(value.split(".")[1]) == 4


# ---------------------------------------------------------------------------------- webuiapi over real HTTP


def test_the_webuiapi_client_works_against_a_live_node(tiny_node: None, live_server: Any):
    alice = webuiapi.WebUIApi(baseurl=f"{live_server.url}{API}")
    alice.session.headers["X-User-Id"] = "alice-live"
    bob = webuiapi.WebUIApi(baseurl=f"{live_server.url}{API}")
    bob.session.headers["X-User-Id"] = "bob-live"

    titles = alice.util_get_model_names()
    assert titles == sorted(model["title"] for model in alice.get_sd_models())
    sdxl = next(title for title in titles if title.startswith("tiny-sdxl.safetensors ["))
    alice.util_set_model("tiny-sdxl.safetensors")
    assert alice.util_get_current_model() == sdxl
    assert alice.get_options()["sd_checkpoint_hash"].startswith(sdxl[-11:-1])
    assert bob.util_get_current_model() != sdxl

    assert "Euler a" in alice.util_get_sampler_names()
    assert "karras" in alice.util_get_scheduler_names()
    assert alice.get_scripts() == {"txt2img": [], "img2img": []}
    assert alice.refresh_checkpoints() is None
    assert [upscaler["name"] for upscaler in alice.get_upscalers()] == ["None", "Lanczos", "Nearest"]
    assert "ram" in alice.get_memory()
    assert alice.get_cmd_flags()["nowebui"] is True

    image = Image.open(io.BytesIO(base64.b64decode(png_base64())))
    result = alice.png_info(image)
    assert result.info == INFOTEXT
    assert result.json["parameters"]["Seed"] == "42"
