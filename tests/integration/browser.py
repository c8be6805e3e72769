"""A headless Chromium driven by Selenium, for the dashboard's browser test.

Debian's ``chromium`` and ``chromedriver`` (scripts/ci/install_chromium.sh): both paths are given, so
Selenium never looks for (or downloads) a driver of its own.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def chromium_paths() -> tuple[str, str]:
    """(chromium, chromedriver), installing them once with scripts/ci/install_chromium.sh if missing."""
    if shutil.which("chromium") is None or shutil.which("chromedriver") is None:
        subprocess.run(["bash", str(ROOT / "scripts" / "ci" / "install_chromium.sh")], check=False, timeout=900)
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("chromium/chromedriver missing and scripts/ci/install_chromium.sh could not install them")
    return browser, driver


@contextmanager
def headless_chromium(width: int = 1400, height: int = 1000) -> Iterator[Any]:
    """A Selenium driver of a headless Chromium, quit whatever happens."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium_paths()
    options = Options()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--no-proxy-server", f"--window-size={width},{height}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(probe: Callable[[], T | None], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """``probe()``'s first truthy answer; fails naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        answer = probe()
        if answer:
            return answer
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)  # polling a page: the browser has no notification to wait on


def full_page_screenshot(driver: Any, path: Path) -> Path:
    """The whole page, not just the window: the window is made as tall as the page first."""
    height = driver.execute_script("return document.documentElement.scrollHeight")
    width = driver.execute_script("return document.documentElement.scrollWidth")
    driver.set_window_size(max(width, 1200), height + 120)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
