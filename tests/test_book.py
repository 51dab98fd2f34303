"""The book builds with warnings as errors, and its pages work in a real browser: headless Chromium
(Debian's package) opens the intro and chapter 0 from a local server, and we check the title, that
every image loaded, and that our pages log no console errors. Screenshots go to _build/screenshots/."""

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
BOOK_TITLE = "Efficient Attention from First Principles"
PAGES = {
    "book/intro.html": {"title": BOOK_TITLE, "min_images": 0},
    "notebooks/00_triton_and_the_roofline.html": {"title": "GPUs, Triton and the roofline", "min_images": 2},
    "notebooks/01_flashattention_and_io.html": {"title": "FlashAttention and the I/O complexity", "min_images": 4},
    "notebooks/02_sparse_attention_masks.html": {"title": "Sparse attention masks", "min_images": 3},
    "notebooks/03_softmax_to_linear_attention.html": {"title": "From softmax attention to linear attention",
                                                       "min_images": 3},
    "notebooks/04_state_space_models.html": {"title": "State-space models as dynamical systems", "min_images": 2},
}


@pytest.fixture(scope="module")
def built_book():
    # the `jupyter-book` command, run by this interpreter (so it works with or without a venv)
    cmd = [sys.executable, "-c", "from jupyter_book.cli.main import main; main()",
           "build", str(ROOT), "-W", "-n", "--keep-going"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-5000:]
    assert "build succeeded" in log and "WARNING" not in log, log[-5000:]
    return HTML


def test_book_builds_clean(built_book):
    for page in PAGES:
        assert (built_book / page).exists(), page
    assert (built_book / "index.html").exists()


@pytest.fixture(scope="module")
def server(built_book):
    handler = functools.partial(_QuietHandler, directory=str(built_book))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.fail("the browser test needs Debian's chromium and chromium-driver (`make browser` installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1280,1600"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps selenium from trying to download one (there is no network).
    env_backup = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    if env_backup is None:
        os.environ.pop("SE_OFFLINE", None)


@pytest.mark.parametrize("page", list(PAGES))
def test_page_in_browser(server, browser, page):
    expect = PAGES[page]
    browser.get_log("browser")  # discard messages from earlier pages
    browser.get(f"{server}/{page}")
    browser.execute_script("window.scrollTo(0, document.body.scrollHeight)")  # trigger lazy images
    browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all(Array.from(document.images).map(i => i.complete ? null :"
        " new Promise(r => { i.onload = i.onerror = r; }))).then(() => done());")
    assert expect["title"] in browser.title, browser.title
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.currentSrc || i.src, i.complete && i.naturalWidth > 0])")
    broken = [src for src, ok in images if not ok]
    assert not broken, f"images that did not load: {broken}"
    assert len(images) >= expect["min_images"], images
    ours = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and server in e.get("message", "")
            or e["level"] == "SEVERE" and "source" in e and e["source"] == "javascript"]
    assert not ours, f"console errors on {page}: {ours}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(SHOTS / (page.replace("/", "_").replace(".html", ".png"))))
