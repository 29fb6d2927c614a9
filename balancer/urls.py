"""URLs of the balancer app, mounted at the site root when SD_ROLE serves it (sd_multi/urls.py)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
