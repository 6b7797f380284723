"""The web UI in a real browser: the app on a free localhost port, driven by headless Chromium.

Uses the Playwright Python package with Debian's chromium (``apt-get install chromium``; Playwright's own
browser download is not used). Skipped, with the reason, when either is missing; CI installs both
(``.ci/run``).
"""

import os
import re
import shutil
import socket
import urllib.request

import pytest

CHROMIUM = os.environ.get("DIFFUSION_ATTN_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"

pytest.importorskip("gradio", reason='gradio is not installed (pip install -e ".[dev]")')
sync_api = pytest.importorskip("playwright.sync_api", reason='playwright is not installed (pip install -e ".[dev]")')
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)

pytestmark = [pytest.mark.timeout(300), pytest.mark.filterwarnings("ignore:::gradio.queueing")]

TIMEOUT_MS = 90_000  # a generation on the tiny models takes a few seconds; leave room on a busy 2-core box


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    from diffusion_attn.ui import build_demo

    demo = build_demo()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("#da-generate")
    yield page
    page.close()


def _choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def _fill(page, elem_id: str, text: str) -> None:
    box = page.locator(f"#{elem_id}").locator("input, textarea").first
    box.fill(text)
    box.press("Tab")


def _error_toast(page, pattern: str):
    return page.locator(".toast-body").filter(has_text=re.compile(pattern))


def _server_up(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.status == 200


def test_generate_image_then_bad_value_shows_error_and_server_stays_up(page, server):
    _choose(page, "da-model", "tiny-flux-random")
    _choose(page, "da-method", "gna")
    window = page.locator("#da-gna-window")
    window.wait_for(state="visible")
    assert page.locator("#da-radial-decay-factor").is_hidden()  # only the chosen method's controls show
    _fill(page, "da-steps", "2")

    # a bad tuple: a readable error in the page, no traceback
    _fill(page, "da-gna-window", "4,abc")
    page.locator("#da-generate").click()
    toast = _error_toast(page, "window.*tuple of ints")
    toast.first.wait_for(state="visible")
    assert "Traceback" not in page.content()
    assert _server_up(server)

    # fixed: the image, its pattern and the timing metadata appear
    _fill(page, "da-gna-window", "4,6")
    page.locator("#da-generate").click()
    page.locator("#da-gallery img").first.wait_for(state="visible")
    page.locator("#da-pattern img").first.wait_for(state="visible")
    page.locator("#da-info").filter(has_text="seconds_per_step").wait_for()
    assert page.locator("#da-info").filter(has_text='"window"').count() == 1

    # an out-of-range value on the same page: an error again, and the page still works afterwards
    _choose(page, "da-method", "radial")
    _choose(page, "da-model", "tiny-wan-random")
    _fill(page, "da-radial-decay-factor", "-1")
    page.locator("#da-generate").click()
    _error_toast(page, r"decay_factor.*\[0\.0").first.wait_for(state="visible")
    assert _server_up(server)


def test_video_and_compare_with_dense(page):
    _choose(page, "da-model", "tiny-wan-random")  # the default method: radial
    _fill(page, "da-steps", "2")
    _fill(page, "da-frames", "5")
    _fill(page, "da-radial-dense-steps", "0")
    page.locator("#da-generate").click()
    page.locator("#da-video video, #da-animation img").first.wait_for(state="visible")
    assert page.locator("#da-gallery img").count() >= 1

    page.locator("#da-compare").click()
    page.locator("#da-compare-gallery img, #da-compare-gallery video").first.wait_for(state="visible")
    page.locator("#da-compare-info").filter(has_text="speedup").wait_for()
    assert page.locator("#da-compare-info").filter(has_text="psnr").count() == 1


def test_slider_with_per_model_default_and_pattern_button(page):
    _choose(page, "da-model", "tiny-sd15-random")
    _choose(page, "da-method", "hidiffusion")
    default_box = page.locator("#da-hidiffusion-shift-default input")
    assert default_box.is_checked()  # untouched: the method's own choice
    _fill(page, "da-hidiffusion-shift", "2")
    page.wait_for_function("() => !document.querySelector('#da-hidiffusion-shift-default input').checked")
    assert page.locator("#da-frames").is_hidden()  # an image model has no frame count
    page.locator("#da-pattern-btn").click()
    page.locator("#da-pattern img").first.wait_for(state="visible")
    page.locator("#da-pattern-note").filter(has_text="16x24").wait_for()
