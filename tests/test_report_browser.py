"""report.html in a real browser (issue 10, point 4): headless Chromium from Debian's packages (installed by
`make test`, see the Makefile's `browser` target) loads the page with no console error and shows the table
and every plot with a non-zero size. Skipped, saying why, only where Chromium cannot be installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config
from tunelab.lab.compare import compare

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (make test installs it with apt-get where it can)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is in the test extras: pip install -e .[test]"
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


WIDE = "lora-r8-on-every-linear-layer-with-a-long-descriptive-name"


def test_the_report_page_loads_and_shows_the_table_and_every_plot(browser, tiny_llama, memo_data, tmp_path):
    base = tiny_config(tiny_llama, memo_data, tmp_path / "unused", "lora", max_steps=4, max_length=128)
    del base["output_dir"], base["strategy"]
    variants = [
        {"name": "zero-shot", "strategy": {"name": "prompt-only"}},
        {"name": WIDE, "strategy": {"name": "lora", "r": 8}},
        {"name": "broken", "strategy": ["lora", {"name": "distill", "teacher": "/nonexistent/teacher"}]},
    ]
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"base": base, "variants": variants, "output_dir": str(tmp_path / "cmp")}))
    out = compare(grid)

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    problems: list[str] = []
    page.on(
        "console",
        lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.goto((out / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    assert problems == []
    assert page.locator("#results tbody tr").count() == 3
    assert page.locator("#results").bounding_box()["height"] > 0
    assert "best task score" in page.locator("#recommendation").inner_text().casefold()
    # the page never scrolls sideways at 1280 px: a wide table scrolls inside its own box
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    box = page.locator("#results").locator("xpath=..")
    assert box.evaluate("e => e.scrollWidth > e.clientWidth")  # the table is wider than the page: it scrolls
    assert page.locator("#results th").first.inner_text() == "Variant"
    assert "%" in page.locator("#results tbody tr").nth(1).inner_text()  # scores as percentages
    assert "broken" in page.locator("#failures").inner_text()
    plots = page.locator("figure img")
    assert plots.count() == 4
    for i in range(plots.count()):
        img = plots.nth(i)
        assert img.evaluate("e => e.complete && e.naturalWidth > 0 && e.naturalHeight > 0"), img.get_attribute(
            "id"
        )
        box = img.bounding_box()
        assert box["width"] > 100 and box["height"] > 100, img.get_attribute("id")
    shot = Path(os.environ.get("TUNELAB_REPORT_SCREENSHOT", tmp_path / "report.png"))
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
