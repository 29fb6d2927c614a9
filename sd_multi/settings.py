"""Django settings for sd-multi: every value comes from an environment variable (README, "Settings").

With nothing set it runs on one machine: SD_ROLE=all, SQLite, LocMem cache, the models/ folder, CPU or the GPU.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dj_database_url
from corsheaders.defaults import default_headers
from django.core.exceptions import ImproperlyConfigured

from sd_multi.env import (
    env_bool,
    env_bytes,
    env_choice,
    env_float,
    env_int,
    env_list,
    env_path,
    env_secret,
    env_str,
)

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = BASE_DIR / "var"

SD_VERSION = "0.1.0"

# Only usable in open mode, where nothing is protected by a login anyway; token mode requires a real key.
INSECURE_DEV_SECRET_KEY = "django-insecure-sd-multi-open-mode-only-never-use-with-sd-auth-token"

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def _checked_device(name: str, value: str) -> str:
    if not DEVICE_PATTERN.match(value):
        raise ImproperlyConfigured(
            f"Environment variable {name}={value!r} is invalid: expected auto, cpu, cuda or cuda:N."
        )
    return value


def _checked_url(name: str, value: str) -> str:
    """An http(s) base URL without its trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ImproperlyConfigured(f"Environment variable {name} holds {value!r}: expected an http:// or https:// URL.")
    return value.rstrip("/")


def _database(url: str) -> dict[str, Any]:
    try:
        config: dict[str, Any] = dict(dj_database_url.parse(url))
    except ValueError as exc:
        raise ImproperlyConfigured(f"DATABASE_URL cannot be parsed: {exc}") from None
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # Worker threads write jobs while request threads read them: WAL lets readers go on during a write, and
        # IMMEDIATE transactions take the write lock up front instead of failing on a lock upgrade.
        config["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL;PRAGMA synchronous=NORMAL",
        }
        # Tests get a file too (one per test process): SQLite's shared in-memory database fails concurrent
        # transactions at once ("table is locked") where a file waits, so threaded tests would not test this.
        config["TEST"] = {"NAME": str(Path(tempfile.gettempdir()) / f"sd-multi-test-{os.getpid()}.sqlite3")}
    else:
        # Persistent connections (per thread), checked before reuse so a restarted PostgreSQL costs no request.
        config["CONN_MAX_AGE"] = 60
        config["CONN_HEALTH_CHECKS"] = True
    return config


def _cache(url: str) -> dict[str, Any]:
    scheme = urlsplit(url).scheme
    if not url or scheme == "locmem":
        return {"BACKEND": "django.core.cache.backends.locmem.LocMemCache", "LOCATION": "sd-multi"}
    if scheme == "dummy":
        return {"BACKEND": "django.core.cache.backends.dummy.DummyCache"}
    if scheme in ("redis", "rediss", "unix"):
        return {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": url,
            "KEY_PREFIX": "sd-multi",
            "OPTIONS": {"SOCKET_CONNECT_TIMEOUT": 5, "SOCKET_TIMEOUT": 5},
        }
    raise ImproperlyConfigured(
        "CACHE_URL/REDIS_URL must start with redis://, rediss://, unix://, locmem:// or dummy://."
    )


# --- Role and identity -------------------------------------------------------------------------------------------

SD_ROLE = env_choice("SD_ROLE", ("node", "balancer", "all"), "all")
SD_NODE_ENABLED = SD_ROLE in ("node", "all")
SD_BALANCER_ENABLED = SD_ROLE in ("balancer", "all")
SD_AUTH = env_choice("SD_AUTH", ("open", "token"), "open")
SD_NODE_SECRET = env_secret("SD_NODE_SECRET")
SD_NODE_ID = env_str("SD_NODE_ID", socket.gethostname())

# --- Engine (sd_core reads these through CoreConfig) ---------------------------------------------------------------

SD_MODELS_DIR = env_path("SD_MODELS_DIR", BASE_DIR / "models")
SD_DEVICE = _checked_device("SD_DEVICE", env_str("SD_DEVICE", "auto").lower())
SD_DTYPE = env_choice("SD_DTYPE", ("auto", "float32", "float16", "bfloat16"), "auto")
SD_VRAM_BUDGET = env_bytes("SD_VRAM_BUDGET", 0)
SD_RAM_CACHE_MODELS = env_int("SD_RAM_CACHE_MODELS", 2, minimum=0)
SD_ALLOW_PICKLE = env_bool("SD_ALLOW_PICKLE", False)

# --- Node queue and input limits ---------------------------------------------------------------------------------

