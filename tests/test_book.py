"""The book builds with warnings as errors, and every page works in a real browser with no network.

Headless Chromium (Debian's package) opens each page of the table of contents from a local server,
with every host but the local one unresolvable, as on a reader's laptop with no connection. On each
page: the title, every image loaded, MathJax (served by the site itself) typeset every formula with no
TeX error, no raw TeX is left in the text, and the page logged no console error at all (a script or
font fetched from a CDN fails offline, and fails the test). Screenshots go to _build/screenshots/."""

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
SHOTS = ROOT / "_build" / "screenshots"
BOOK_TITLE = "Efficient Attention from First Principles"
# Pages whose title and figure count we know; every other page of the table of contents gets the rest.
EXPECT = {
    "book/intro.html": {"title": BOOK_TITLE, "min_images": 0},
    "notebooks/00_triton_and_the_roofline.html": {"title": "GPUs, Triton and the roofline", "min_images": 2},
    "notebooks/01_flashattention_and_io.html": {"title": "FlashAttention and the I/O complexity", "min_images": 4},
    "notebooks/02_sparse_attention_masks.html": {"title": "Sparse attention masks", "min_images": 3},
    "notebooks/03_softmax_to_linear_attention.html": {"title": "From softmax attention to linear attention",
                                                       "min_images": 3},
    "notebooks/04_state_space_models.html": {"title": "State-space models as dynamical systems", "min_images": 2},
}


def toc_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [toc["root"]]

    def walk(entries):
        for entry in entries:
            if "file" in entry:
                files.append(entry["file"])
            walk(entry.get("sections", []))
            for part in entry.get("parts", []):
                walk(part.get("chapters", []))

    for part in toc.get("parts", []):
        walk(part.get("chapters", []))
    return [f + ".html" for f in files]


PAGES = toc_pages()


def test_every_known_page_is_in_the_toc():
    assert set(EXPECT) <= set(PAGES)


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


def test_site_serves_its_own_mathjax(built_book):
    assert any('class="math' in (built_book / page).read_text() for page in PAGES)
    assert (built_book / "_static" / "mathjax" / "tex-mml-chtml.js").is_file()
    assert list((built_book / "_static" / "mathjax" / "output" / "chtml" / "fonts").rglob("*.woff"))
    for page in PAGES:
        text = (built_book / page).read_text()
        if 'class="math' in text:  # Sphinx adds MathJax to the pages that have mathematics
            assert "_static/mathjax/tex-mml-chtml.js" in text, page
        scripts = re.findall(r'<script[^>]+src="(https?://[^"]+)"', text)
        assert not scripts, f"{page} loads scripts from the network: {scripts}"


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
                 "--disable-sync", "--window-size=1280,1600",
                 # no network: every host name but the local server's fails to resolve
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path keeps selenium from trying to download one (there is no network).
    env_backup = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=chromedriver))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()
    if env_backup is None:
        os.environ.pop("SE_OFFLINE", None)


# Text left in the page outside code that MathJax should have turned into mathematics.
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{|\\(frac|sum|mathbf|mathrm|top|ell|exp|log|le|cdot)\b")

# Collects what the reader sees, outside code blocks, after MathJax has typeset the page.
VISIBLE_TEXT_JS = """
const article = document.querySelector('article') || document.body;
const clone = article.cloneNode(true);
clone.querySelectorAll('pre, code, script, style, mjx-container, mjx-assistive-mml, .highlight')
     .forEach(e => e.remove());
return clone.innerText;
"""


@pytest.mark.parametrize("page", PAGES)
def test_page_in_browser(server, browser, page):
    expect = EXPECT.get(page, {"title": BOOK_TITLE, "min_images": 0})
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

    formulas = browser.execute_script("return document.querySelectorAll('.math').length")
    if formulas:
        state = browser.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "if (!window.MathJax || !MathJax.startup) { done('MathJax did not load'); return; }"
            "MathJax.startup.promise.then(() => done('ok'), e => done('MathJax failed: ' + e));")
        assert state == "ok", f"{page}: {state}"
        typeset = browser.execute_script("return document.querySelectorAll('mjx-container').length")
        assert typeset >= formulas, f"{page}: {typeset} of {formulas} formulas typeset"
        errors = browser.execute_script(
            "return Array.from(document.querySelectorAll('mjx-merror')).map(e => e.getAttribute('data-mjx-error')"
            " || e.textContent)")
        assert not errors, f"{page}: TeX errors {errors}"
    raw = [m.group() for m in RAW_TEX.finditer(browser.execute_script(VISIBLE_TEXT_JS))]
    assert not raw, f"{page}: raw TeX left in the text: {raw[:10]}"

    logged = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not logged, f"console errors on {page}: {logged}"
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("window.scrollTo(0, 0)")
    assert browser.save_screenshot(str(SHOTS / (page.replace("/", "_").replace(".html", ".png"))))
