"""WSGI entry point for gunicorn: `gunicorn sd_multi.wsgi:application`.

A process serving the node role starts its queue worker here, one serving the balancer role its health checker and
task dispatcher (not in AppConfig.ready, so that management commands and tests do not start them): a restarted
balancer goes on dispatching its queued tasks before any request arrives.
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

if settings.SD_BALANCER_ENABLED:
    from balancer.dispatcher import ensure_balancer_threads

    ensure_balancer_threads(at_boot=True)
