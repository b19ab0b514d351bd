"""`serve` in a real browser: Debian's chromium driven by Selenium (no browser download), against the real
server started as a subprocess; uploads a real ISIC 2024 crop and checks what the page shows.

Needs the `chromium` and `chromium-driver` packages (`make setup` installs them). Without them the test
skips, unless LESIONSTACK_REQUIRE_BROWSER=1 (set by `make test`, hence CI), where it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

from lesionstack.inference.serve import launch

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run",
                "--disable-sync", "--window-size=1280,1100")


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        message = f"{missing} not installed (apt-get install chromium chromium-driver; `make setup` does it)"
        if os.environ.get("LESIONSTACK_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch a browser or a driver
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))


def test_the_page_scores_a_real_crop_in_chromium(tiny_bundle, shared_data, tmp_path):
    require_browser()
    pytest.importorskip("selenium")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    bundle = Path(os.environ.get("LESIONSTACK_SERVE_BUNDLE", tiny_bundle))  # docs/serve.png: the demo run
    crop = shared_data / "isic2024-real-crops" / os.environ.get("LESIONSTACK_SERVE_CROP", "ISIC_0015670.jpg")
    port = free_port()
    with (tmp_path / "server.log").open("w") as log:
        server = launch(bundle, port, device="cpu", output=log, timeout=120)
    driver = None
    try:
        driver = browser(tmp_path / "profile")
        driver.get(f"http://127.0.0.1:{port}/")
        WebDriverWait(driver, 20).until(lambda d: len(Select(d.find_element(By.ID, "site")).options) > 1)
        driver.find_element(By.ID, "file").send_keys(str(crop))
        driver.find_element(By.ID, "age").send_keys("60")
        Select(driver.find_element(By.ID, "sex")).select_by_visible_text("male")
        Select(driver.find_element(By.ID, "site")).select_by_visible_text("posterior torso")
        driver.find_element(By.ID, "diameter_mm").send_keys("5.5")
        WebDriverWait(driver, 10).until(EC.element_to_be_clickable((By.ID, "analyse"))).click()
        WebDriverWait(driver, 60).until(EC.visibility_of_element_located((By.ID, "result")))
        probability = driver.find_element(By.ID, "probability").text
        assert probability.endswith("%") and 0 <= float(probability[:-1]) <= 100, probability
        shown = {}
        for image in ("overlay", "heatmap"):
            shown[image] = driver.execute_script(
                f"const i = document.getElementById('{image}'); return !i.hidden && i.complete && i.naturalWidth;")
        assert shown["overlay"], "the outline is not shown"
        caption = driver.find_element(By.ID, "heatmap-caption").text
        if bundle == tiny_bundle:  # 32 px input: a 1 x 1 map, so no heatmap and the reason instead
            assert not shown["heatmap"] and caption.startswith("No Grad-CAM: at this model's 32 px input"), caption
            banner = driver.find_element(By.ID, "synthetic")  # it learnt from generated crops
            assert banner.is_displayed() and banner.text.startswith("Demo model: This model learnt from synthetic")
            label = driver.find_element(By.ID, "probability-label").text
            assert label.startswith("score of a model trained on synthetic data"), label
        else:
            assert shown["heatmap"] or caption.startswith("No Grad-CAM"), caption
        details = driver.find_element(By.ID, "details").text
        assert "fold ensemble" in details and "Research use only" in details and "age_approx = 60" in details
        assert "Training data" in details
        assert not driver.find_element(By.ID, "error").is_displayed()
        shot = tmp_path / "serve.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        if os.environ.get("LESIONSTACK_SCREENSHOT"):
            shutil.copy2(shot, os.environ["LESIONSTACK_SCREENSHOT"])
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(20)
    log = (tmp_path / "server.log").read_text()
    assert '"POST /api/predict HTTP/1.1" 200' in log and "scored a" in log  # the real server answered
    assert "data:image" not in log and "JFIF" not in log and len(log) < 5_000  # and logged no picture