SD_MAX_QUEUE = env_int("SD_MAX_QUEUE", 100, minimum=1)
SD_MAX_QUEUED_PER_USER = env_int("SD_MAX_QUEUED_PER_USER", 10, minimum=1)
SD_MAX_PIXELS = env_int("SD_MAX_PIXELS", 2048 * 2048, minimum=64 * 64)
SD_MAX_STEPS = env_int("SD_MAX_STEPS", 150, minimum=1)
SD_MAX_BATCH = env_int("SD_MAX_BATCH", 8, minimum=1)
SD_MAX_IMAGE_BYTES = env_bytes("SD_MAX_IMAGE_BYTES", 20 * 1024**2)
SD_MAX_REQUEST_BYTES = env_bytes("SD_MAX_REQUEST_BYTES", 128 * 1024**2)
SD_JOB_RETENTION = env_int("SD_JOB_RETENTION", 3600, minimum=0)

# --- Balancer ----------------------------------------------------------------------------------------------------

SD_NODES = [_checked_url("SD_NODES", url) for url in env_list("SD_NODES")]
_balancer_url = env_str("SD_BALANCER_URL")
SD_BALANCER_URL = _checked_url("SD_BALANCER_URL", _balancer_url) if _balancer_url else ""
SD_HEALTH_INTERVAL = env_float("SD_HEALTH_INTERVAL", 2.0, minimum=0.1)
SD_PIN_TTL = env_int("SD_PIN_TTL", 300, minimum=1)
SD_TASK_MAX_ATTEMPTS = env_int("SD_TASK_MAX_ATTEMPTS", 3, minimum=1)
SD_MAX_TASKS_PER_USER = env_int("SD_MAX_TASKS_PER_USER", 50, minimum=1)
SD_TASK_RETENTION = env_int("SD_TASK_RETENTION", 7 * 24 * 3600, minimum=0)
SD_TASK_DISPATCHER = env_choice("SD_TASK_DISPATCHER", ("thread", "command"), "thread")
_local_node_url = env_str("SD_LOCAL_NODE_URL", "http://127.0.0.1:7860")
SD_LOCAL_NODE_URL = _checked_url("SD_LOCAL_NODE_URL", _local_node_url)
_node_url = env_str("SD_NODE_URL")
SD_NODE_URL = _checked_url("SD_NODE_URL", _node_url) if _node_url else ""
SD_WEBHOOK_SECRET = env_secret("SD_WEBHOOK_SECRET")
SD_WEBHOOK_ALLOW_PRIVATE = env_bool("SD_WEBHOOK_ALLOW_PRIVATE", False)

# --- Django ------------------------------------------------------------------------------------------------------

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_secret("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if SD_AUTH == "token":
        raise ImproperlyConfigured("DJANGO_SECRET_KEY (or DJANGO_SECRET_KEY_FILE) must be set when SD_AUTH=token.")
    SECRET_KEY = INSECURE_DEV_SECRET_KEY
ALLOWED_HOSTS = env_list("DJANGO_ALLOWED_HOSTS", ["127.0.0.1", "localhost", "[::1]"])
SD_BEHIND_PROXY = env_bool("SD_BEHIND_PROXY", False)
if SD_BEHIND_PROXY:
    # Only behind Apache, which always overwrites the header; a direct client could otherwise claim https.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SD_SERVE_STATIC = env_bool("SD_SERVE_STATIC", True)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "corsheaders",
    "drf_spectacular",
    # Both apps in every role: one database schema whatever the role; SD_ROLE decides which URLs are served.
    "gpu_node",
    "balancer",
]

MIDDLEWARE = [
    "sd_multi.request_log.RequestLogMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "corsheaders.middleware.CorsMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "sd_multi.urls"
WSGI_APPLICATION = "sd_multi.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "sd_multi" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": _database(env_secret("DATABASE_URL", f"sqlite:///{VAR_DIR / 'db.sqlite3'}"))}
CACHES = {"default": _cache(env_secret("CACHE_URL") or env_secret("REDIS_URL"))}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "static"
MEDIA_URL = "media/"
MEDIA_ROOT = env_path("MEDIA_ROOT", VAR_DIR / "media")

# Base64 images make big JSON bodies; Django's 2.5 MB default would refuse an ordinary img2img call.
DATA_UPLOAD_MAX_MEMORY_SIZE = SD_MAX_REQUEST_BYTES

CORS_ALLOWED_ORIGINS = env_list("SD_CORS_ALLOWED_ORIGINS")
CORS_ALLOW_HEADERS = (*default_headers, "x-user-id")

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.AllowAny"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "sd-multi",
    "DESCRIPTION": "The AUTOMATIC1111 webui API served to many users by GPU nodes, and the balancer in front of them.",
    "VERSION": SD_VERSION,
    "SERVE_INCLUDE_SCHEMA": False,
}

SD_LOG_LEVEL = env_choice("SD_LOG_LEVEL", ("debug", "info", "warning", "error", "critical"), "info").upper()
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"line": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "line"}},
    "root": {"handlers": ["stderr"], "level": SD_LOG_LEVEL},
    # Django's own console handler would print its records a second time under DEBUG.
    "loggers": {"django": {"handlers": [], "level": SD_LOG_LEVEL}},
}
