"""/multi_demo/ in headless Chromium against a real server (`all`, tiny models; once a balancer in front of a separate
node): the form, live progress, results with their infotext, interrupt, readable errors, the gallery, and users kept
apart. Each page fails its test on a console
error or an uncaught exception (conftest.open_page)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable

import pytest
import requests
from PIL import Image

from tests.demo.browser import PHONE, STAFF_PASSWORD, STAFF_USER, DemoPage, wait_for
from tests.processes import ServerProcess

pytestmark = pytest.mark.slow

# Long enough at 64x64 on CPU (~75 steps/s on 2 cores) for the task's progress to be reported while it runs.
PROGRESS_STEPS = 200
LONG_STEPS = 1000  # the server allows SD_MAX_STEPS=1000
QUICK_STEPS = 3

OpenPage = Callable[..., DemoPage]


def unique_prompt(words: str) -> str:
    return f"{words} {uuid.uuid4().hex[:8]}"


def red_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def task(server: ServerProcess, user: str, task_id: str) -> dict[str, object]:
    response = requests.get(f"{server.url}/task/{task_id}", headers={"X-User-Id": user}, timeout=10)
    response.raise_for_status()
    return dict(response.json())


def test_it_loads_the_form_with_the_apis_choices_and_the_status(open_page: OpenPage) -> None:
    demo = open_page()
    page = demo.page
    models = page.locator("#model option").all_inner_texts()
    assert "tiny-sd1" in models
    assert "Euler a" in page.locator("#sampler option").all_inner_texts()
    assert page.locator("#scheduler").input_value() == "automatic"
    assert page.inner_text("#status-nodes") == "1/1 up"
    assert page.inner_text("#whoami") == f"You are {demo.user_id()}"
    assert page.is_disabled("#interrupt")


def test_it_shows_live_progress_then_the_images_with_their_infotext(open_page: OpenPage) -> None:
    demo = open_page()
    prompt = unique_prompt("a red lighthouse")
    demo.fill(prompt=prompt, steps=PROGRESS_STEPS, images=2)
    demo.generate()

    # The bar moves while the task runs, before any image is shown.
    demo.page.wait_for_function(
        "() => { const bar = document.querySelector('#progress');"
        " return bar.value > 0 && bar.value < 1 && !document.querySelector('#results .result-card'); }",
        timeout=60_000,
    )
    assert "%" in demo.progress_text()
    assert demo.page.is_enabled("#interrupt")

    cards = demo.results()
    assert cards.count() == 2
    infotext = cards.first.locator(".infotext").inner_text()
    assert prompt in infotext
    assert f"Steps: {PROGRESS_STEPS}" in infotext
    assert "Size: 64x64" in infotext
    assert "Model: tiny-sd1" in infotext
    seed = int(infotext.split("Seed: ", 1)[1].split(",", 1)[0])
    assert cards.first.locator(".seed").inner_text() == f"Seed {seed}"
    assert cards.first.locator(".node").inner_text().startswith("Node all-")
    assert demo.progress() == 1
    assert demo.page.get_attribute("#results .download", "href", timeout=5000).startswith("blob:")  # type: ignore[union-attr]

    cards.first.locator(".reuse-seed").click()
    assert demo.page.input_value("#seed") == str(seed)
    assert not demo.page.is_checked("#seed-random")


def test_it_makes_images_from_an_uploaded_one(open_page: OpenPage) -> None:
    demo = open_page()
    demo.page.check("input[name=mode][value=img2img]")
    demo.page.set_input_files("#init-image", {"name": "red.png", "mimeType": "image/png", "buffer": red_png()})
    demo.page.wait_for_selector("#init-preview[src^='data:image/png']")
    demo.page.locator("#denoising-strength").fill("0.5")
    demo.fill(prompt=unique_prompt("a red square, redrawn"), steps=QUICK_STEPS * 2)
    demo.generate()
    infotext = demo.results().first.locator(".infotext").inner_text()
    assert "Denoising strength: 0.5" in infotext


def test_it_interrupts_only_this_users_job(open_page: OpenPage, demo_server: ServerProcess) -> None:
    alice, bob = open_page(), open_page()
    alice.fill(prompt=unique_prompt("a long job"), steps=LONG_STEPS)
    alice.generate()
    alice_task = alice.wait_for_task()
    alice.page.wait_for_function("() => document.querySelector('#progress').value > 0", timeout=60_000)

    # Bob's page knows nothing of Alice's job; his own runs after hers is interrupted.
    assert bob.progress_text() == "Idle"
    bob_prompt = unique_prompt("a short job")
    bob.fill(prompt=bob_prompt, steps=QUICK_STEPS)
    bob.generate()
    bob_task = bob.wait_for_task()

    alice.page.click("#interrupt")
    alice.page.wait_for_function("() => document.querySelector('#progress-text').textContent === 'Interrupted'")
    assert alice.message().startswith("Interrupted")
    assert alice.page.is_enabled("#generate")
    assert task(demo_server, alice.user_id(), alice_task)["status"] == "interrupted"

    # The node stopped Alice's job (not just the balancer's record of it), and Bob's ran to the end.
    wait_for(
        lambda: requests.get(f"{demo_server.url}/node/jobs/{alice_task}", timeout=10).json()["status"] == "interrupted",
        what="the node job interrupted",
    )
    assert bob.results().count() == 1
    assert bob_prompt in bob.page.inner_text("#results .infotext")
    assert task(demo_server, bob.user_id(), bob_task)["status"] == "succeeded"


def test_it_shows_a_validation_error_naming_the_field(open_page: OpenPage) -> None:
    demo = open_page()
    demo.fill(prompt=unique_prompt("a bad size"), steps=QUICK_STEPS, size=64)
    demo.page.fill("#width", "65")
    demo.generate()
    demo.page.wait_for_selector("#message.error", timeout=30_000)
    message = demo.message()
    assert message.startswith("Generation failed: width")
    assert "multiple of 8" in message
    assert demo.progress_text() == "Failed"
    assert demo.page.is_enabled("#generate")


def test_it_lists_a_result_in_the_gallery_after_a_reload(open_page: OpenPage) -> None:
    demo = open_page()
    prompt = unique_prompt("a gallery piece")
    demo.fill(prompt=prompt, steps=QUICK_STEPS, seed=1234)
    demo.generate()
    demo.results()

    demo.page.reload()
    demo.wait_until_ready()
    cards = demo.gallery_texts()
    assert len(cards) == 1
    assert prompt in cards[0]
    assert "Seed 1234" in cards[0]
    assert demo.page.inner_text("#gallery-page-label") == "Page 1 of 1 · 1 generation"
    # The page shows the last task's images again after the reload.
    assert demo.results().count() == 1


def test_it_keeps_two_users_images_apart(open_page: OpenPage, demo_server: ServerProcess) -> None:
    alice, bob = open_page(), open_page()
    assert alice.user_id() != bob.user_id()
    alice_prompt, bob_prompt = unique_prompt("a cat of alice"), unique_prompt("a dog of bob")
    for demo, prompt in ((alice, alice_prompt), (bob, bob_prompt)):
        demo.fill(prompt=prompt, steps=QUICK_STEPS)
        demo.generate()
    alice_task, bob_task = alice.wait_for_task(), bob.wait_for_task()
    alice.results(), bob.results()

    for demo in (alice, bob):
        demo.page.reload()
        demo.wait_until_ready()
    alice_gallery, bob_gallery = " ".join(alice.gallery_texts()), " ".join(bob.gallery_texts())
    assert alice_prompt in alice_gallery and bob_prompt not in alice_gallery
    assert bob_prompt in bob_gallery and alice_prompt not in bob_gallery

    # Neither can read the other's task or its images, through the task API or the gallery's.
    as_alice, as_bob = {"X-User-Id": alice.user_id()}, {"X-User-Id": bob.user_id()}
    assert requests.get(f"{demo_server.url}/task/{bob_task}", headers=as_alice, timeout=10).status_code == 404
    task_image = str(task(demo_server, bob.user_id(), bob_task)["result"]["images"][0])  # type: ignore[index]
    assert requests.get(task_image, headers=as_alice, timeout=10).status_code == 404
    gallery = requests.get(f"{demo_server.url}/multi_demo/api/gallery", headers=as_bob, timeout=10).json()
    gallery_image = demo_server.url + gallery["items"][0]["images"][0]["url"]
    assert requests.get(gallery_image, headers=as_alice, timeout=10).status_code == 404
    assert requests.get(gallery_image, headers=as_bob, timeout=10).status_code == 200
    assert alice_task != bob_task


def test_it_shows_everyone_to_staff_only(open_page: OpenPage, demo_server: ServerProcess, staff_user: str) -> None:
    guest = open_page()
    prompt = unique_prompt("a tree of a guest")
    guest.fill(prompt=prompt, steps=QUICK_STEPS)
    guest.generate()
    guest.results()
    assert not guest.page.is_visible("#gallery-scope")
    everyone = requests.get(
        f"{demo_server.url}/multi_demo/api/gallery?scope=all", headers={"X-User-Id": guest.user_id()}, timeout=10
    )
    assert everyone.status_code == 403

    staff = open_page(load=False)
    staff.page.goto(f"{demo_server.url}/multi_demo/login/")
    staff.log_in(staff_user, STAFF_PASSWORD)
    assert staff.page.inner_text("#whoami") == f"Signed in as {staff_user} (staff)"
    assert prompt not in " ".join(staff.gallery_texts())
    staff.page.select_option("#gallery-scope", "all")
    staff.page.wait_for_selector(f"#gallery .gallery-card:has-text('{prompt}') img[src]")
    assert f"User {guest.user_id()}" in " ".join(staff.gallery_texts())


def test_it_asks_for_a_login_in_token_mode(open_page: OpenPage, token_server: ServerProcess) -> None:
    demo = open_page(load=False, server=token_server)
    demo.page.goto(f"{token_server.url}/multi_demo/")
    assert demo.page.url == f"{token_server.url}/multi_demo/login/?next=/multi_demo/"
    demo.log_in(STAFF_USER, STAFF_PASSWORD)
    assert demo.page.inner_text("#whoami") == f"Signed in as {STAFF_USER} (staff)"

    # The page's calls go with the session and its CSRF token; X-User-Id means nothing here.
    prompt = unique_prompt("a logged-in lighthouse")
    demo.fill(prompt=prompt, steps=QUICK_STEPS)
    demo.generate()
    assert prompt in demo.results().first.locator(".infotext").inner_text()
    demo.page.wait_for_selector(f"#gallery .gallery-card:has-text('{prompt}') img[src]")

    demo.page.click("#logout")
    demo.page.wait_for_url(f"{token_server.url}/multi_demo/login/?next=/multi_demo/")


def test_it_fits_a_phone_screen(open_page: OpenPage) -> None:
    demo = open_page(PHONE)
    demo.fill(prompt=unique_prompt("a small screen"), steps=QUICK_STEPS)
    demo.generate()
    demo.results()
    width = demo.page.evaluate("() => document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"the page scrolls sideways on a phone ({width} px wide)"
    form = demo.page.locator("#generate-form").bounding_box()
    output = demo.page.locator(".output").bounding_box()
    assert form is not None and output is not None
    assert output["y"] >= form["y"] + form["height"], "the output goes below the form on a phone"


def test_it_works_served_by_a_balancer_in_front_of_a_separate_node(
    open_page: OpenPage, balancer_server: ServerProcess
) -> None:
    demo = open_page(server=balancer_server)
    assert "tiny-sd1" in demo.page.locator("#model option").all_inner_texts(), "the node's models, through the proxy"
    demo.page.wait_for_function("() => document.querySelector('#status-nodes').textContent === '1/1 up'")
    prompt = unique_prompt("a lighthouse behind a balancer")
    demo.fill(prompt=prompt, steps=QUICK_STEPS)
    demo.generate()
    card = demo.results().first
    assert prompt in card.locator(".infotext").inner_text()
    assert card.locator(".node").inner_text().startswith("Node node-"), "generated on the separate node"
    demo.page.wait_for_selector(f"#gallery .gallery-card:has-text('{prompt}') img[src]")
