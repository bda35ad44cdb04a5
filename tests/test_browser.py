"""End to end in a real browser: `streamlit run app.py` on a free port, an upload through the real uploader."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, make_class_images, run_cli

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
K = 12

pytestmark = pytest.mark.browser


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"streamlit exited {server.returncode}: {server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError("streamlit did not become healthy in time")


@pytest.fixture
def server(tmp_path: Path):
    """The real app, against an index this test built with the real CLI."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (scripts/dev.sh test does)")
    data = make_class_images(tmp_path / "data" / "shapes", {"circles": 6, "squares": 6, "triangles": 6}, size=64)
    home = tmp_path / "indexes"
    run_cli("index", str(data), "--home", str(home), "--weights", "none", "--image-size", "32", "--workers", "0")
    port = free_port()
    env = {**os.environ, "SIMIMG_HOME": str(home), "SIMIMG_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py"), "--server.headless", "true",
                             "--server.port", str(port), "--server.address", "127.0.0.1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_upload_shows_a_result_grid(server, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, data = server
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url, wait_until="domcontentloaded")
            page.locator("input[type=file]").set_input_files(str(data / "squares" / "squares_003.png"))
            page.get_by_text(f"{K} most similar").wait_for(timeout=90_000)
            cards = page.locator("[data-testid=stImage]")
            page.wait_for_function(f"document.querySelectorAll('[data-testid=stImage]').length >= {K + 1}",
                                   timeout=60_000)
            assert cards.count() >= K + 1  # the query image and K results
            assert page.get_by_text("score 1.000").count() >= 1
            assert page.locator("[data-testid=stException]").count() == 0
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "search.png").stat().st_size > 10_000
