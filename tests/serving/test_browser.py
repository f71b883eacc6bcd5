"""The web page in a real browser: Debian's chromium, driven by Selenium through chromedriver."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from ecanfnet.testing import photo_arrays

from helpers import HTML_LABEL, jpeg_bytes

pytestmark = pytest.mark.slow  # processes, servers or training runs: `pytest -m "not slow"` skips them

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        if os.environ.get("CI"):
            pytest.fail("chromium and chromedriver must be installed in CI (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="ecanfnet-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_page_uploads_a_photo_and_shows_the_apis_top5(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(jpeg_bytes(photo_arrays()["chelsea"]))
    want = server.client.post("/v1/classify?top_k=5", content=photo.read_bytes(),
                              headers={"content-type": "image/jpeg"}).json()["predictions"]

    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "eca_nfnet_l0"))
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")

    items = browser.find_elements(By.CSS_SELECTOR, "#results li")
    shown = [(int(li.get_attribute("data-index")), li.find_element(By.CLASS_NAME, "label").text,
              li.find_element(By.CLASS_NAME, "score").text) for li in items]
    assert [(i, label) for i, label, _ in shown] == [(p["index"], p["label"]) for p in want]
    assert [s for _, _, s in shown] == [f"{100 * p['score']:.2f}%" for p in want]
    assert browser.find_element(By.ID, "preview").get_attribute("hidden") is None
    assert "ms" in browser.find_element(By.ID, "latency").text


def test_page_asks_a_three_class_model_for_its_three_classes_and_shows_labels_as_text(browser, hardened, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "chelsea.jpg"
    photo.write_bytes(jpeg_bytes(photo_arrays()["chelsea"]))
    browser.get(hardened.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "3 classes"))
    title = browser.title
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")

    items = browser.find_elements(By.CSS_SELECTOR, "#results li")
    labels = [li.find_element(By.CLASS_NAME, "label").text for li in items]
    assert sorted(labels) == sorted([HTML_LABEL, "dog", "fish"])  # all 3, the HTML one as its literal text
    assert not browser.find_elements(By.CSS_SELECTOR, "#results img") and browser.title == title


def test_page_explains_the_uploaded_photo_on_request(browser, server, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import Select, WebDriverWait

    photo = tmp_path / "coffee.jpg"
    photo.write_bytes(jpeg_bytes(photo_arrays()["coffee"]))
    top = server.client.post("/v1/classify", content=photo.read_bytes(),
                             headers={"content-type": "image/jpeg"}).json()["predictions"][0]
    height, width = server.client.get("/v1/model").json()["input_size"][1:]
    browser.get(server.url + "/")
    wait = WebDriverWait(browser, 120)
    wait.until(EC.text_to_be_present_in_element((By.ID, "model"), "eca_nfnet_l0"))
    assert browser.find_element(By.ID, "explain-box").get_attribute("hidden") is not None  # nothing to explain yet
    browser.find_element(By.ID, "file").send_keys(str(photo))
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "done")
    for method in ("gradcam", "eigencam"):
        Select(browser.find_element(By.ID, "method")).select_by_value(method)
        browser.find_element(By.ID, "explain").click()
        wait.until(lambda d, m=method: d.find_element(By.TAG_NAME, "body").get_attribute("data-explained") == m)
        overlay = browser.find_element(By.ID, "overlay")
        assert overlay.get_attribute("hidden") is None and overlay.get_attribute("src").startswith("data:image/png")
        assert browser.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]",
                                      overlay) == [width, height]
        assert top["label"] in browser.find_element(By.ID, "overlay-caption").text
