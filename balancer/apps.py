"""App configuration for balancer."""

from __future__ import annotations

from django.apps import AppConfig


class BalancerConfig(AppConfig):
    name = "balancer"
    verbose_name = "Balancer"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        # The registry's signal receivers keep the cached node snapshot in step with admin edits. The health
        # checker and the task dispatcher are not started here (management commands and tests would start them):
        # the WSGI entry point and every balancer request start them (balancer.dispatcher.ensure_balancer_threads),
        # or `manage.py run_health_checker` and `manage.py run_dispatcher` run them.
        from balancer import registry  # noqa: F401
