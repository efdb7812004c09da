"""Screenshot of a report.html for the README: ``python docs/screenshot.py results/default/report.html docs/report.png``.

Renders the page in headless Chromium (Debian's chromium + chromium-driver, through selenium from the
test extras), keeps the top ``--height`` pixels and scales them to ``--width``, so the PNG stays small.
"""

from __future__ import annotations

import argparse
import io
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("report", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--height", type=int, default=2600, help="page pixels to keep, from the top")
    parser.add_argument("--width", type=int, default=900, help="width of the saved PNG")
    args = parser.parse_args()

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in (*FLAGS, f"--user-data-dir={profile}", f"--window-size=1280,{args.height}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(args.report.resolve().as_uri())
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
        finally:
            driver.quit()
    shot = shot.resize((args.width, round(shot.height * args.width / shot.width)), Image.LANCZOS)
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)  # palette PNG: small
    print(f"{args.out}: {shot.width} x {shot.height}, {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
