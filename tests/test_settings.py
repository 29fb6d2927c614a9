"""Settings from the environment: defaults, parsing, strictness, secrets, URLs mounted by role, the README table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.db import connection, transaction
from django.test import Client

from sd_multi.env import env_bool, env_bytes, env_list, env_secret, parse_bytes

REPO = Path(__file__).resolve().parent.parent
CONFIG_VARIABLES = ("DATABASE_URL", "CACHE_URL", "REDIS_URL", "MEDIA_ROOT")

DUMP_SETTINGS = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps({name: getattr(settings, name) for name in dir(settings) if name.isupper()}, default=str))
"""

DUMP_URLCONF = """
import json, django
django.setup()
from django.urls import URLResolver, get_resolver
included = [getattr(p.urlconf_name, "__name__", str(p.urlconf_name)) for p in get_resolver().url_patterns
            if isinstance(p, URLResolver)]
print(json.dumps(included))
"""

DUMP_READ_VARIABLES = """
import json, django
django.setup()
from sd_multi.env import READ_VARIABLES
print(json.dumps(sorted(READ_VARIABLES)))
"""


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess[str]:
    """Runs code in a fresh interpreter whose environment holds no sd-multi configuration but `environment`."""
    clean = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SD_", "DJANGO_")) and name not in CONFIG_VARIABLES
    }
    clean["DJANGO_SETTINGS_MODULE"] = "sd_multi.settings"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**clean, **environment},
        capture_output=True,
        text=True,
        timeout=120,
    )


def load_settings(**environment: str) -> dict[str, Any]:
    result = run_python(DUMP_SETTINGS, **environment)
    assert result.returncode == 0, result.stderr
    loaded: dict[str, Any] = json.loads(result.stdout)
    return loaded


