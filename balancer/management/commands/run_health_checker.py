"""`manage.py run_health_checker`: run the node health checker in the foreground (for deployments that prefer a
separate process to the checker thread each balancer process starts on its first request)."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from balancer.health import HealthChecker


class Command(BaseCommand):
    help = (
        "Check every known node's /node/health each SD_HEALTH_INTERVAL until SIGTERM/SIGINT. Any number may run: the "
        "one holding the cluster's lock (in the cache) checks, the others take over when it stops."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="check every node once, print the result and exit")

    def handle(self, *args: Any, **options: Any) -> None:
        checker = HealthChecker()
        if options["once"]:
            for record in checker.check_round():
                state = "up" if record.healthy else "down"
                self.stdout.write(f"{record.url} {state} {record.status} {record.reason}".rstrip())
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            checker.stop.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"health checker {checker.owner} running")
        checker.run()
