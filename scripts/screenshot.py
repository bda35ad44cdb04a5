"""The README screenshot: the Search page answering one image, in headless Chromium.

Usage: python scripts/screenshot.py http://127.0.0.1:8501 path/to/query.jpg docs/screenshot.png
(needs the dev extra's playwright and Debian's chromium, as the browser tests do).
"""

from __future__ import annotations

import sys
import time

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]


def shoot(url: str, image: str, out: str) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url, wait_until="domcontentloaded")
        page.get_by_text("Drop an image to search with").wait_for(timeout=120_000)
        page.locator("input[type=file]").set_input_files(image)
        page.get_by_text("Predicted class").wait_for(timeout=180_000)
        time.sleep(8)  # the result cards' images load after the text
        page.screenshot(path=out)
        browser.close()


if __name__ == "__main__":
    shoot(*sys.argv[1:4])
