"""App configuration for balancer."""

from __future__ import annotations

from django.apps import AppConfig


class BalancerConfig(AppConfig):
    name = "balancer"
    verbose_name = "Balancer"
    default_auto_field = "django.db.models.BigAutoField"
