"""URLs of the /multi_demo/ page, its login/logout and its gallery API; balancer/urls.py includes them."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from balancer import demo_views as views

urlpatterns: list[URLPattern | URLResolver] = [
    path("multi_demo/", views.multi_demo, name="multi-demo"),
    path("multi_demo/login/", views.DemoLoginView.as_view(), name="multi-demo-login"),
    path("multi_demo/logout/", views.DemoLogoutView.as_view(), name="multi-demo-logout"),
    path("multi_demo/api/gallery", views.GalleryView.as_view(), name="multi-demo-gallery"),
    path("multi_demo/api/images/<uuid:task_id>/<str:name>", views.GalleryImageView.as_view(), name="multi-demo-image"),
]
