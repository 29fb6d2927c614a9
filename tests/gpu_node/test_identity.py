"""Who the node thinks is calling (DESIGN §2): open mode's X-User-Id/user_id/anonymous, token mode's Bearer, Token and
Basic logins with A1111's 401 bodies, the balancer's signed X-SD-User, and staff-only endpoints."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.test import Client
from rest_framework.authtoken.models import Token

from gpu_node import identity, runtime
from gpu_node.identity import sign_user_header, verify_user_header

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.gpu_node.info_test_urls")]

SECRET = "node-secret-for-tests"
NOT_AUTHENTICATED = {"error": "HTTPException", "detail": "Not authenticated", "body": "", "errors": ""}


@pytest.fixture(autouse=True)
def open_node(settings: Any, tiny_models_dir: Path) -> Iterator[None]:
    settings.SD_MODELS_DIR = str(tiny_models_dir)
    settings.SD_AUTH = "open"
    settings.SD_NODE_SECRET = ""
    settings.SD_ROLE = "all"
    runtime.get_engine.cache_clear()
    identity.A1111BasicAuthentication._verified.clear()
    yield
    runtime.get_engine.cache_clear()


@pytest.fixture
def token_mode(settings: Any) -> None:
    settings.SD_AUTH = "token"


@pytest.fixture
def alice(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("alice", password="alice-password")


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("staff", password="staff-password", is_staff=True)


def token_of(user: Any) -> str:
    return Token.objects.create(user=user).key


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def whoami(headers: dict[str, str] | None = None, body: Any = None) -> Any:
    client = Client(headers=headers or {})
    if body is None:
        return client.get("/test/whoami")
    return client.post("/test/whoami", data=json.dumps(body), content_type="application/json")


# ------------------------------------------------------------------------------------------------ open mode


def test_open_mode_takes_the_x_user_id_header():
    assert whoami({"X-User-Id": "alice"}).json() == {"name": "alice", "is_staff": False}


def test_open_mode_takes_a_user_id_field_in_the_body_after_the_header():
    assert whoami(body={"user_id": "bob", "prompt": "x"}).json()["name"] == "bob"
    assert whoami({"X-User-Id": "alice"}, body={"user_id": "bob"}).json()["name"] == "alice"


def test_a_request_that_names_no_user_is_anonymous():
    assert whoami().json() == {"name": "anonymous", "is_staff": False}
    assert whoami(body={"user_id": ""}).json()["name"] == "anonymous"


def test_a_malformed_user_id_is_a_422_naming_the_header():
    response = whoami({"X-User-Id": "a" * 151})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["header", "x-user-id"]
    assert whoami(body={"user_id": "tab\there"}).json()["detail"][0]["loc"] == ["body", "user_id"]


def test_a_login_wins_over_the_claimed_user_in_open_mode(alice: Any):
    response = whoami({"X-User-Id": "mallory", "Authorization": f"Bearer {token_of(alice)}"})
    assert response.json() == {"name": "alice", "is_staff": False}


# ----------------------------------------------------------------------------------------------- token mode


def test_token_mode_answers_a1111s_401_without_credentials(token_mode: None):
    response = whoami({"X-User-Id": "alice"})
    assert response.status_code == 401
    assert response.json() == NOT_AUTHENTICATED
    assert "WWW-Authenticate" not in response.headers, "A1111 sends no challenge"


@pytest.mark.parametrize("keyword", ["Bearer", "Token", "bearer"])
def test_token_mode_accepts_api_tokens(token_mode: None, alice: Any, keyword: str):
    response = whoami({"Authorization": f"{keyword} {token_of(alice)}"})
    assert response.status_code == 200
    assert response.json() == {"name": "alice", "is_staff": False}


def test_a_wrong_token_gets_a1111s_401_shape(token_mode: None, alice: Any):
    token_of(alice)
    response = whoami({"Authorization": "Bearer 0123456789abcdef0123456789abcdef01234567"})
    assert response.status_code == 401
    body = response.json()
    assert set(body) == {"error", "detail", "body", "errors"} and body["error"] == "HTTPException"


def test_token_mode_accepts_basic_logins_and_knows_staff(token_mode: None, alice: Any, staff: Any):
    assert whoami({"Authorization": basic("alice", "alice-password")}).json() == {"name": "alice", "is_staff": False}
    assert whoami({"Authorization": basic("staff", "staff-password")}).json() == {"name": "staff", "is_staff": True}


def test_a_wrong_password_is_a1111s_incorrect_username_or_password(token_mode: None, alice: Any):
    response = whoami({"Authorization": basic("alice", "guess")})
    assert response.status_code == 401
    assert response.json() == {"error": "HTTPException", "detail": "Incorrect username or password", "body": "",
                               "errors": ""}  # fmt: skip


def test_a_checked_basic_login_is_remembered_until_the_password_changes(
    token_mode: None, alice: Any, monkeypatch: pytest.MonkeyPatch
):
    assert whoami({"Authorization": basic("alice", "alice-password")}).status_code == 200
    calls: list[str] = []
    real = identity.authenticate

    def counting(**kwargs: Any) -> Any:
        calls.append("check")
        return real(**kwargs)

    monkeypatch.setattr(identity, "authenticate", counting)
    assert whoami({"Authorization": basic("alice", "alice-password")}).status_code == 200
    assert calls == [], "the second call skips the password hash"
    alice.set_password("new-password")
    alice.save()
    assert whoami({"Authorization": basic("alice", "alice-password")}).status_code == 401
    assert whoami({"Authorization": basic("alice", "new-password")}).status_code == 200


def test_the_webuiapi_client_logs_in_with_basic_auth(token_mode: None, alice: Any, live_server: Any):
    import webuiapi

    api = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")
    api.set_auth("alice", "alice-password")
    assert api.get_options()["samples_format"] == "png"
    stranger = webuiapi.WebUIApi(baseurl=f"{live_server.url}/sdapi/v1")
    assert stranger.get_options() == NOT_AUTHENTICATED


# ------------------------------------------------------------------------------------------------ X-SD-User


def test_a_signed_user_header_round_trips_any_name():
    header = sign_user_header("Zoë | ops", is_staff=True, secret=SECRET, now=1000.0)
    assert verify_user_header(header, secret=SECRET, now=1100.0) == identity.UserIdentity(name="Zoë | ops",
                                                                                        is_staff=True)  # fmt: skip
    assert sign_user_header("alice", is_staff=False, secret=SECRET, now=1000.0).startswith("alice|0|1000|")


def test_a_node_with_a_secret_trusts_the_signed_user(settings: Any):
    settings.SD_NODE_SECRET = SECRET
    header = sign_user_header("carol", is_staff=True, secret=SECRET)
    assert whoami({"X-SD-User": header, "X-User-Id": "mallory"}).json() == {"name": "carol", "is_staff": True}


def test_a_signed_user_counts_as_a_login_in_token_mode(settings: Any, token_mode: None):
    settings.SD_NODE_SECRET = SECRET
    assert whoami({"X-SD-User": sign_user_header("carol", is_staff=False, secret=SECRET)}).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        sign_user_header("carol", is_staff=False, secret="another-secret"),
        sign_user_header("carol", is_staff=False, secret=SECRET).replace("carol|0", "carol|1"),
        sign_user_header("carol", is_staff=False, secret=SECRET, now=time.time() - 600),
        sign_user_header("carol", is_staff=False, secret=SECRET, now=time.time() + 600),
        "carol|0|123",
        "carol",
    ],
    ids=["forged", "tampered", "expired", "future", "short", "bare"],
)
def test_a_forged_or_expired_signed_user_is_a_401(settings: Any, header: str):
    settings.SD_NODE_SECRET = SECRET
    response = whoami({"X-SD-User": header})
    assert response.status_code == 401
    assert set(response.json()) == {"error", "detail", "body", "errors"}


def test_a_node_behind_a_signing_balancer_ignores_claimed_users(settings: Any):
    settings.SD_NODE_SECRET = SECRET
    settings.SD_ROLE = "node"
    assert whoami({"X-User-Id": "mallory"}, body={"user_id": "mallory"}).json()["name"] == "anonymous"
    settings.SD_ROLE = "all"
    assert whoami({"X-User-Id": "alice"}).json()["name"] == "alice", "in `all` the node is the front door"


def test_without_a_secret_the_signed_header_means_nothing():
    header = sign_user_header("carol", is_staff=True, secret=SECRET)
    assert whoami({"X-SD-User": header, "X-User-Id": "alice"}).json() == {"name": "alice", "is_staff": False}


# ------------------------------------------------------------------------------------------------ staff only


@pytest.mark.parametrize("endpoint", ["refresh-checkpoints", "refresh-vae", "unload-checkpoint"])
def test_admin_endpoints_need_staff_in_token_mode(token_mode: None, alice: Any, staff: Any, endpoint: str):
    path = f"/sdapi/v1/{endpoint}"
    assert Client().post(path).status_code == 401
    refused = Client(headers={"Authorization": f"Bearer {token_of(alice)}"}).post(path)
    assert refused.status_code == 403
    assert set(refused.json()) == {"error", "detail", "body", "errors"}
    assert Client(headers={"Authorization": f"Bearer {token_of(staff)}"}).post(path).status_code == 200


def test_admin_endpoints_are_open_in_open_mode():
    response = Client(headers={"X-User-Id": "alice"}).post("/sdapi/v1/refresh-checkpoints")
    assert response.status_code == 200 and response.json() is None
