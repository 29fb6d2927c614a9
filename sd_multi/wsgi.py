"""WSGI entry point for gunicorn: `gunicorn sd_multi.wsgi:application`."""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sd_multi.settings")

application = get_wsgi_application()
