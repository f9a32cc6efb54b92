"""Size and load time of a rendered report in headless Chromium (docs/report.md).

    python bench/report_load.py RUN/report [LATENT ...]

Opens index.html and features/<LATENT>.html five times each over the DevTools protocol (the client of
tests/test_report.py) and prints each page's size and the median of loadEventEnd - navigationStart, any
console errors, and the folder's total size.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_report import Browser  # noqa: E402


def main(report: Path, latents: list[str]) -> None:
    pages = [report / "index.html"] + [report / "features" / f"{j}.html" for j in latents]
    browser = Browser(Path(tempfile.mkdtemp()))
    try:
        for page in pages:
            times = []
            for _ in range(5):
                browser.goto(page.as_uri())
                times.append(
                    browser.js("performance.timing.loadEventEnd - performance.timing.navigationStart")
                )
            size = page.stat().st_size / 1024
            print(
                f"{page.relative_to(report)}: {size:.0f} KB, load {statistics.median(times)} ms (median of {times})"
            )
        print("console errors:", browser.errors())
    finally:
        browser.close()
    total = sum(f.stat().st_size for f in report.rglob("*") if f.is_file())
    print(f"report folder: {total / 2**20:.1f} MB in {sum(1 for _ in report.rglob('*.html'))} pages")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
