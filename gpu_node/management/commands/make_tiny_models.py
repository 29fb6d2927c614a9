"""`manage.py make_tiny_models`: write the tiny random-weight test models into SD_MODELS_DIR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from sd_core.tiny import write_tiny_models


class Command(BaseCommand):
    help = "Write tiny seeded SD1.x/SDXL checkpoints (single-file and diffusers), a LoRA and a VAE into SD_MODELS_DIR."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
        parser.add_argument("--models-dir", type=Path, default=None, help="default: SD_MODELS_DIR")

    def handle(self, *args: Any, **options: Any) -> None:
        models_dir = options["models_dir"] or Path(settings.SD_MODELS_DIR)
        files = write_tiny_models(models_dir, overwrite=options["overwrite"], progress=self.stdout.write)
        for path in (files.sd1_single_file, files.sd1_diffusers, files.sdxl_single_file, files.sdxl_diffusers):
            self.stdout.write(f"checkpoint: {path}")
        self.stdout.write(f"lora: {files.lora}\nvae: {files.vae}")
