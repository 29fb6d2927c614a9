"""WSGI entry point for gunicorn: `gunicorn sd_multi.wsgi:application`.

A process serving the node role starts its queue worker here (not in AppConfig.ready, so that management
commands and tests do not start one).
"""

from __future__ import annotations

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "sd_multi.settings")

application = get_wsgi_application()

if settings.SD_NODE_ENABLED:
    from gpu_node.runtime import start_node

    start_node()
