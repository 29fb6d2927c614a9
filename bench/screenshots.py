"""Screenshots of /multi_demo/ for the README: a server in `all` with the tiny models (like the browser tests), a few
generations, then the page at desktop (1280x900) and phone (390x844) sizes in Debian's headless Chromium.

    python -m bench.screenshots [--out docs/screenshots]

Writes multi_demo_desktop.png and multi_demo_phone.png; ends with one line: RESULT desktop=<path> phone=<path>
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from sd_core.tiny import write_tiny_models
from tests.demo.browser import (
    CHROMIUM,
    CHROMIUM_INSTALL,
    DESKTOP,
    PHONE,
    DemoPage,
    chromium_available,
    launch_chromium,
    start_demo_server,
)
from tests.processes import REPO

# Earlier generations fill the gallery; the last one is the result on screen.
GALLERY_PROMPTS = ("a lighthouse on a cliff at dawn", "a red fox in the snow", "a bowl of ramen, studio light")
FEATURED_PROMPT = "a watercolor map of an imaginary island"
SETTLE_MS = 600  # the progress bar's CSS transition and the status strip's next answer


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def take(out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    desktop_path, phone_path = out_dir / "multi_demo_desktop.png", out_dir / "multi_demo_phone.png"
    with tempfile.TemporaryDirectory(prefix="sd-screenshots-") as scratch:
        models_dir = Path(scratch) / "models"
        write_tiny_models(models_dir)
        log("starting a server (SD_ROLE=all, tiny models)")
        server = start_demo_server(models_dir, Path(scratch) / "server")
        try:
            with sync_playwright() as playwright:
                browser = launch_chromium(playwright)
                page = browser.new_context(viewport=DESKTOP).new_page()  # type: ignore[arg-type]
                demo = DemoPage(page, server.url).open()
                for index, prompt in enumerate((*GALLERY_PROMPTS, FEATURED_PROMPT)):
                    featured = prompt == FEATURED_PROMPT
                    log(f"generating: {prompt}")
                    demo.fill(prompt=prompt, steps=20, images=4 if featured else 1, seed=1000 + index)
                    if featured:
                        page.fill("#negative-prompt", "blurry, low quality")
                    demo.generate()
                    demo.results()
                page.wait_for_selector("#gallery .gallery-card:nth-child(4) img[src]")
                page.wait_for_timeout(SETTLE_MS)
                page.screenshot(path=str(desktop_path))
                page.set_viewport_size(PHONE)  # type: ignore[arg-type]
                page.evaluate("() => window.scrollTo(0, 0)")
                page.wait_for_timeout(SETTLE_MS)
                page.screenshot(path=str(phone_path))
                browser.close()
        finally:
            server.stop()
    return desktop_path, phone_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "screenshots")
    args = parser.parse_args()
    if not chromium_available():
        sys.exit(f"{CHROMIUM} is missing: {CHROMIUM_INSTALL}")
    desktop, phone = take(args.out)
    print(f"RESULT desktop={desktop} phone={phone}")


if __name__ == "__main__":
    main()
