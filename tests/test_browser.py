"""The demo in a real headless browser: Debian's chromium driven by Playwright.

A file is dropped on the upload area with a real drop event (a DataTransfer dispatched on it),
the overlay appears, the opacity slider re-renders it, and the downloaded map has the image's
size. Screenshots (desktop and phone width) are saved in each test's tmp dir.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from app_process import ROOT, shared_app
from PIL import Image

# The drop event, flags and selectors the app benchmark drives the page with: one definition.
from bench.app import CHROMIUM, DROP, DROP_ZONE, LAUNCH_ARGS

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)")
sync_api = pytest.importorskip("playwright.sync_api")

TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def app():
    return shared_app()  # `python app.py` serving a tiny random-init model, shared with test_app.py


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        yield browser
        browser.close()


def test_image(h: int = 480, w: int = 640) -> np.ndarray:
    """A structured 640 x 480 photo stand-in: colour gradients with a bright disc."""
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h * 0.4) ** 2 + (xx - w * 0.65) ** 2) < (h / 6) ** 2
    rgb = np.stack([xx / w * 220, yy / h * 180, 60 + disc * 190], axis=2)
    return rgb.astype(np.uint8)


test_image.__test__ = False  # a helper, not a test


def drop(page, path: Path, mime: str) -> None:
    page.wait_for_selector(DROP_ZONE, timeout=TIMEOUT_MS)
    page.evaluate(DROP, {"selector": DROP_ZONE, "b64": base64.b64encode(path.read_bytes()).decode(), "name": path.name, "type": mime})


def fetch_image(page, url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(page.request.get(url).body())).convert("RGB")).astype(np.int16)


def test_drop_adjust_opacity_and_download(browser, app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(app.url)
    photo = test_image()
    Image.fromarray(photo).save(tmp_path / "street.jpg", quality=92)
    page.wait_for_selector(DROP_ZONE, timeout=TIMEOUT_MS)
    assert page.locator("#download-map").is_disabled()  # nothing to download yet

    drop(page, tmp_path / "street.jpg", "image/jpeg")
    overlay = page.locator("#overlay img")
    overlay.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('inference')", timeout=TIMEOUT_MS)
    status = page.inner_text("#status")
    assert "640 × 480 px" in status and ("CPU" in status or "CUDA" in status)
    assert "predicted attention" in page.inner_text("#stats")
    page.screenshot(path=tmp_path / "desktop-overlay.png", full_page=True)
    first_src = overlay.get_attribute("src")
    first = fetch_image(page, first_src)
    assert first.shape == (480, 640, 3)

    page.locator("#opacity input[type=range]").fill("0.1")
    page.wait_for_function(
        "(src) => { const img = document.querySelector('#overlay img'); return img && img.src !== src; }",
        arg=first_src,
        timeout=TIMEOUT_MS,
    )
    second = fetch_image(page, overlay.get_attribute("src"))
    page.screenshot(path=tmp_path / "desktop-opacity-0.1.png", full_page=True)
    # Lower opacity: the overlay moved towards the photo (the preview is WebP, hence the tolerance).
    assert np.abs(second - first).mean() > 2
    assert np.abs(second - photo).mean() < np.abs(first - photo).mean()

    page.wait_for_selector("#download-map:not([disabled])", timeout=TIMEOUT_MS)  # once the PNGs are written
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-map")
    saved = tmp_path / info.value.suggested_filename
    info.value.save_as(saved)
    assert saved.name == "street_saliency.png"
    with Image.open(saved) as saliency:
        assert saliency.size == (640, 480) and saliency.mode == "I;16"

    page.wait_for_selector("#download-overlay:not([disabled])", timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-overlay")
    with Image.open(info.value.path()) as full:
        assert full.size == (640, 480) and full.mode == "RGB"
    assert errors == []
    page.close()


def draw_box(page, label: str, frm: tuple[float, float], to: tuple[float, float]) -> None:
    """Drag a rectangle on the AOI editor's canvas (corners as fractions of it) and name it."""
    canvas = page.locator("#aoi-editor canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    x0, y0 = box["x"] + box["width"] * frm[0], box["y"] + box["height"] * frm[1]
    x1, y1 = box["x"] + box["width"] * to[0], box["y"] + box["height"] * to[1]
    page.mouse.move(x0, y0)
    page.mouse.down()
    page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=5)
    page.mouse.move(x1, y1, steps=5)
    page.mouse.up()
    name = page.locator("#model-box-edit input").first  # the editor asks for the box's label
    name.wait_for(timeout=TIMEOUT_MS)
    name.fill(label)
    name.press("Enter")
    if page.locator("#model-box-edit").is_visible():
        page.locator("#model-box-edit button", has_text="OK").click()


