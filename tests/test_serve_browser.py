"""The live page in a real browser: Debian's headless Chromium driven by Playwright against a real server.

It types a prompt, presses Generate, sees an intermediate step with grey mask blocks, then the final text
with no mask left, checks the replay slider, and saves a screenshot. The README's screenshot comes from
``TEXTDIFFUSION_SCREENSHOT=docs/serve-page.png pytest tests/test_serve_browser.py``; by default it goes to a
temporary folder, so a test run leaves the checkout unchanged.
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("uvicorn")

from test_guidance import toy  # noqa: E402,F401  (the toy model and its guide: rivers vs numbers)
from test_serve import generator, live_server  # noqa: E402,F401  (the module-scoped model fixture)

CHROMIUM = "/usr/bin/chromium"
needs_chromium = pytest.mark.skipif(
    not shutil.which("chromium") and not os.path.exists(CHROMIUM),
    reason="Debian's chromium is not installed (apt-get install chromium chromium-driver; .ci/run does)")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextmanager
def chromium_page():
    """A page of Debian's headless Chromium, closed afterwards."""
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser.new_page(viewport={"width": 1100, "height": 720})
        finally:
            browser.close()


@pytest.mark.slow
@needs_chromium
def test_the_page_shows_masks_then_the_final_text(generator, tmp_path):  # noqa: F811
    with live_server(generator, max_batch=8, max_queue=8) as url, chromium_page() as page:
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url + "/")
        page.fill("#prompt", "The history of the river")
        page.fill("#steps", "24")
        page.fill("#max_length", "48")
        page.fill("#seed", "3")
        page.fill("#frame_ms", "150")
        page.click("#generate")
        # an intermediate step: some tokens shown, some positions still grey mask blocks
        page.wait_for_function(
            "() => document.querySelectorAll('#text .tok.mask').length > 0"
            " && document.querySelectorAll('#text .tok.gen').length > 0", timeout=30000)
        step = page.text_content("#step")
        assert step and not step.startswith("0 ")
        page.wait_for_selector("#state[data-state='done']", timeout=60000)
        page.wait_for_function("() => document.querySelectorAll('#text .tok.mask').length === 0")
        text = page.inner_text("#text")
        assert text.startswith("The history of the river") and len(text) > len("The history of the river") + 10
        assert int(page.text_content("#calls")) >= 1
        # the confidence colours are there, and the slider replays the first frame (all masked)
        assert page.eval_on_selector("#text .tok.gen", "e => e.style.background") != ""
        page.eval_on_selector("#slider", "e => { e.value = 0; e.dispatchEvent(new Event('input')); }")
        assert page.locator("#text .tok.mask").count() == 48 - 2 - len(
            generator.tokenizer("The history of the river", add_special_tokens=False)["input_ids"])
        page.eval_on_selector("#slider", "e => { e.value = Math.floor(e.max / 2); e.dispatchEvent(new Event('input')); }")
        SCREENSHOT = Path(os.environ.get("TEXTDIFFUSION_SCREENSHOT") or tmp_path / "serve-page.png")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size > 10_000
        assert all(r.startswith(url) for r in requests), [r for r in requests if not r.startswith(url)]


@pytest.mark.slow
@needs_chromium
def test_the_label_row_steers_a_request(toy):  # noqa: F811
    """A checkpoint served with a guide: the page offers its labels and methods, and the request it sends carries
    the label, the method and its strength; the guided run streams to the end."""
    import json

    from textdiffusion.pipelines.generation import DiffusionGenerator

    data, checkpoint, guide_dir = toy
    toy_generator = DiffusionGenerator.from_pretrained(checkpoint, device="cpu")
    guide = toy_generator.open_guide(guide_dir)
    with live_server(toy_generator, max_batch=16, max_queue=8, guide=guide) as url, chromium_page() as page:
        bodies = []
        page.on("request", lambda r: bodies.append(r.post_data) if r.url.endswith("/v1/generate") else None)
        page.goto(url + "/")
        page.wait_for_selector("#guidance_controls:not([hidden])", timeout=10000)
        assert page.eval_on_selector_all("#label option", "os => os.map(o => o.value)") == ["", "numbers", "rivers"]
        assert page.eval_on_selector_all("#guidance option", "os => os.map(o => o.value)") == ["classifier", "smc"]
        page.fill("#prompt", "the")
        page.fill("#max_length", "12")
        page.fill("#steps", "8")
        page.fill("#frame_ms", "0")
        page.select_option("#label", "rivers")
        page.select_option("#guidance", "smc")
        page.fill("#guidance_scale", "3")
        page.fill("#particles", "3")
        page.click("#generate")
        page.wait_for_selector("#state[data-state='done'], #state[data-state='error']", timeout=60000)
        assert page.get_attribute("#state", "data-state") == "done", page.inner_text("body")
        assert page.locator("#text .tok.mask").count() == 0 and page.locator("#text .tok.gen").count() >= 6
        body = json.loads(bodies[-1])
        assert (body["label"], body["guidance"], body["guidance_scale"], body["particles"]) == ("rivers", "smc", 3, 3)


@pytest.mark.slow
@needs_chromium
def test_the_page_asks_for_the_key_once_and_sends_it_on_every_call(generator):  # noqa: F811
    key = "page-key-0123456789abcdef"
    with live_server(generator, max_batch=8, max_queue=8, api_keys={key: "page"}) as url, chromium_page() as page:
        asked, calls = [], []
        page.on("dialog", lambda d: (asked.append(d.message), d.accept(key)))
        page.on("request", lambda r: calls.append((r.url, r.headers.get("authorization"))) if "/v1/" in r.url else None)
        page.goto(url + "/")
        page.wait_for_function("() => document.querySelector('#model').textContent.includes('positions')",
                               timeout=10000)  # /v1/models answered once the key was given
        page.fill("#prompt", "The river")
        page.fill("#max_length", "24")
        page.fill("#steps", "4")
        page.fill("#frame_ms", "0")
        page.click("#generate")
        page.wait_for_selector("#state[data-state='done']", timeout=60000)
        page.click("#generate")  # a second run: the key is kept for the tab, nothing is asked again
        page.wait_for_selector("#state[data-state='done']", timeout=60000)
    assert len(asked) == 1 and "API key" in asked[0]
    generates = [auth for u, auth in calls if u.endswith("/v1/generate")]
    assert len(generates) == 2 and all(auth == f"Bearer {key}" for auth in generates)
    assert all(key not in u for u, _ in calls)  # never in an address
