"""App configuration for balancer."""

from __future__ import annotations

from django.apps import AppConfig


class BalancerConfig(AppConfig):
    name = "balancer"
    verbose_name = "Balancer"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The registry's signal receivers keep the cached node snapshot in step with admin edits. The health
        # checker is not started here (management commands and tests would start one): the first balancer
        # request starts it (balancer.health.ensure_health_checker), or `manage.py run_health_checker` runs it.
        from balancer import registry  # noqa: F401
