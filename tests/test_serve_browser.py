"""The inspector's page in a real headless browser: Debian's Chromium driven by Selenium through
/usr/bin/chromedriver (never a downloaded driver). Uploads an image, waits for the result, checks
the verdict, that the overlay is shown and decodes, and saves a screenshot."""

from __future__ import annotations

import base64
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("python_multipart")
pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[test]')")

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if not (CHROMIUM and os.path.exists(CHROMEDRIVER)):
    pytest.skip("Chromium or chromedriver is missing: apt-get install -y chromium chromium-driver (.ci/run does it)",
                allow_module_level=True)

from _serve_util import live_server, train_model  # noqa: E402
from defectscope import Inferencer  # noqa: E402
from defectscope.serve.app import ServeConfig, create_app  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(synth_root, tmp_path_factory):
    return train_model(synth_root, tmp_path_factory.mktemp("serve-browser") / "fabric")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,1100",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    # an explicit driver path: selenium-manager never runs (no download, the machine is offline)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_inspector_page_uploads_an_image_and_shows_verdict_overlay_and_history(browser, model_dir, synth_root,
                                                                               tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    src = synth_root / "fabric" / "test"
    defect, good = tmp_path / "part_missing_000.png", tmp_path / "part_good_000.png"  # distinct names
    shutil.copy(sorted((src / "missing").glob("*.png"))[0], defect)  # a defect this tiny model catches
    shutil.copy(sorted((src / "good").glob("*.png"))[0], good)
    inf = Inferencer(model_dir)
    expect = {p.name: inf.predict(p) for p in (defect, good)}

    app = create_app({"fabric": model_dir}, ServeConfig(max_batch=4, max_wait_ms=5))
    with live_server(app) as port:
        browser.get(f"http://127.0.0.1:{port}/")
        wait = WebDriverWait(browser, 30)
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "ready"))
        assert Select(browser.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "fabric"
        assert "padim" in browser.find_element(By.ID, "modelinfo").text

        upload = browser.find_element(By.ID, "files")
        upload.send_keys(f"{defect}\n{good}")  # two files at once
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results article.card:not(.pending)")) == 2)
        cards = browser.find_elements(By.CSS_SELECTOR, "#results article.card")
        shown = {}
        for card in cards:
            name = card.find_element(By.CSS_SELECTOR, ".fname").text
            verdict = card.find_element(By.CSS_SELECTOR, ".verdict").text
            shown[name] = verdict
            assert verdict == expect[name].verdict.upper(), (name, verdict)
            assert f"{expect[name].normalized:.3f}" in card.find_element(By.CSS_SELECTOR, ".score").text
            overlay = card.find_element(By.CSS_SELECTOR, "img.overlay")
            wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0",
                                                  overlay))
            assert overlay.is_displayed()
            src = overlay.get_attribute("src")
            assert src.startswith("data:image/png;base64,")
            pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))))
            assert pixels.shape == (64, 64, 3) and pixels.std() > 0  # the input's size, not blank
            for cls in ("original", "mask"):
                img = card.find_element(By.CSS_SELECTOR, f"img.{cls}")
                wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth > 0", img))
        assert set(shown) == {defect.name, good.name}

        # the session history, filterable by verdict
        rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
        assert len(rows) == 2
        verdicts = {expect[n].verdict for n in shown}
        for v in ("defect", "good"):
            Select(browser.find_element(By.ID, "filter")).select_by_value(v)
            rows = browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")
            assert all(r.get_attribute("data-verdict") == v for r in rows)
            assert len(rows) == sum(expect[n].verdict == v for n in shown)
        Select(browser.find_element(By.ID, "filter")).select_by_value("all")
        assert verdicts  # at least one verdict was shown

        browser.set_window_size(1280, 1300)
        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "inspector.png"
        browser.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 0
        keep = os.environ.get("DEFECTSCOPE_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "inspector.png")
        logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] \
            if hasattr(browser, "get_log") else []
        assert not logs, logs  # no JavaScript error, no failed request
