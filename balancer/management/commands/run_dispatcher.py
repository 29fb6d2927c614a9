"""`manage.py run_dispatcher`: run the task dispatcher (and the health checker it routes by) in the foreground."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from balancer.dispatcher import Dispatcher
from balancer.health import ensure_health_checker


class Command(BaseCommand):
    help = (
        "Dispatch queued async tasks to the GPU nodes until SIGTERM/SIGINT. Any number may run: the one holding "
        "the database lease dispatches, the others take over when it stops."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--once", action="store_true", help="run one pass and exit (cron, scripts)")

    def handle(self, *args: Any, **options: Any) -> None:
        ensure_health_checker()
        dispatcher = Dispatcher()
        if options["once"]:
            moved = dispatcher.process_one()
            dispatcher.release()
            self.stdout.write("tasks moved" if moved else "nothing to do")
            return

        def stop(signum: int, frame: FrameType | None) -> None:
            dispatcher.stop()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        self.stdout.write(f"dispatcher {dispatcher.owner} running")
        dispatcher.run()
