"""Django admin for nodes: the list shows each node's health (from the cache), actions drain and undrain; deleting a
node removes it (a node listed in SD_NODES comes back until it is removed from there)."""

from __future__ import annotations

import time

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from balancer import health, registry
from balancer.models import Node


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = (
        "url", "name", "source", "draining", "health_status", "is_healthy", "queue_depth", "loaded_models",
        "checked", "last_heartbeat",
    )  # fmt: skip
    list_filter = ("source", "draining")
    search_fields = ("url", "name")
    readonly_fields = ("source", "last_heartbeat", "created_at")
    actions = ("drain", "undrain")

    def _health(self, node: Node) -> health.NodeHealth:
        return health.read_health([node.url]).get(node.url) or health.NodeHealth(url=node.url)

    @admin.display(description="status")
    def health_status(self, node: Node) -> str:
        return str(self._health(node).status)

    @admin.display(description="healthy", boolean=True)
    def is_healthy(self, node: Node) -> bool:
        return self._health(node).healthy

    @admin.display(description="queue")
    def queue_depth(self, node: Node) -> int:
        return self._health(node).queue_depth

    @admin.display(description="loaded models")
    def loaded_models(self, node: Node) -> str:
        return ", ".join(self._health(node).loaded_models)

    @admin.display(description="checked")
    def checked(self, node: Node) -> str:
        checked_at = self._health(node).checked_at
        return f"{time.time() - checked_at:.0f} s ago" if checked_at else "never"

    @admin.action(description="Drain: no new pins")
    def drain(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        count = queryset.update(draining=True)
        registry.refresh()
        self.message_user(request, f"{count} node(s) draining.", messages.SUCCESS)

    @admin.action(description="Undrain: take new pins again")
    def undrain(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        count = queryset.update(draining=False)
        registry.refresh()
        self.message_user(request, f"{count} node(s) take new pins.", messages.SUCCESS)
