"""URLs of the async task API; balancer/urls.py includes them."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from balancer import task_views as views

urlpatterns: list[URLPattern | URLResolver] = [
    path("task", views.TasksView.as_view(), name="tasks"),
    path("task/<uuid:task_id>", views.TaskView.as_view(), name="task"),
    path("task/<uuid:task_id>/cancel", views.TaskCancelView.as_view(), name="task-cancel"),
    path("task/<uuid:task_id>/images/<str:name>", views.TaskImageView.as_view(), name="task-image"),
]
