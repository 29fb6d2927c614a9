"""One log line per HTTP request: method, path, status, duration, user and node."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from django.conf import settings
from django.http import HttpRequest, HttpResponse

log = logging.getLogger("sd_multi.requests")


class RequestLogMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        started = time.monotonic()
        response = self.get_response(request)
        if request.path in ("/metrics", "/node/health"):
            return response  # scraped every few seconds; logging them would drown the useful lines
        log.info(
            "%s %s %d %.3fs user=%s node=%s",
            request.method,
            request.path,
            response.status_code,
            time.monotonic() - started,
            _user(request),
            settings.SD_NODE_ID,
        )
        return response


def _user(request: HttpRequest) -> str:
    signed = request.headers.get("X-SD-User", "")
    if signed:
        return signed.split("|", 1)[0]
    user = getattr(request, "user", None)
    if user is not None and getattr(user, "is_authenticated", False):
        return str(user.get_username())
    return request.headers.get("X-User-Id") or "anonymous"
