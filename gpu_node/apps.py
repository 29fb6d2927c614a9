"""App configuration for gpu_node."""

from __future__ import annotations

from django.apps import AppConfig


class GpuNodeConfig(AppConfig):
    name = "gpu_node"
    verbose_name = "GPU node"
    default_auto_field = "django.db.models.BigAutoField"
