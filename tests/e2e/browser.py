"""A run's report.html opened in a real headless browser (Debian's chromium, driven by
Playwright; ``make install`` installs both): it renders, every picture loads, the console
stays clean, and nothing is fetched from anywhere (the file must stand alone).

A screenshot of each page is kept as a test artifact under ``TUNEFLEET_TEST_ARTIFACTS``
(default: ``<pytest's base temp>/artifacts``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM = os.environ.get("TUNEFLEET_CHROMIUM", "/usr/bin/chromium")
#: As the machine's own probe starts it: no sandbox (root), no GPU, and none of the
#: background connections a closed network refuses.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def artifacts_dir(tmp_path_factory) -> Path:
    folder = os.environ.get("TUNEFLEET_TEST_ARTIFACTS") or str(
        tmp_path_factory.getbasetemp() / "artifacts"
    )
    os.makedirs(folder, exist_ok=True)
    return Path(folder)


def open_report(html: Path, screenshot: Path) -> dict:
    """Load ``html`` from disk in chromium with the network cut off; what the page showed:
    ``{"title", "images": [(id, natural width, height)], "console": [errors], "requests":
    [urls other than the file], "text"}``, and a full-page screenshot at ``screenshot``."""
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM) or os.path.exists(CHROMIUM), f"{CHROMIUM} is not installed"
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))

            def refuse(route):  # a self-contained page asks for nothing but itself
                if route.request.url != html.as_uri():
                    requests.append(route.request.url)
                    return route.abort()
                return route.continue_()

            page.route("**/*", refuse)
            page.goto(html.as_uri(), wait_until="load")
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.id, e.naturalWidth, e.naturalHeight, e.complete])"
            )
            page.screenshot(path=str(screenshot), full_page=True)
            return {
                "title": page.title(),
                "images": [(i, w, h) for i, w, h, done in images if done],
                "console": errors,
                "requests": requests,
                "text": page.inner_text("body"),
            }
        finally:
            browser.close()


def check_report(run_dir: Path, tmp_path_factory, name: str) -> dict:
    """What every report must show in a browser; returns what it showed (the pictures'
    ids in ``shown["ids"]``)."""
    shown = open_report(run_dir / "report.html", artifacts_dir(tmp_path_factory) / f"{name}.png")
    assert shown["console"] == [] and shown["requests"] == [], shown
    assert shown["title"] == f"tunefleet report: {run_dir.name}"
    shown["ids"] = {image for image, _, _ in shown["images"]}
    for image, width, height in shown["images"]:
        assert width > 100 and height > 100, (image, width, height)  # decoded, not broken
    return shown
