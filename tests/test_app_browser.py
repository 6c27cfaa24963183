"""The web app in a real headless Chromium (Debian's `chromium` and `chromium-driver`, installed by
scripts/setup.sh; nothing downloads a browser), driven as a person would: pull the demo model from a
`serve` mirror, generate with live previews, find the image in the gallery with its settings, reuse
them, queue two jobs and cancel one, and read a clear error for a bad input.

Screenshots of each step go to $COREML_HUB_SCREENSHOTS, else to a folder under pytest's tmp dir.
The whole visit is one test: the steps build on each other, and it keeps one app and one browser."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from _app_fixtures import DEMO, MODEL, running_app
from coreml_hub.testing.appserver import AppServer

pytestmark = [pytest.mark.slow, pytest.mark.runtime, pytest.mark.extended]  # extended tier: the whole visit in Chromium

CHROMIUM = os.environ.get("COREML_HUB_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("COREML_HUB_CHROMEDRIVER", "/usr/bin/chromedriver")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1280,960")
PROMPT = "a lighthouse on a cliff at dusk"


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))]
    if missing:
        pytest.skip(f"no {' or '.join(missing)}: run scripts/setup.sh (it installs Debian's chromium and "
                    "chromium-driver) to run the browser tests")
    pytest.importorskip("selenium", reason="selenium is part of the test extra: pip install -e '.[test]'")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch anything
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    with running_app(tmp_path_factory.mktemp("app-browser"), extra_args=("--preview-every", "2")) as (_hub, app):
        yield app


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ["COREML_HUB_SCREENSHOTS"]) if os.environ.get("COREML_HUB_SCREENSHOTS") \
        else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Page:
    """The few things a person does on the page, with waits that end as soon as the page is ready."""

    def __init__(self, driver: Any, shots: Path) -> None:
        from selenium.webdriver.common.by import By

        self.driver, self.shots, self.by = driver, shots, By
        self.count = 0

    def wait(self, condition: Callable[[], Any], what: str, timeout: float = 240) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = condition()
            except Exception:  # an element replaced while being read: look again
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                self.shot(f"timeout-{what.replace(' ', '-')}")
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def find(self, css: str) -> Any:
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def all(self, css: str) -> list[Any]:
        return self.driver.find_elements(self.by.CSS_SELECTOR, css)

    def click(self, css: str) -> None:
        """Click once the element is there; the page re-renders lists on every event, so find it anew."""
        self.wait(lambda: self.find(css).click() or True, f"a click on {css}")

    def text(self, css: str, timeout: float = 240) -> str:
        return self.wait(lambda: self.find(css).text, f"the text of {css}", timeout)

    def tab(self, name: str) -> None:
        self.click(f'nav a[data-tab="{name}"]')
        self.wait(lambda: self.find(f"#tab-{name}").is_displayed(), f"the {name} tab")

    def fill(self, css: str, value: str) -> None:
        field = self.find(css)
        field.clear()
        field.send_keys(value)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def shot(self, name: str) -> Path:
        self.count += 1
        path = self.shots / f"{self.count:02d}-{name}.png"
        self.driver.save_screenshot(str(path))
        return path


def record_changes(page: Page) -> None:
    """Watch the page: every progress value, phase text and preview image it showed, as they came."""
    page.js("""
      window.seen = {progress: [], phases: [], previews: []};
      new MutationObserver(() => {
        for (const bar of document.querySelectorAll('#pulls progress, #current-progress'))
          window.seen.progress.push([bar.value, bar.max]);
        for (const node of document.querySelectorAll('#pulls .why, #current-phase'))
          window.seen.phases.push(node.textContent);
        const preview = document.getElementById('preview');
        if (preview.getAttribute('src')) window.seen.previews.push(preview.getAttribute('src').slice(0, 40));
      }).observe(document.body, {subtree: true, childList: true, attributes: true, characterData: true});
    """)


def test_a_visit_pull_generate_gallery_reuse_queue_cancel_and_errors(browser: Any, app: AppServer,
                                                                     shots: Path, tmp_path: Path) -> None:
    page = Page(browser, shots)
    browser.get(app.url + "/#library")
    page.wait(lambda: page.js("return document.body.dataset.ready === 'true'"), "the app to start")
    page.wait(lambda: "live" in page.find("#connection").text, "the live event stream")
    assert page.find("#library-empty").is_displayed()  # nothing pulled yet

    # -- Library: search the mirror, pull the demo model, with progress ---------------------------------
    page.fill("#search-query", "tiny")
    page.find("#search-form button").click()
    result_row = f'#search-results tr[data-repo="{DEMO}"]'
    options = page.wait(lambda: [o.text for o in page.all(f"{result_row} select option")], "the search result")
    assert "original/compiled" in options and "split_einsum/packages" in options
    record_changes(page)
    page.click(f"{result_row} button.pull")
    card = page.text(".pull-job[data-state='done']")
    assert f"Pulled {MODEL}" in card and "Chose original/compiled" in card
    seen = page.js("return window.seen")
    assert any("Downloading original/compiled" in p for p in seen["phases"]), seen["phases"]
    total = app.call("GET", "/api/models").json()["models"][0]["size_bytes"]
    assert [total, total] in [[int(v), int(m)] for v, m in seen["progress"]]
    assert int(page.wait(lambda: page.find(".pull-job progress").get_attribute("max"), "the bar")) == total
    assert "unet" in page.text(f'#library-list tr[data-model="{MODEL}"]')
    page.shot("library-pulled")

    # -- Generate: live progress, a preview, then the image -----------------------------------------------
    page.tab("generate")
    assert page.find("#model").get_attribute("value") == MODEL
    page.fill("#prompt", PROMPT)
    page.fill("#negative_prompt", "fog")
    page.fill("#steps", "24")
    page.fill("#seed", "42")
    page.click("#generate-form details summary")
    page.click("#disable_safety")
    record_changes(page)
    page.click("#generate-button")
    page.wait(lambda: page.find("#preview-box").is_displayed(), "a preview image", timeout=240)
    assert page.find("#preview").get_attribute("src").startswith("data:image/jpeg;base64,")
    assert "preview at step" in page.find("#preview-caption").text
    page.shot("generate-preview")
    result = page.wait(lambda: page.find("#current-results img"), "the finished image")
    page.wait(lambda: page.js("return arguments[0].complete && arguments[0].naturalWidth", result), "the image")
    assert page.js("return arguments[0].naturalWidth", result) == 64
    seen = page.js("return window.seen")
    assert any(p.startswith("data:image/jpeg;base64,") for p in seen["previews"])
    assert any("step" in p and "/25" in p for p in seen["phases"]), seen["phases"][-5:]  # PNDM: 24 steps + 1
    page.shot("generate-done")

    # -- Gallery: the image with its settings, newest first --------------------------------------------------
    page.tab("gallery")
    first_card = "#gallery-grid .card:first-child"
    assert page.wait(lambda: page.find(first_card).get_attribute("data-name"), "the gallery") == \
        "a-lighthouse-on-a-cliff-at-dusk-42.png"
    text = page.text(first_card)
    assert PROMPT in text and "not: fog" in text and "seed 42" in text and "24 steps" in text and "pndm" in text
    assert f"{DEMO}:original/compiled" in text and "64x64" in text
    page.shot("gallery")

    # -- reuse: "same seed" takes the seed alone, "use these settings" takes everything ------------------------
    page.tab("generate")
    page.fill("#prompt", "something else")
    page.fill("#seed", "")
    page.fill("#steps", "3")
    page.tab("gallery")
    page.click(f"{first_card} button.same-seed")
    page.wait(lambda: page.find("#tab-generate").is_displayed(), "the generate tab")
    assert page.find("#seed").get_attribute("value") == "42"
    assert page.find("#prompt").get_attribute("value") == "something else"
    page.tab("gallery")
    page.click(f"{first_card} button.use-settings")
    page.wait(lambda: page.find("#tab-generate").is_displayed(), "the generate tab")
    form = {name: page.find(f"#{name}").get_attribute("value")
            for name in ("prompt", "negative_prompt", "steps", "seed", "scheduler", "guidance_scale", "model")}
    assert form == {"prompt": PROMPT, "negative_prompt": "fog", "steps": "24", "seed": "42", "scheduler": "pndm",
                    "guidance_scale": "7.5", "model": MODEL}
    page.shot("reuse-settings")
    # the same settings make the same image
    page.click("#generate-button")

    def new_result() -> str | None:  # the first image stays shown until the new job's page state arrives
        name = page.find("#current-results img").get_attribute("src").rsplit("/", 1)[1]
        return name if name != "a-lighthouse-on-a-cliff-at-dusk-42.png" else None

    again_name = page.wait(new_result, "the image made again")
    assert again_name == "a-lighthouse-on-a-cliff-at-dusk-42-1.png"
    assert (app.outputs / again_name).read_bytes() != b""
    from PIL import Image
    import numpy as np

    with Image.open(app.outputs / again_name) as a, Image.open(app.outputs / "a-lighthouse-on-a-cliff-at-dusk-42.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))

    # -- Queue: two jobs in line, cancel the running one, the other finishes ------------------------------------
    # 8 images of 500 steps: long enough on a quiet machine too (the tiny model makes ~50 steps/s)
    page.fill("#steps", "500")
    page.fill("#num_images", "8")
    page.fill("#prompt", "a long one")
    page.click("#generate-button")
    page.wait(lambda: "Generating" in page.find("#current-phase").text, "the long job to run")
    page.fill("#steps", "3")
    page.fill("#num_images", "1")
    page.fill("#prompt", "a short one")
    page.click("#generate-button")
    page.tab("queue")
    assert "a long one" in page.text("#queue-list tr[data-state='running']")
    queued = page.text("#queue-list tr[data-state='queued']")
    assert "a short one" in queued and "queued (#1)" in queued
    assert page.text("#queue-count") == "(2)"
    page.shot("queue-two-jobs")
    page.click("#queue-list tr[data-state='running'] button.cancel")
    cancelled = page.text("#queue-list tr[data-state='cancelled']")
    assert "a long one" in cancelled and "Cancelled at step" in cancelled
    page.wait(lambda: any("a short one" in r.text and r.find_elements(page.by.CSS_SELECTOR, "img.thumb")
                          for r in page.all("#queue-list tr[data-state='done']")), "the queued job to finish")
    page.shot("queue-cancelled-and-done")

    # -- a bad input: a clear error beside the form, naming the field --------------------------------------------
    page.tab("generate")
    page.fill("#steps", "0")
    page.click("#generate-button")
    assert page.wait(lambda: page.find("#form-error").is_displayed() and page.find("#form-error").text,
                     "the error") == "`steps` must be between 1 and 500, got 0."
    assert page.find("#steps").get_attribute("aria-invalid") == "true"
    page.shot("bad-input")
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is not an image")
    page.fill("#steps", "3")
    page.find("#init_image_file").send_keys(str(not_an_image))
    page.wait(lambda: "not an image" in page.find("#form-error").text, "the upload error")
    page.shot("bad-upload")

    # -- delete an image from the gallery ------------------------------------------------------------------------------
    page.tab("gallery")
    count = len(page.all("#gallery-grid .card"))
    page.click('#gallery-grid .card[data-name="a-lighthouse-on-a-cliff-at-dusk-42-1.png"] button.delete')
    browser.switch_to.alert.accept()
    page.wait(lambda: len(page.all("#gallery-grid .card")) == count - 1, "the card to go")
    assert not (app.outputs / "a-lighthouse-on-a-cliff-at-dusk-42-1.png").exists()
    page.shot("gallery-after-delete")
    taken = sorted(shots.glob("*.png"))
    assert [p.name.split("-", 1)[1] for p in taken if not p.name.split("-", 1)[1].startswith("timeout")] == [
        "library-pulled.png", "generate-preview.png", "generate-done.png", "gallery.png", "reuse-settings.png",
        "queue-two-jobs.png", "queue-cancelled-and-done.png", "bad-input.png", "bad-upload.png",
        "gallery-after-delete.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in taken)