def test_draw_an_aoi_then_compare_and_download_the_report(browser, app, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(app.url)
    Image.fromarray(test_image()).save(tmp_path / "poster.jpg", quality=92)
    drop(page, tmp_path / "poster.jpg", "image/jpeg")
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('inference')", timeout=TIMEOUT_MS)
    page.locator("#focus img").wait_for(timeout=TIMEOUT_MS)  # the focus map is shown without asking

    draw_box(page, "logo", (0.5, 0.2), (0.8, 0.6))
    page.wait_for_function("() => document.querySelector('#aoi-table').innerText.includes('logo')", timeout=TIMEOUT_MS)
    row = page.inner_text("#aoi-table")
    assert "%" in row and "×" in row
    page.screenshot(path=tmp_path / "desktop-aoi.png", full_page=True)

    page.wait_for_selector("#download-csv:not([disabled])", timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-csv")
    text = Path(info.value.path()).read_text(encoding="utf-8-sig")
    assert text.startswith("image,aoi,attention_share") and "poster.jpg,logo," in text
    page.wait_for_selector("#download-report:not([disabled])", timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as info:
        page.click("#download-report")
    assert info.value.suggested_filename == "poster_report.png"
    with Image.open(info.value.path()) as report:
        report.load()  # it opens and decodes
        assert report.mode == "RGB" and report.width == 1600

    page.get_by_role("tab", name="Viewing order").click()
    page.locator("#order img").wait_for(timeout=TIMEOUT_MS)
    assert "not a scanpath model" in page.inner_text("#analysis-views")

    page.get_by_role("tab", name="Compare").click()
    Image.fromarray(test_image()[:, ::-1]).save(tmp_path / "poster-b.jpg", quality=92)
    page.locator("#compare-input input[type=file]").set_input_files([tmp_path / "poster.jpg", tmp_path / "poster-b.jpg"])
    page.wait_for_timeout(500)
    page.click("#compare-go")
    page.wait_for_function("() => document.querySelector('#compare-table').innerText.includes('Larger share')", timeout=TIMEOUT_MS)
    table = page.inner_text("#compare-table")
    assert "logo" in table and "poster-b.jpg" in table
    assert page.locator("#compare-gallery img").count() >= 2
    # Whole variants: nothing cropped (contain) and no inner scroll box hiding their lower part.
    page.wait_for_timeout(300)
    fits = page.evaluate("""() => [...document.querySelectorAll('#compare-gallery img')].map(img => {
        const wrap = img.closest('.grid-wrap'), r = img.getBoundingClientRect(), w = wrap.getBoundingClientRect();
        return {fit: getComputedStyle(img).objectFit, inside: r.bottom <= w.bottom + 1, scrolls: wrap.scrollHeight > wrap.clientHeight + 1};
    })""")
    assert fits and all(f["fit"] == "contain" and f["inside"] and not f["scrolls"] for f in fits), fits
    page.screenshot(path=tmp_path / "desktop-compare.png", full_page=True)
    assert errors == []
    page.close()


def test_phone_width_example_and_before_after(browser, app, tmp_path):
    page = browser.new_page(viewport={"width": 390, "height": 844}, device_scale_factor=2, is_mobile=True, has_touch=True)
    page.goto(app.url)
    page.wait_for_selector("#examples", timeout=TIMEOUT_MS)
    page.screenshot(path=tmp_path / "phone-start.png", full_page=True)
    page.locator("#examples button").first.click()  # an example image shipped with the app
    overlay = page.locator("#overlay img")
    overlay.wait_for(timeout=TIMEOUT_MS)
    page.wait_for_function("() => document.querySelector('#status').innerText.includes('inference')", timeout=TIMEOUT_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    # The columns stack on a phone: the page scrolls the result up, from below the photo into view.
    page.wait_for_function("() => { const r = document.querySelector('#overlay').getBoundingClientRect(); "
                           "return r.top >= 0 && r.top < window.innerHeight / 2; }", timeout=TIMEOUT_MS)  # fmt: skip
    assert "phones hide it" in page.inner_text("body")
    box = overlay.bounding_box()
    assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390
    overlay.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "phone-overlay.png", full_page=True)

    page.get_by_role("tab", name="Before / after").click()
    page.locator("#before-after img").first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator("#before-after img").count() >= 2
    page.screenshot(path=tmp_path / "phone-before-after.png", full_page=False)
    # The analysis views and the AOI editor fit the phone's width too.
    for selector in ("#analysis-views", "#aoi-editor", "#aoi-table"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 390, selector
    page.get_by_role("tab", name="Compare").click()
    page.locator("#compare-go").wait_for(timeout=TIMEOUT_MS)
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    page.close()


def test_examples_are_shipped_small_and_sourced():
    examples = sorted((ROOT / "space" / "examples").glob("*.jpg"))
    assert len(examples) >= 3
    sources = (ROOT / "space" / "examples" / "SOURCES.md").read_text()
    for path in examples:
        assert path.stat().st_size < 150_000 and path.name in sources
