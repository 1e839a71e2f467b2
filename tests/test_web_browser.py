"""The web face in a real browser: headless Chromium (Debian's chromium and chromium-driver,
driven by Selenium; no browser download).

- the dashboard lists the stored studies, a study page shows its series thumbnails (decoded
  images, not broken icons), the sites page shows a site that was made unreachable as down;
- the OHIF viewer (npm @ohif/app, served by `pacsgrid serve --viewer`) opens a study through
  pacsgrid's DICOMweb and renders it: the pixels of the viewport in a screenshot must form an
  image (many grey levels, real contrast), not an empty or black canvas.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, Server
from tests.corpus import accepted
from tests.waiting import wait_until
from tests.web_helpers import multipart_body, start_web

pytestmark = [pytest.mark.slow, pytest.mark.browser]

OHIF = Path(os.environ.get("PACSGRID_OHIF_DIR", REPO / ".cache/ohif/3.13.2/dist"))
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(tool).exists():
            pytest.fail(
                f"{tool} missing: install Debian's chromium and chromium-driver (scripts/test)"
            )
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str, Path]]:
    if not (OHIF / "index.html").is_file():
        pytest.fail(f"no OHIF viewer in {OHIF}: scripts/test installs it (npm @ohif/app)")
    work = tmp_path_factory.mktemp("browser")
    spare = work / "spare-site"
    cfg = work / "sites.toml"
    cfg.write_text(
        f'[[sites]]\nname = "main"\nurl = "{work / "main-site"}"\n'
        f'[[sites]]\nname = "spare"\nurl = "{spare}"\nlocation = "other"\n'
    )
    server, base = start_web(work / "archive", extra=("--config", str(cfg), "--viewer", str(OHIF)))
    files = [
        f.path.read_bytes() for f in accepted() if f.path.name in ("CT_small.dcm", "MR_small.dcm")
    ]
    by_study = {f.study_uid: f for f in accepted()}
    files += [f.path.read_bytes() for f in list(by_study.values())[:8]]
    body, ctype = multipart_body(files)
    r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    yield server, base, spare
    server.stop()


def _wait(driver: object, condition, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    """Until `condition(driver)`; an element the page replaced while the condition read it
    (a reload, a navigation) is looked up again at the next poll."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    WebDriverWait(driver, timeout, ignored_exceptions=ignored).until(condition)


def test_dashboard_lists_studies(browser, site) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    _, base, _ = site
    studies = requests.get(base + "/dicom-web/studies").json()
    browser.get(base + "/")
    rows = browser.find_elements(By.CSS_SELECTOR, "#studies tr.study")
    assert len(rows) == len(studies) >= 3
    assert any("CT" in r.text for r in rows)
    box = browser.find_element(By.NAME, "ModalitiesInStudy")
    box.send_keys("MR")
    box.submit()
    _wait(browser, lambda d: "ModalitiesInStudy=MR" in d.current_url)
    rows = browser.find_elements(By.CSS_SELECTOR, "#studies tr.study")
    assert rows and all("MR" in r.text for r in rows)


def test_study_page_shows_thumbnails(browser, site) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    _, base, _ = site
    ct = next(f for f in accepted() if f.path.name == "CT_small.dcm")
    browser.get(base + "/")
    link = browser.find_element(By.CSS_SELECTOR, f"#studies a[href='/ui/studies/{ct.study_uid}']")
    link.click()
    _wait(browser, lambda d: "/ui/studies/" in d.current_url)
    imgs = browser.find_elements(By.CSS_SELECTOR, ".thumb img")
    assert imgs
    _wait(
        browser,
        lambda d: all(
            d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", i)
            for i in imgs
        ),
    )
    for img in imgs:
        assert browser.execute_script("return arguments[0].naturalWidth", img) > 16


def test_sites_page_shows_an_unreachable_site_as_down(browser, site) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By

    _, base, spare = site
    browser.get(base + "/ui/sites")
    rows = {
        r.get_attribute("data-site"): r for r in browser.find_elements(By.CSS_SELECTOR, "tr.site")
    }
    assert rows["spare"].get_attribute("data-up") == "true"
    moved = spare.with_name("spare-gone")
    shutil.move(spare, moved)  # the volume disappears (unmounted, unreachable)
    try:

        def shown_down() -> bool:
            browser.get(base + "/ui/sites")
            row = browser.find_element(By.CSS_SELECTOR, "tr.site[data-site='spare']")
            return bool(row.get_attribute("data-up") == "false")

        wait_until(shown_down, 60, "the sites page shows 'spare' down", every=0.5)
        row = browser.find_element(By.CSS_SELECTOR, "tr.site[data-site='spare']")
        assert "DOWN" in row.text
        main = browser.find_element(By.CSS_SELECTOR, "tr.site[data-site='main']")
        assert main.get_attribute("data-up") == "true"
    finally:
        shutil.move(moved, spare)


def test_ohif_opens_a_study_and_renders_it(browser, site) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    _, base, _ = site
    ct = next(f for f in accepted() if f.path.name == "CT_small.dcm")
    browser.get(f"{base}/viewer/viewer?StudyInstanceUIDs={ct.study_uid}")

    from selenium.common.exceptions import StaleElementReferenceException

    def viewport_image(d):  # type: ignore[no-untyped-def]
        try:
            canvases = d.find_elements(By.CSS_SELECTOR, ".cornerstone-canvas, canvas")
            big = [c for c in canvases if c.size["width"] > 300 and c.size["height"] > 300]
            if not big:
                return None
            png = big[0].screenshot_as_png
        except StaleElementReferenceException:
            return None  # OHIF replaced the canvas while we looked: look again
        shot = Image.open(io.BytesIO(png)).convert("L")
        pixels = np.asarray(shot)
        if pixels.std() > 20 and len(np.unique(pixels)) > 64:
            return pixels
        return None

    found: list[object] = []
    _wait(browser, lambda d: found.append(viewport_image(d)) or found[-1] is not None, timeout=90)
    pixels = found[-1]
    assert pixels is not None
    # The CT slice: a bright body on a dark background, not a flat field.
    assert (pixels < 30).mean() > 0.05 and (pixels > 60).mean() > 0.2
    browser.save_screenshot(str(REPO / ".cache" / "ohif-screenshot.png"))