def test_it_runs_on_one_machine_with_nothing_set() -> None:
    settings = load_settings()

    assert settings["SD_ROLE"] == "all"
    assert settings["SD_NODE_ENABLED"] and settings["SD_BALANCER_ENABLED"]
    assert settings["SD_AUTH"] == "open"
    assert settings["DEBUG"] is False
    assert settings["DATABASES"]["default"]["ENGINE"] == "django.db.backends.sqlite3"
    assert settings["DATABASES"]["default"]["NAME"] == str(REPO / "var" / "db.sqlite3")
    assert settings["CACHES"]["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"
    assert settings["SD_MODELS_DIR"] == str(REPO / "models")
    assert settings["MEDIA_ROOT"] == str(REPO / "var" / "media")
    assert settings["STATIC_ROOT"] == str(REPO / "var" / "static")
    assert (settings["SD_DEVICE"], settings["SD_DTYPE"], settings["SD_VRAM_BUDGET"]) == ("auto", "auto", 0)
    assert settings["SD_RAM_CACHE_MODELS"] == 2
    assert (settings["SD_MAX_QUEUE"], settings["SD_MAX_QUEUED_PER_USER"]) == (100, 10)
    assert (settings["SD_MAX_PIXELS"], settings["SD_MAX_STEPS"], settings["SD_MAX_BATCH"]) == (4194304, 150, 8)
    assert settings["SD_MAX_IMAGE_BYTES"] == 20 * 1024**2
    assert settings["SD_NODES"] == []
    assert settings["SD_BALANCER_URL"] == ""
    assert (settings["SD_HEALTH_INTERVAL"], settings["SD_PIN_TTL"], settings["SD_JOB_RETENTION"]) == (2.0, 300, 3600)
    assert settings["SD_TASK_MAX_ATTEMPTS"] == 3
    assert settings["SD_ALLOW_PICKLE"] is False
    assert settings["SD_WEBHOOK_ALLOW_PRIVATE"] is False
    assert settings["SD_NODE_SECRET"] == "" and settings["SD_WEBHOOK_SECRET"] == ""
    assert settings["ALLOWED_HOSTS"] == ["127.0.0.1", "localhost", "[::1]"]
    assert settings["SD_LOG_LEVEL"] == "INFO"
    assert settings["SD_VERSION"] == "0.1.0"
    assert settings["SPECTACULAR_SETTINGS"]["TITLE"] == "sd-multi"


def test_it_parses_values_from_the_environment() -> None:
    settings = load_settings(
        SD_ROLE="Balancer",
        SD_VRAM_BUDGET="8GiB",
        SD_NODES="http://127.0.0.1:7861/, http://gpu-2:7860 ,",
        SD_BALANCER_URL="https://balancer.example/",
        SD_HEALTH_INTERVAL="0.5",
        SD_DEVICE="cuda:1",
        SD_ALLOW_PICKLE="yes",
        DJANGO_DEBUG="on",
        SD_LOG_LEVEL="debug",
        DATABASE_URL="postgres://sd:pw@db.internal:5432/sdmulti",
        REDIS_URL="redis://127.0.0.1:6379/3",
    )

    assert settings["SD_ROLE"] == "balancer"
    assert not settings["SD_NODE_ENABLED"] and settings["SD_BALANCER_ENABLED"]
    assert settings["SD_VRAM_BUDGET"] == 8589934592
    assert settings["SD_NODES"] == ["http://127.0.0.1:7861", "http://gpu-2:7860"]
    assert settings["SD_BALANCER_URL"] == "https://balancer.example"
    assert settings["SD_HEALTH_INTERVAL"] == 0.5
    assert settings["SD_DEVICE"] == "cuda:1"
    assert settings["SD_ALLOW_PICKLE"] is True and settings["DEBUG"] is True
    assert settings["SD_LOG_LEVEL"] == "DEBUG"
    database = settings["DATABASES"]["default"]
    assert (database["ENGINE"], database["NAME"], database["HOST"]) == (
        "django.db.backends.postgresql",
        "sdmulti",
        "db.internal",
    )
    assert database["CONN_MAX_AGE"] == 60 and database["CONN_HEALTH_CHECKS"] is True
    cache = settings["CACHES"]["default"]
    assert (cache["BACKEND"], cache["LOCATION"]) == ("django_redis.cache.RedisCache", "redis://127.0.0.1:6379/3")


def test_it_prefers_cache_url_to_redis_url() -> None:
    settings = load_settings(CACHE_URL="locmem://", REDIS_URL="redis://127.0.0.1:6379/3")

    assert settings["CACHES"]["default"]["BACKEND"] == "django.core.cache.backends.locmem.LocMemCache"


def test_it_reads_secrets_from_name_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "node_secret"
    secret_file.write_text("s3cret-from-file\n")

    settings = load_settings(SD_NODE_SECRET_FILE=str(secret_file), SD_WEBHOOK_SECRET="inline")

    assert settings["SD_NODE_SECRET"] == "s3cret-from-file"
    assert settings["SD_WEBHOOK_SECRET"] == "inline"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SD_MAX_QUEUE", "abc"),
        ("SD_ROLE", "bogus"),
        ("SD_AUTH", "password"),
        ("DJANGO_DEBUG", "maybe"),
        ("SD_VRAM_BUDGET", "8 gigs"),
        ("SD_DEVICE", "tpu"),
        ("SD_DTYPE", "int8"),
        ("SD_NODES", "gpu-1:7860"),
        ("SD_HEALTH_INTERVAL", "soon"),
        ("SD_MAX_BATCH", "0"),
        ("SD_LOG_LEVEL", "loud"),
    ],
)
def test_it_refuses_an_invalid_value_naming_the_variable(name: str, value: str) -> None:
    result = run_python(DUMP_SETTINGS, **{name: value})

    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert name in result.stderr


def test_it_refuses_an_unknown_cache_url() -> None:
    result = run_python(DUMP_SETTINGS, CACHE_URL="memcached://127.0.0.1:11211")

    assert result.returncode != 0
    assert "CACHE_URL" in result.stderr


def test_it_requires_a_secret_key_in_token_mode() -> None:
    refused = run_python(DUMP_SETTINGS, SD_AUTH="token")
    settings = load_settings(SD_AUTH="token", DJANGO_SECRET_KEY="k" * 50)

    assert refused.returncode != 0 and "DJANGO_SECRET_KEY" in refused.stderr
    assert settings["SECRET_KEY"] == "k" * 50


