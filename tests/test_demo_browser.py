"""The demo in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by
Selenium against ``python space/app.py`` with the bundled medm2g-tiny, started and stopped here on a free
port of 127.0.0.1 (through GRADIO_SERVER_NAME / GRADIO_SERVER_PORT, as a user would).

Run with ``pytest -m browser`` (CI does). Each tab's screenshot is saved to pytest's temporary folder, or
to ``$MEDM2G_DEMO_SCREENSHOTS`` (``docs/images`` refreshes the README's) as ``demo_<tab>.png``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from free_port import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
TABS = ["report_to_images", "image_to_report", "mri_to_ct", "ct_to_xray", "mri_synthesis"]
FEW_STEPS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``python space/app.py`` on a free port; yields its URL and log file."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "app.log"
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, str(ROOT / "space" / "app.py")], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 240
    while True:
        if process.poll() is not None:
            pytest.fail(f"space/app.py exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"space/app.py did not answer on {url} within 240 s:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    yield url, log
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def driver():
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the browser tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the browser tests need Selenium: pip install -e '.[demo,browser]'")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1200",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    # An explicit driver path: Selenium Manager (which downloads drivers) is never called.
    browser = webdriver.Chrome(service=Service(chromedriver), options=options)
    browser.implicitly_wait(0)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("MEDM2G_DEMO_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


# ------------------------------------------------------------------------------------------- helpers


def css(driver, selector: str):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def wait_for(condition, timeout: float = 120, what: str = "the page"):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the DOM changes under us while Gradio renders (stale elements)
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


def open_page(driver, url: str, tab: str):
    driver.get(url)
    wait_for(lambda: css(driver, "#medm2g-banner"), 60, "the banner")
    wait_for(lambda: css(driver, f"#{tab}-tab-button"), 30, "the tabs")[0].click()
    wait_for(lambda: css(driver, f"#{tab}-run"), 30, f"the {tab} tab")


def click_example(driver, tab: str, row: int = 0):
    rows = f"#{tab}-examples tr.tr-body, #{tab}-examples button.gallery-item"  # a table, or buttons for one input
    wait_for(lambda: css(driver, rows), 30, "the examples")[row].click()


def set_number(driver, selector: str, value: int):
    from selenium.webdriver.common.keys import Keys

    box = css(driver, f"{selector} input[type=number]")[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value))
    box.send_keys(Keys.TAB)
    wait_for(lambda: box.get_attribute("value") == str(value), 10, f"{selector} = {value}")


def images_in(driver, selector: str) -> list:
    return [img for img in css(driver, f"{selector} img") if img.get_attribute("src") and img.size["width"] > 20]


def status_text(driver, tab: str) -> str:
    found = css(driver, f"#{tab}-status")
    return found[0].text if found else ""


def toasts(driver) -> list[str]:
    return [toast.text for toast in css(driver, ".toast-body, [data-testid=toast-body]")]


def save_screenshot(driver, path: Path) -> None:
    """The whole page, as a small palette PNG (the README shows it; git stores it)."""
    from PIL import Image

    size = driver.get_window_size()
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(size["width"], min(max(height, size["height"]), 2400))  # the whole page
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw.png")
    driver.save_screenshot(str(raw))
    driver.set_window_size(size["width"], size["height"])
    Image.open(raw).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    raw.unlink()


# --------------------------------------------------------------------------------------------- tests


def test_page_loads_offline_with_the_banner_and_a_tab_per_task(driver, server):
    url, _ = server
    driver.get_log("performance")  # drop what came before
    open_page(driver, url, "report_to_images")
    assert css(driver, "#medm2g-banner")[0].text == "Research demo — synthetic images — not for clinical use"
    assert [button.get_attribute("id") for button in css(driver, "button[role=tab]")] == [f"{tab}-tab-button" for tab in TABS]
    time.sleep(2)
    requested = set()
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            requested.add(message["params"]["request"]["url"])
    outside = [u for u in requested if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"]
    assert requested and not outside, f"the page fetched from outside: {outside}"


# What each tab's first example generates: CSS selector of the output and how many images it shows
# (0: a text output).
OUTPUTS = {"report_to_images": 2, "image_to_report": 0, "mri_to_ct": 1, "ct_to_xray": 1, "mri_synthesis": 1}
PREVIEWS = {"report_to_images": 0, "image_to_report": 1, "mri_to_ct": 1, "ct_to_xray": 1, "mri_synthesis": 3}


@pytest.mark.parametrize("tab", TABS)
def test_each_tab_generates_from_its_example(driver, server, screenshots, tab):
    url, _ = server
    open_page(driver, url, tab)
    click_example(driver, tab)
    wait_for(lambda: len(images_in(driver, f"#{tab}-tab [id$=-preview]")) >= PREVIEWS[tab], 60, "the upload previews")
    css(driver, f"#{tab}-run")[0].click()  # the default steps: these screenshots are the README's
    if OUTPUTS[tab]:
        wait_for(lambda: len(images_in(driver, f"#{tab}-output")) >= OUTPUTS[tab], 180, f"{OUTPUTS[tab]} generated images")
    else:
        wait_for(lambda: css(driver, f"#{tab}-output textarea")[0].get_attribute("value").strip(), 180, "the report")
    wait_for(lambda: "Generated" in status_text(driver, tab), 30, "the status line")
    downloads = wait_for(lambda: [a.get_attribute("download") or a.get_attribute("href") for a in css(driver, f"#{tab}-files a")], 30, "the downloads")
    expected = (".txt", ".json") if tab == "image_to_report" else (".png", ".dcm")
    assert all(any(name.endswith(suffix) for name in downloads) for suffix in expected), downloads
    assert not toasts(driver)
    save_screenshot(driver, screenshots / f"demo_{tab}.png")


def test_upload_a_dicom_then_bad_files(driver, server, tmp_path):
    from medm2g_diffusers.data.io import write_dicom
    from medm2g_diffusers.data.phantoms import PhantomGenerator

    url, _ = server
    patient = PhantomGenerator(seed=99, size=128).patient(0, anatomy="chest")
    dicom = tmp_path / "chest.dcm"
    write_dicom(dicom, np.clip(patient.images["xray"], 0, 1), modality="xray", provenance={"model": "phantom"})
    tab = "image_to_report"
    open_page(driver, url, tab)
    css(driver, f"#{tab}-upload input[type=file]")[0].send_keys(str(dicom))
    wait_for(lambda: images_in(driver, f"#{tab}-upload-preview"), 60, "the DICOM's preview")
    wait_for(lambda: any("resized from 128×128 to 64×64" in t for t in toasts(driver)), 30, "the resize note")
    set_number(driver, f"#{tab}-steps", FEW_STEPS)
    css(driver, f"#{tab}-run")[0].click()
    report = wait_for(lambda: css(driver, f"#{tab}-output textarea")[0].get_attribute("value").strip(), 120, "the report")
    assert len(report.split()) > 3

    bad = {
        "corrupt.dcm": (b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage" * 30, "corrupt.dcm"),
        "notes.txt": (b"FINDINGS: none.", "notes.txt has unsupported file type '.txt'"),
    }
    for name, (content, message) in bad.items():
        (tmp_path / name).write_bytes(content)
        open_page(driver, url, tab)
        css(driver, f"#{tab}-upload input[type=file]")[0].send_keys(str(tmp_path / name))
        shown = wait_for(lambda message=message: [t for t in toasts(driver) if message in t], 60, f"the error message for {name}")
        assert "Traceback" not in shown[0] and str(tmp_path) not in shown[0]
        assert not images_in(driver, f"#{tab}-upload-preview")


def test_stop_interrupts_a_running_generation(driver, server):
    url, log = server
    tab = "report_to_images"
    open_page(driver, url, tab)
    click_example(driver, tab)
    set_number(driver, f"#{tab}-steps", 100)
    css(driver, f"#{tab}-run")[0].click()
    wait_for(lambda: "Denoising" in css(driver, f"#{tab}-output")[0].text, 120, "the progress bar")
    css(driver, f"#{tab}-stop")[0].click()
    wait_for(lambda: "Stopped" in status_text(driver, tab), 30, "the Stop message")
    stopped = wait_for(lambda: [line for line in log.read_text().splitlines() if "generation stopped after" in line], 30, "the server's log line")
    done = int(stopped[-1].rsplit("after ", 1)[1].split("/")[0])
    assert done < 100
    assert not images_in(driver, f"#{tab}-output") and not toasts(driver)
    # The model is free again: a short run finishes.
    set_number(driver, f"#{tab}-steps", FEW_STEPS)
    css(driver, f"#{tab}-run")[0].click()
    wait_for(lambda: len(images_in(driver, f"#{tab}-output")) >= 2, 120, "images after the stop")
