"""The corrections page of the dashboard in a real browser (headless Chromium, Selenium): a
person corrects a patient's name with the form, sees the correction listed, and undoes it with
its button; the archive's answers follow each step."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import requests

from bench import synth
from tests.conftest import Server
from tests.test_web_browser import _wait, browser  # noqa: F401  (the Chromium fixture)
from tests.web_helpers import multipart_body, start_web

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    work = tmp_path_factory.mktemp("corrections-page")
    files = synth.write(synth.Spec(studies=2, series=1, instances=2, size=8), work / "synth")
    server, base = start_web(work / "archive")
    body, ctype = multipart_body([p.read_bytes() for p in files])
    r = requests.post(base + "/dicom-web/studies", data=body, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    yield server, base
    server.stop()


def names(base: str) -> set[str]:
    rows = requests.get(base + "/dicom-web/studies", params={"PatientID": "P0000000"}).json()
    return {r["00100010"]["Value"][0]["Alphabetic"] for r in rows}


def watch_result(driver: object) -> None:
    """Keep what the page shows in its result line in the tab's sessionStorage: the page
    reloads 0.8 s after a successful call, and on a loaded machine a test that polls the line
    itself can first look after the reload, at an empty line."""
    driver.execute_script(  # type: ignore[attr-defined]
        "sessionStorage.removeItem('result');"
        "const line = document.getElementById('result');"
        "new MutationObserver(() => sessionStorage.setItem('result', line.textContent))"
        ".observe(line, {childList: true, characterData: true, subtree: true});"
    )


def shown(driver: object) -> str:
    """What the page showed in its result line last (kept across the reload)."""
    return str(driver.execute_script("return sessionStorage.getItem('result') || ''"))  # type: ignore[attr-defined]


def test_correct_and_undo_on_the_page(archive: tuple[Server, str], browser: object) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By

    _, base = archive
    before = names(base)
    driver = browser
    driver.get(base + "/ui/corrections")  # type: ignore[attr-defined]
    find = driver.find_element  # type: ignore[attr-defined]
    find(By.ID, "reason").send_keys("misspelled at registration")
    find(By.ID, "a-id").send_keys("P0000000")
    find(By.ID, "set-PatientName").send_keys("PAGE^PATRICIA")
    watch_result(driver)
    find(By.XPATH, "//button[text()='Update patient']").click()
    _wait(driver, lambda d: shown(d).startswith("201"))
    assert names(base) == {"PAGE^PATRICIA"}

    # The page reloads and lists the correction with an Undo button.
    _wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "tr.correction button.undo"))
    driver.find_element(By.ID, "reason").send_keys("it was right")  # type: ignore[attr-defined]
    watch_result(driver)
    driver.find_element(By.CSS_SELECTOR, "tr.correction button.undo").click()  # type: ignore[attr-defined]
    _wait(driver, lambda d: shown(d).startswith("201"))
    assert names(base) == before
    listing = requests.get(base + "/api/corrections").json()
    assert [(c["kind"], c["undone_by"]) for c in listing] == [("undo", None), ("patient", 2)]
    _wait(driver, lambda d: "undone by #2" in d.find_element(By.ID, "corrections").text)