@pytest.mark.parametrize(
    ("role", "mounted"),
    [("all", ["gpu_node.urls", "balancer.urls"]), ("node", ["gpu_node.urls"]), ("balancer", ["balancer.urls"])],
)
def test_it_mounts_the_apps_of_its_role(role: str, mounted: list[str]) -> None:
    result = run_python(DUMP_URLCONF, SD_ROLE=role)

    assert result.returncode == 0, result.stderr
    included = [name for name in json.loads(result.stdout) if name.endswith(("gpu_node.urls", "balancer.urls"))]
    assert included == mounted


def test_it_documents_every_variable_it_reads_in_the_readme() -> None:
    result = run_python(DUMP_READ_VARIABLES)
    readme = (REPO / "README.md").read_text(encoding="utf-8")

    assert result.returncode == 0, result.stderr
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", readme, flags=re.MULTILINE))
    assert set(json.loads(result.stdout)) - documented == set()


@pytest.mark.django_db(transaction=True)
def test_it_lets_threads_claim_rows_concurrently_on_sqlite() -> None:
    """Worker and request threads share the database: claims in parallel transactions wait, never fail."""
    User.objects.bulk_create([User(username=f"row-{number}") for number in range(40)])
    claimed: list[int] = []
    errors: list[Exception] = []

    def claim_all() -> None:
        try:
            while True:
                with transaction.atomic():
                    row = User.objects.filter(is_active=True).order_by("id").first()
                    if row is None:
                        return
                    if User.objects.filter(id=row.id, is_active=True).update(is_active=False) == 1:
                        claimed.append(row.id)
        except Exception as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=claim_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    assert sorted(claimed) == sorted(User.objects.values_list("id", flat=True))


# --- The strict readers, in process -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4096", 4096), ("512MiB", 512 * 1024**2), ("8GiB", 8589934592), ("8GB", 8 * 10**9), ("1.5 GiB", 3 * 2**29)],
)
def test_it_parses_sizes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_it_refuses_a_size_in_an_unknown_unit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_TEST_SIZE", "8 parsecs")

    with pytest.raises(ImproperlyConfigured, match="SD_TEST_SIZE"):
        env_bytes("SD_TEST_SIZE", 0)


@pytest.mark.parametrize(
    ("text", "expected"), [("1", True), ("TRUE", True), ("yes", True), ("On", True), ("0", False), ("off", False)]
)
def test_it_reads_booleans(monkeypatch: pytest.MonkeyPatch, text: str, expected: bool) -> None:
    monkeypatch.setenv("SD_TEST_FLAG", text)

    assert env_bool("SD_TEST_FLAG", not expected) is expected


def test_it_takes_a_blank_value_as_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SD_TEST_FLAG", "  ")
    monkeypatch.setenv("SD_TEST_LIST", "")

    assert env_bool("SD_TEST_FLAG", True) is True
    assert env_list("SD_TEST_LIST", ["a"]) == ["a"]


def test_it_refuses_a_secret_given_twice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SD_TEST_SECRET", "inline")
    monkeypatch.setenv("SD_TEST_SECRET_FILE", str(tmp_path / "secret"))

    with pytest.raises(ImproperlyConfigured, match="either SD_TEST_SECRET or SD_TEST_SECRET_FILE"):
        env_secret("SD_TEST_SECRET")


def test_it_refuses_a_missing_secret_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SD_TEST_SECRET_FILE", str(tmp_path / "missing"))

    with pytest.raises(ImproperlyConfigured, match="SD_TEST_SECRET_FILE"):
        env_secret("SD_TEST_SECRET")


# --- Site URLs -----------------------------------------------------------------------------------------------------


def test_it_publishes_the_openapi_schema(client: Client) -> None:
    response = client.get("/openapi.json")

    assert response.status_code == 200
    assert response.json()["info"]["title"] == "sd-multi"


def test_it_serves_a_docs_page_that_needs_no_cdn(client: Client) -> None:
    response = client.get("/docs")
    page = response.content.decode()

    assert response.status_code == 200
    assert "/openapi.json" in page
    assert re.search(r"""(src|href)=["']?(https?:)?//""", page) is None


def test_it_serves_static_files_without_collectstatic(client: Client) -> None:
    response = client.get("/static/admin/css/base.css")

    assert response.status_code == 200
